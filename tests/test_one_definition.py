"""Logic that was written twice now has one definition the others call (issue 12, 5g). Each test changes the one
definition and sees every caller follow it; before, each caller computed it again itself."""

import pytest

from loraplan.planner.facts import options
from loraplan.planner.planfile import schema as plan_module
from loraplan.planner.facts import request as request_module
from loraplan.planner.decision import suggest
from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.errors import InputError, PlanError
from loraplan.planner.decision.resolve import resolve
from loraplan.planner.plugins.strategies import Strategy


def test_the_logging_interval_of_plan_and_run_is_the_planners(monkeypatch):
    from loraplan.executor.trainer_settings import effective_logging_steps

    assert options.logging_interval(1000, 10) == 10 and options.logging_interval(30, 10) == 3 and options.logging_interval(5, 10) == 1
    assert effective_logging_steps(10, 30) == 3
    monkeypatch.setattr(options, "logging_interval", lambda steps, every=None: 7)
    assert effective_logging_steps(10, 30) == 7  # the executor calls the planner's rule
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="h200", max_steps=50, fit_table=False))
    assert res.plan.training.logging_steps == 7  # and so does the plan


def test_larger_cards_come_from_one_list(monkeypatch):
    r = resolve(PlanRequest(model="llama-3.1-8b", gpu="t4", fit_table=False))
    # usable (less the 10% margin) at least 30 GiB, larger than the t4, smallest first, four at most
    assert suggest.larger_cards(r, 30.0) == ["a100-40gb", "l40s", "rtx-a6000", "h100-80gb"]
    monkeypatch.setattr(suggest, "larger_cards", lambda r, need, most=4: ["CARD-X"])
    # suggest's advice (training does not fit a replica) ...
    res = make_plan(PlanRequest(model="llama-3.1-70b", gpu="rtx-4090", method="lora", fit_table=False))
    assert not res.feasible and any("a larger card: CARD-X" in s for s in res.suggestions)
    # ... and placement's (training fits, loading does not): a load peak past the card's usable memory. No catalog
    # request binds there since QLoRA loads shard by shard (issue 13), so the option's load is raised by hand.
    import dataclasses

    from loraplan.planner.decision import placement
    from loraplan.planner.plugins.strategies import STRATEGIES

    r = resolve(PlanRequest(model="llama-3.1-70b", gpu="rtx-4090", num_gpus=2, method="qlora",
                            strategy="fsdp-offload", host_memory="512GiB", fit_table=False))
    best = placement.evaluate(r, STRATEGIES["fsdp-offload"])
    assert best.fits
    heavy = dataclasses.replace(best, load=dataclasses.replace(best.load, gpu_gib=r.usable_gib + 10))
    advice = placement._beyond_training(r, heavy)
    assert any("load: CARD-X" in s for s in advice), advice


def test_the_per_gpu_batch_is_the_strategys(monkeypatch):
    r = resolve(PlanRequest(model="llama-3.1-8b", gpu="h100-80gb", num_gpus=4, global_batch_size=16, fit_table=False))
    assert r.per_gpu_batch == 4 == r.strategy.per_gpu_batch(16, r.hardware)
    monkeypatch.setattr(Strategy, "per_gpu_batch", lambda self, gbs, hw: 2)
    r = resolve(PlanRequest(model="llama-3.1-8b", gpu="h100-80gb", num_gpus=4, global_batch_size=16, fit_table=False))
    assert r.per_gpu_batch == 2


def test_max_seq_len_is_one_constant():
    assert plan_module.MAX_SEQ_LEN is options.MAX_SEQ_LEN and request_module.MAX_SEQ_LEN is options.MAX_SEQ_LEN
    with pytest.raises(InputError, match="at most"):
        resolve(PlanRequest(model="llama-3.1-8b", gpu="h200", seq_len=options.MAX_SEQ_LEN + 1, fit_table=False))
    p = make_plan(PlanRequest(model="qwen2.5-0.5b", gpu="h200", seq_len=2048, fit_table=False)).plan
    p.training.seq_len = options.MAX_SEQ_LEN + 1
    with pytest.raises(PlanError, match="training.seq_len"):
        p.validate()
