"""The memory savers (planner/plugins/savers.py): each term by hand, the decision that takes the cheapest savers that fit,
the host memory check, the one-line errors, the plan file, and `run` applying exactly the planned savers."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import yaml
from click.testing import CliRunner

from conftest import build_plan, data_file, requires_run, write_plan
from loraplan.cli import main
from loraplan.planner.decision import rules
from loraplan.planner.memory import terms as memory
from loraplan.planner.plugins import savers as saver_table
from loraplan.planner.speed import throughput
from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.errors import InputError, PlanError
from loraplan.planner.decision.placement import decide
from loraplan.planner.planfile.schema import Plan, Savers
from loraplan.planner.decision.resolve import resolve
from loraplan.planner.decision.saver_effects import saver_effects
from loraplan.tables import TABLES_DIR

FIT = yaml.safe_load((TABLES_DIR / "memory.yaml").read_text())["fitted"]
SAVER_TABLE = yaml.safe_load((TABLES_DIR / "savers.yaml").read_text())
L, h, i = 32, 4096, 14336  # llama-3.1-8b


def resolved(seq_len=32768, **kw):
    req = dict(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=seq_len, batch_size=1,
               host_memory="64GiB", fit_table=False)
    req.update(kw)
    return resolve(PlanRequest(**req))


def terms(c: rules.Choice) -> dict[str, float]:
    return {t.name: t.bytes for t in c.terms}


# ------------------------------------------------------------------------------------------------- terms


def test_offloading_moves_exactly_the_checkpointed_inputs_and_pins_power_of_two_blocks():
    r = resolved()
    T = 32768
    plain = terms(rules.candidate(r, "qlora", 1, True))
    for name, k in (("offload_checkpoints", 1), ("offload_activations", 2)):
        c = rules.candidate(r, "qlora", 1, True, saver_table.SaverSet.of(name))
        t = terms(c)
        assert plain["checkpointed_inputs"] == pytest.approx(2 * L * h * T)
        assert t["checkpointed_inputs"] == 0  # all a layer keeps across the forward moves (saved-tensor counts)
        # the allocator's reserve around resident checkpoints follows them: L of them, then k
        extra = FIT["checkpoint_extra_bytes"]
        assert plain["allocator_reserve"] - t["allocator_reserve"] == pytest.approx(extra * (L - k) * h * T)
        assert t["offload_resident"] == k * 2 * h * T == SAVER_TABLE["savers"][name]["resident_inputs"] * 2 * h * T
        block = 2 * h * T  # 256 MiB: a power of two already
        assert c.host_gib * 2**30 == L * 2 ** math.ceil(math.log2(block))
    # one token more and torch's pinned allocator rounds each block up to the next power of two
    r2 = resolved(seq_len=T + 256)
    c2 = rules.candidate(r2, "qlora", 1, True, saver_table.SaverSet.of("offload_checkpoints"))
    assert c2.host_gib == pytest.approx(2 * L * 2 * h * T / 2**30)


def test_layer_checkpointing_keeps_the_other_layers_activations():
    r = resolved(seq_len=2048)
    s = rules.shape(r, "qlora", 1, True, savers=saver_table.SaverSet.of("layer_checkpointing", every_n_layers=4))
    full = rules.shape(r, "qlora", 1, True)
    assert memory.checkpointed_layers(r.arch, s) == 8
    x = memory.layer_activation_bytes_per_token(r.arch, 2048)
    scale = FIT["activation_scale"]  # the layers that keep theirs: the forward's scale, both recipes
    kept = (1 - FIT["reserve_share_of_activations"]) * scale * x * (L - 8) * 2048
    assert memory.activations_bytes(r.arch, s) - memory.activations_bytes(r.arch, full) == pytest.approx(kept)
    assert memory.checkpointed_inputs_bytes(r.arch, s) == pytest.approx(memory.checkpointed_inputs_bytes(r.arch, full) / 4)
    # and it is faster: a quarter of the layers recomputed
    assert throughput.flops_per_token(r.arch, s) < throughput.flops_per_token(r.arch, full)


def test_mlp_tiling_replaces_the_mlp_share_of_the_working_set_by_one_tile():
    r = resolved()
    plain = terms(rules.candidate(r, "qlora", 1, True))
    tiled = terms(rules.candidate(r, "qlora", 1, True, saver_table.SaverSet.of("mlp_tiling")))
    rho, s = FIT["reserve_share_of_activations"], FIT["fused_activation_scale"] + FIT["recompute_scale"]
    assert plain["activations"] - tiled["activations"] == pytest.approx((1 - rho) * s * (2 * h + 9 * i + 6 * 16) * 32768)
    tile_tokens = 32768 // 8  # shards = ceil(32768 / 4096) = 8 (Liger's default)
    assert tiled["mlp_tile"] == pytest.approx(s * (6 * h + 9 * i + 6 * 16) * tile_tokens)  # 6 i + LoRA of gate, up, down


# ---------------------------------------------------------------------------------------------- decision


def test_a_fixed_length_without_savers_plans_as_before():
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", fit_table=False))
    assert res.plan.savers == Savers() and "savers" not in res.plan.reasons and not res.host_terms
    assert "offload" not in json.dumps(res.to_json()["memory"])


def test_savers_only_when_needed_cheapest_first_and_said_why():
    # 16k fits a 4090 without savers: none are used even when allowed
    fits = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=16384, batch_size=1,
                                 savers="auto", host_memory="64GiB", fit_table=False))
    assert fits.feasible and fits.plan.savers.names == [] and "none needed" in fits.plan.reasons["savers"]
    # 32k does not: the offload (a fraction of a percent slower) comes before the tiled MLP (~10 %)
    r = resolved(savers="auto")
    d = decide(r)
    assert d.feasible and d.choice.savers.names == ("offload_checkpoints",)
    assert "nothing fits without savers" in d.reasons["savers"] and "slower" in d.reasons["savers"]
    assert "pinned host memory" in d.reasons["savers"]
    # 56k needs both
    d = decide(resolved(seq_len=57344, savers="auto"))
    assert d.feasible and set(d.choice.savers.names) == {"offload_checkpoints", "mlp_tiling"}
    effects = {e.name: e for e in saver_effects(resolved(seq_len=57344, savers="auto"), d.choice)}
    assert effects["offload_checkpoints"].gib_saved > 0 and effects["offload_checkpoints"].host_gib > 0
    assert effects["mlp_tiling"].gib_saved > 0 and effects["mlp_tiling"].slowdown > effects["offload_checkpoints"].slowdown


def test_the_host_limits_the_offload_and_the_plan_refuses_what_it_cannot_pin():
    # offload forced on, 32k tokens pin 8 GiB: a 12 GiB host (7.2 GiB usable) cannot
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=32768, batch_size=1,
                                savers="offload-checkpoints", host_memory="12GiB", fit_table=False))
    assert not res.feasible and not res.plan.fits()  # `run` refuses it unless --force
    assert res.plan.savers.pinned_host_gib == pytest.approx(8.0)
    assert res.per_gpu_gib <= res.usable_gib  # the card holds it: the host is what is short, and it says so
    assert "pins 8.0 GiB of host memory" in res.suggestions[0] and "0.8 GiB short" in res.suggestions[0]
    assert any("--host-memory" in s for s in res.suggestions)
    assert "over the 7.2 GiB usable" in res.plan.reasons["savers"]
    ok = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=32768, batch_size=1,
                               savers="offload-checkpoints", host_memory="16GiB", fit_table=False))
    assert ok.feasible and ok.plan.fits() and "offload_checkpoints" in ok.plan.savers.on and ok.plan.savers.host_memory_gib == 16.0


def test_layer_checkpointing_gives_room_back_for_speed():
    r = resolve(PlanRequest(model="llama-3.1-8b", gpu="h100-80gb", method="qlora", seq_len=4096, batch_size=1,
                            grad_checkpointing="on", savers="layer-checkpointing=auto", fit_table=False))
    d = decide(r)
    assert d.feasible and d.choice.savers.every_n_layers > 1 and "faster" in d.reasons["savers"]
    assert d.choice.peak_gib <= r.usable_gib


def test_suggestions_name_the_savers_when_they_would_fit():
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=32768, batch_size=1,
                                host_memory="64GiB", fit_table=False))
    assert not res.feasible
    assert any("--savers auto" in s and "fits" in s for s in res.suggestions)


@pytest.mark.parametrize("kw, message", [
    (dict(gpu="cpu", savers="offload-checkpoints"), "nothing to offload on the CPU"),
    (dict(savers="offload-checkpoints,offload-activations"), "offload the same tensors"),
    (dict(savers="offload-checkpoints", grad_checkpointing="off"), "needs gradient checkpointing"),
    (dict(savers="frobnicate"), "unknown saver 'frobnicate'"),
    (dict(savers="mlp-tiling=maybe"), "the mode must be auto, on or off"),
    (dict(model="qwen3-30b-a3b", savers="mlp-tiling"), "dense gated MLP"),
    (dict(model="gemma-2-9b", savers="padding-free"), "eager"),
    (dict(host_memory="lots"), "cannot read memory size"),
])
def test_bad_saver_requests_are_one_line_errors(kw, message):
    req = dict(model="llama-3.1-8b", gpu="rtx-4090", fit_table=False)
    req.update(kw)
    with pytest.raises(InputError, match=message):
        make_plan(PlanRequest(**req))


def test_cli_bad_savers_exit_2_with_one_line():
    out = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--savers", "frobnicate"])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "unknown saver" in out.output


# ---------------------------------------------------------------------------------------------- plan file


def test_the_plan_file_carries_the_savers_and_old_files_still_load(tmp_path):
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=57344, batch_size=1,
                                savers="auto", host_memory="64GiB", fit_table=False))
    path = tmp_path / "plan.yaml"
    res.plan.save(str(path))
    back = Plan.load(str(path))
    assert back == res.plan and {"offload_checkpoints", "mlp_tiling"} <= set(back.savers.on)
    data = yaml.safe_load(path.read_text())
    del data["savers"]  # a plan written before savers existed
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(data))
    assert Plan.load(str(old)).savers == Savers()
    # a version-1 file: one boolean per saver, read as the names of those set true
    data["version"] = 1
    data["savers"] = {"every_n_layers": 1, "offload_checkpoints": True, "offload_activations": False,
                      "mlp_tiling": True, "padding_free": False, "pinned_host_gib": 1.5, "host_memory_gib": 64.0}
    old.write_text(yaml.safe_dump(data))
    v1 = Plan.load(str(old))
    assert v1.savers.on == ["offload_checkpoints", "mlp_tiling"] and v1.savers.pinned_host_gib == 1.5
    assert v1.version == 2 and Plan.from_dict(v1.to_dict()) == v1


@pytest.mark.parametrize("edit, message", [
    (dict(on=["offload_checkpoints", "offload_activations"]), "offload the same tensors"),
    (dict(every_n_layers=0), "savers.every_n_layers must be at least 1"),
    (dict(every_n_layers=2), "contradicts savers.on: layer_checkpointing is on exactly when"),
    (dict(on=["offload_checkpoints", "frobnicate"]), "savers.on must be"),
    (dict(on=["padding_free"]), "padding_free needs training.packing"),
    (dict(pinned_host_gib=-1.0), "savers.pinned_host_gib must be >= 0"),
])
def test_plan_validation_of_the_savers(edit, message):
    res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", method="qlora", seq_len=32768, batch_size=1,
                                savers="auto", host_memory="64GiB", fit_table=False))
    plan = dataclasses.replace(res.plan, savers=dataclasses.replace(res.plan.savers, **edit))
    with pytest.raises(PlanError, match=message):
        plan.validate()
    no_ckpt = dataclasses.replace(res.plan, training=dataclasses.replace(res.plan.training, grad_checkpointing=False))
    with pytest.raises(PlanError, match="needs training.grad_checkpointing"):
        no_ckpt.validate()


def test_unmet_requirements_say_what_the_machine_lacks_in_one_line():
    assert saver_table.unmet_requirements([], False, lambda m: False) is None
    assert "needs a CUDA GPU" in saver_table.unmet_requirements(["offload_checkpoints"], False, lambda m: True)
    why = saver_table.unmet_requirements(["mlp_tiling"], True, lambda m: False)
    assert "liger_kernel" in why and "pip install liger-kernel" in why and "\n" not in why
    assert "flash_attn" in saver_table.unmet_requirements(["padding_free"], True, lambda m: m != "flash_attn")
    assert saver_table.unmet_requirements(["layer_checkpointing"], False, lambda m: False) is None  # runs anywhere


# ---------------------------------------------------------------------------------------------- run


def _cpu_plan(model_dir, out, **savers):
    plan = build_plan(model_dir, data_file("instruction.jsonl"), str(out), grad_checkpointing=True, max_steps=8,
                      logging_steps=1, save_steps=100)
    every = savers.pop("every_n_layers", 1)
    plan.savers = dataclasses.replace(plan.savers, on=[n for n, on in savers.items() if on]
                                      + (["layer_checkpointing"] if every > 1 else []), every_n_layers=every)
    plan.validate()
    return plan


@requires_run
def test_each_saver_reaches_the_trainer_as_planned(tiny_model_dir, tmp_path):
    from loraplan.executor.device import Placement
    from loraplan.executor.trainer_settings import checkpointing_kwargs, sft_config

    place = Placement(1, 0, 0, False)
    plain = _cpu_plan(tiny_model_dir, tmp_path / "a")
    assert checkpointing_kwargs(plain) == {"use_reentrant": False}
    cfg = sft_config(_cpu_plan(tiny_model_dir, tmp_path / "b", every_n_layers=2, offload_checkpoints=True), place, False)
    assert cfg.activation_checkpointing_kwargs == {"use_reentrant": False, "every_n_layers": 2, "offload": True}
    assert not cfg.activation_offloading and not cfg.padding_free
    cfg = sft_config(_cpu_plan(tiny_model_dir, tmp_path / "c", offload_activations=True), place, False)
    assert cfg.activation_offloading is True and "offload" not in cfg.activation_checkpointing_kwargs
    pf = _cpu_plan(tiny_model_dir, tmp_path / "d")
    pf.training.packing, pf.training.attn_implementation = True, "flash_attention_2"
    pf.savers.on = ["padding_free"]
    pf.validate()
    cfg = sft_config(pf, place, False)
    assert cfg.packing and cfg.padding_free


@requires_run
def test_layer_checkpointing_checkpoints_every_nth_layer_in_the_trainer(tiny_model_dir, tmp_path):
    """The trainer built from the plan's SFTConfig marks layers 0, 2, ... as checkpointed, the others not."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from loraplan.executor.data import prepare_datasets
    from loraplan.executor.backends.hf import load_base_model, load_tokenizer, wrap_lora
    from loraplan.executor.device import Placement
    from loraplan.executor.plan_trainer import PlanTrainer
    from loraplan.executor.trainer_settings import sft_config

    for every, expected in ((1, [True, True]), (2, [True, False])):
        plan = _cpu_plan(tiny_model_dir, tmp_path / f"out{every}", every_n_layers=every)
        plan.training.max_steps = 1  # transformers turns checkpointing on in Trainer.train()
        tok = load_tokenizer(tiny_model_dir, False)
        train_ds, _, _, _ = prepare_datasets(plan, tok)
        model = wrap_lora(plan, load_base_model(plan, tiny_model_dir))
        trainer = PlanTrainer(model=model, args=sft_config(plan, Placement(1, 0, 0, False), False),
                              train_dataset=train_ds, processing_class=tok, plan_loss="fused", keep_checkpoints=2)
        trainer.train()
        flags = [m.gradient_checkpointing for m in trainer.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == expected


@requires_run
@pytest.mark.slow
def test_layer_checkpointing_trains_to_the_same_losses(tiny_model_dir, tmp_path, cli_run):
    """Checkpointing every 2nd layer recomputes fewer layers; the arithmetic is the same, so are the losses."""
    losses = {}
    for name, savers in (("all", {}), ("every2", {"every_n_layers": 2})):
        out = tmp_path / name
        result = cli_run(write_plan(_cpu_plan(tiny_model_dir, out, **savers), tmp_path / f"{name}.yaml"))
        assert result.exit_code == 0, result.output
        with open(out / "metrics.jsonl", encoding="utf-8") as f:
            losses[name] = [json.loads(line)["loss"] for line in f if '"train"' in line]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["savers"] == (["layer_checkpointing"] if savers else [])
        assert summary["host_peak_gib"] > 0 and summary["observed_host_pinned_gib"] is None
        assert "host memory" in result.output
    assert len(losses["all"]) == len(losses["every2"]) >= 8
    assert losses["every2"] == pytest.approx(losses["all"], rel=1e-4)


@requires_run
@pytest.mark.parametrize("savers, message", [
    (dict(offload_checkpoints=True), "the plan's saver offload_checkpoints needs a CUDA GPU"),
    (dict(offload_activations=True), "the plan's saver offload_activations needs a CUDA GPU"),
    (dict(mlp_tiling=True), "the plan's saver mlp_tiling needs a CUDA GPU"),
])
def test_run_refuses_savers_this_machine_cannot_apply(savers, message, tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    result = cli_run(write_plan(_cpu_plan(tiny_model_dir, out, **savers), tmp_path / "plan.yaml"))
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not os.path.exists(out)  # refused before anything was written
