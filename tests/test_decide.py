"""Each decision rule of planner.decision.rules (through planner.decision.placement.decide, which adds planner.decision.suggest's advice) on
a small synthetic Llama (arithmetic only, no torch), with the card's memory placed just above or below the peaks
the memory model gives, so each rule is what tips the decision."""

from __future__ import annotations

import dataclasses

import pytest

from loraplan.planner.decision import rules
from loraplan.planner.errors import InputError
from loraplan.planner.decision.placement import decide
from loraplan.planner.facts.request import PlanRequest
from loraplan.planner.decision.resolve import resolve

# 0.9 B parameters: big enough that LoRA and QLoRA weights differ by GiB, small enough to reason about.
CONFIG = {
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
MARGIN = 0.1  # tables/memory.yaml decision.safety_margin


@pytest.fixture()
def model_dir(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return str(tmp_path)


def resolved(model_dir, memory_gib=80.0, **kw):
    return resolve(PlanRequest(model=model_dir, gpu="custom", gpu_memory=f"{memory_gib}GiB", fit_table=False, **kw))


def peak(r, method, mb, gc):
    return sum(t.bytes for t in rules.budget(r, rules.shape(r, method, mb, gc))) / 2**30


def card_for(gib):
    """Card memory whose usable part (after the safety margin) is just above `gib`."""
    return (gib + 0.01) / (1 - MARGIN)


def test_lora_is_chosen_when_it_fits_because_it_is_faster(model_dir):
    r = resolved(model_dir)
    d = decide(r)
    assert d.feasible and d.choice.method == "lora"
    assert "faster" in d.reasons["method"]


def test_qlora_when_lora_does_not_fit_even_with_checkpointing_at_micro_batch_1(model_dir):
    probe = resolved(model_dir)
    lora_min, qlora_min = peak(probe, "lora", 1, True), peak(probe, "qlora", 1, True)
    assert qlora_min < lora_min
    r = resolved(model_dir, memory_gib=card_for(qlora_min))
    d = decide(r)
    assert d.feasible and d.choice.method == "qlora" and d.choice.grad_checkpointing
    assert "do not fit" in d.reasons["method"] and "QLoRA" in d.reasons["method"]


def test_checkpointing_only_when_needed(model_dir):
    probe = resolved(model_dir)
    no_gc_mb1 = peak(probe, "lora", 1, False)
    r = resolved(model_dir, memory_gib=card_for(no_gc_mb1))
    d = decide(r)
    assert d.choice == rules.Choice("lora", False, 1, d.choice.terms) and not d.choice.grad_checkpointing
    assert d.reasons["grad_checkpointing"].startswith("off")
    # a little less memory, and the same micro-batch needs checkpointing
    r = resolved(model_dir, memory_gib=(no_gc_mb1 - 0.05) / (1 - MARGIN))
    d = decide(r)
    assert d.choice.method == "lora" and d.choice.grad_checkpointing
    assert d.reasons["grad_checkpointing"].startswith("on: without it")


def test_the_largest_micro_batch_that_divides_the_per_gpu_batch_and_fits(model_dir):
    probe = resolved(model_dir, global_batch_size=12)
    # per-GPU batch 12: candidates 1, 2, 4 (8 does not divide 12)
    assert rules.micro_batches_to_try(probe) == [1, 2, 4]
    r = resolved(model_dir, memory_gib=card_for(peak(probe, "lora", 2, False)), global_batch_size=12)
    d = decide(r)
    assert (d.choice.method, d.choice.grad_checkpointing, d.choice.micro_batch_size) == ("lora", False, 2)
    assert d.reasons["grad_accum_steps"].startswith("6 = global batch 12")


def test_forced_options_are_obeyed_and_said(model_dir):
    r = resolved(model_dir, method="qlora", grad_checkpointing="on", batch_size=2)
    d = decide(r)
    assert (d.choice.method, d.choice.grad_checkpointing, d.choice.micro_batch_size) == ("qlora", True, 2)
    assert "as asked" in d.reasons["method"] and "as asked" in d.reasons["grad_checkpointing"]
    assert "as asked" in d.reasons["micro_batch_size"]


def test_nothing_fits_reports_the_smallest_and_never_reads_like_success(model_dir):
    r = resolved(model_dir, memory_gib=0.5)
    d = decide(r)
    assert not d.feasible
    smallest = min(peak(r, m, 1, gc) for m in ("lora", "qlora") for gc in (False, True))
    assert d.choice.peak_gib == pytest.approx(smallest)
    assert "neither fits" in d.reasons["method"]
    assert "still does not fit" in d.reasons["grad_checkpointing"]
    assert "over the" in d.reasons["micro_batch_size"] and "stays under" not in d.reasons["micro_batch_size"]
    assert "short" in d.suggestions[0]


def test_a_suggestion_appears_only_when_it_helps_and_says_what_it_saves(model_dir):
    probe = resolved(model_dir)
    qlora_min = peak(probe, "qlora", 1, True)
    # LoRA forced onto a card where only QLoRA fits: QLoRA is offered (it fits alone); the 8-bit optimizer, which
    # saves a few MB here, is not
    r = resolved(model_dir, memory_gib=card_for(qlora_min), method="lora")
    d = decide(r)
    assert not d.feasible
    text = "\n".join(d.suggestions)
    assert "QLoRA" in text and "saves" in text and "fits" in text
    assert "8-bit" not in text


def test_relaxations_that_only_fit_together_are_listed_with_the_total(model_dir):
    probe = resolved(model_dir)
    lora_gc_mb1 = peak(probe, "lora", 1, True)
    # LoRA fits only with checkpointing and micro-batch 1; the user forced both off / 4
    r = resolved(model_dir, memory_gib=card_for(lora_gc_mb1), method="lora", grad_checkpointing="off", batch_size=4,
                 global_batch_size=16)
    d = decide(r)
    text = "\n".join(d.suggestions)
    assert not d.feasible and "together these fit" in text
    assert "--grad-checkpointing auto" in text


def test_decide_is_a_pure_function(model_dir):
    r = resolved(model_dir, memory_gib=12)
    assert decide(r) == decide(dataclasses.replace(r))


def test_multi_gpu_divides_the_batch_and_adds_the_ddp_buckets(model_dir):
    r = resolve(PlanRequest(model=model_dir, gpu="h100-80gb", num_gpus=4, global_batch_size=16, fit_table=False))
    assert r.strategy.name == "ddp" and r.per_gpu_batch == 4
    d = decide(r)
    assert "ddp_buckets" in {t.name for t in d.choice.terms}
    with pytest.raises(InputError, match="not divisible by 4 GPUs"):
        resolve(PlanRequest(model=model_dir, gpu="h100-80gb", num_gpus=4, global_batch_size=6, fit_table=False))
