"""benchmarks/gpu_check.py without a GPU: the entry table fits the device's 9 minutes in value order, a missing
package or a missing GPU skips an entry with its reason, one failing entry does not lose the next, and --dry-run
builds every plan and run command of every entry and checks them (the savers asked for are in the plans, the plain
step's plan has the full loss, the offloads predict pinned host memory)."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from benchmarks import gpu_check
from conftest import requires_run
from benchmarks.gpu_check import ENTRIES, PROBED, CheckError, Context, Entry, Skip


def _ctx(tmp_path, **kw) -> Context:
    base = dict(work=str(tmp_path), out=str(tmp_path), dry_run=False, card_args=["--gpu", "h200"],
                imports={n: None for n in PROBED}, gpus=1, deadline=time.monotonic() + 600)
    return Context(**{**base, **kw})


def test_the_table_fits_nine_minutes_in_value_order():
    names = [e.name for e in ENTRIES]
    assert names[:2] == ["peaks", "savers"]  # peaks first, then the never-measured savers
    assert len(set(names)) == len(names)
    assert {"peaks", "savers", "recipes", "snapshots", "resume_merge", "unsloth", "fsdp_qlora_load"} <= set(names)
    one_gpu = sum(e.budget_s for e in ENTRIES if e.min_gpus == 1)
    assert one_gpu + gpu_check.PROBE_BUDGET_S <= gpu_check.TOTAL_BUDGET_S <= 9 * 60
    for e in ENTRIES:
        assert e.budget_s > 0 and e.question and set(e.needs) <= set(PROBED), e.name
    assert next(e for e in ENTRIES if e.name == "fsdp_qlora_load").min_gpus == 2
    checked = {s for s, _ in gpu_check.SAVERS_CHECKED}
    assert checked == {"offload_checkpoints", "offload_activations", "mlp_tiling", "padding_free"}


def test_missing_package_and_gpus_skip_and_a_failure_does_not_lose_the_rest(tmp_path):
    called = []

    def fails(ctx):
        called.append("fails")
        raise CheckError("the plan said otherwise")

    def passes(ctx):
        called.append("passes")
        ctx.record("one case", exit=0)

    def never(ctx):
        called.append("never")

    ctx = _ctx(tmp_path, imports={**{n: None for n in PROBED}, "liger_kernel": "ModuleNotFoundError: No module named 'liger_kernel'"})
    outcomes = gpu_check.run_entries(ctx, [
        Entry("needs_liger", 10, ("liger_kernel",), 1, "q", never),
        Entry("needs_two", 10, (), 2, "q", never),
        Entry("fails", 10, (), 1, "q", fails),
        Entry("passes", 10, (), 1, "q", passes),
    ])
    by = {o["entry"]: o for o in outcomes}
    assert called == ["fails", "passes"]
    assert by["needs_liger"]["status"] == "skipped" and "liger-kernel does not import" in by["needs_liger"]["reason"]
    assert by["needs_two"] == {**by["needs_two"], "status": "skipped", "reason": "needs 2 GPUs, this machine has 1"}
    assert by["fails"]["status"] == "failed" and "the plan said otherwise" in by["fails"]["reason"]
    assert by["passes"]["status"] == "passed"
    written = json.load(open(tmp_path / "gpu_check.json"))
    assert written == [{"entry": "passes", "case": "one case", "exit": 0, "ok": True}]


def test_a_case_that_fails_is_recorded_and_the_entry_goes_on(tmp_path):
    def two_cases(ctx):
        with ctx.case("first"):
            raise CheckError("bad plan")
        with ctx.case("second"):
            raise Skip("flash-attn does not import here")
        ctx.record("third", exit=0)

    outcome, = gpu_check.run_entries(_ctx(tmp_path), [Entry("e", 10, (), 1, "q", two_cases)])
    assert outcome["status"] == "failed" and outcome["reason"] == "first: bad plan"
    rows = json.load(open(tmp_path / "gpu_check.json"))
    assert [(r["case"], r["ok"]) for r in rows] == [("first", False), ("second", None), ("third", True)]
    assert rows[1]["skipped"] == "flash-attn does not import here"


def test_check_command_refuses_what_run_would_refuse(tmp_path):
    with pytest.raises(CheckError, match="not a run"):
        gpu_check.check_command([sys.executable, "-m", "loraplan.cli", "run", str(tmp_path / "none.yaml")],
                                str(tmp_path / "none.yaml"))


def test_card_args_follow_what_gpu_auto_reads():
    assert gpu_check.card_args_for({"name": "NVIDIA H200", "memory_gib": 139.8, "count": 1, "catalog": "h200"}) == [
        "--gpu", "h200", "--gpu-memory", "139.8GiB"]
    assert gpu_check.card_args_for({"name": "Odd card", "memory_gib": 20.0, "count": 1, "catalog": None}) == [
        "--gpu-memory", "20.0GiB"]
    assert gpu_check.card_args_for(None) == ["--gpu", gpu_check.DRY_RUN_CARD]


@requires_run  # the dry run builds the tiny tokenizer the runs would use
@pytest.mark.slow
def test_dry_run_builds_and_checks_every_plan_and_command(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main(["--dry-run", "--work-dir", str(tmp_path / "work"), "--out", str(out)]) == 0
    written = json.load(open(out / "gpu_check.json"))
    header, outcomes = written[0]["header"], written[-1]["outcomes"]
    rows = [r for r in written[1:-1]]
    assert header["dry_run"] and header["card_args"] == ["--gpu", "h200"]
    status = {o["entry"]: o["status"] for o in outcomes}
    assert status == {"peaks": "dry-run ok", "savers": "dry-run ok", "recipes": "dry-run ok",
                      "snapshots": "dry-run ok", "resume_merge": "dry-run ok", "unsloth": status["unsloth"], "fsdp_qlora_load": "dry-run ok"}
    assert status["unsloth"] in ("dry-run ok", "skipped")
    for r in rows:  # every case has a plan that fits an H200 and the command that would run it
        assert r["ok"] is None and r["command"] and 0 < r["predicted_gib"] < 139.8, r
    by = {(r["entry"], r["case"]): r for r in rows}
    assert len([r for r in rows if r["entry"] == "peaks"]) == len(gpu_check.PEAK_SHAPES)
    assert {r["method"] for r in rows if r["entry"] == "peaks"} == {"lora", "qlora"}
    for saver, _ in gpu_check.SAVERS_CHECKED:
        assert by[("savers", saver)]["savers"] == [saver]
    for saver in ("offload_checkpoints", "offload_activations"):  # the offloads pin host memory; the plan says how much
        assert by[("savers", saver)]["predicted_pinned_gib"] > 0
        assert by[("savers", saver)]["predicted_gib"] < by[("savers", "no saver (reference)")]["predicted_gib"]
    plain, trl = by[("recipes", "plain step (model's own loss)")], by[("recipes", "trl-sft (SFTTrainer, fused loss)")]
    assert plain["loss"] == "full" and trl["loss"] == "fused" and plain["predicted_gib"] > trl["predicted_gib"]
    assert by[("resume_merge", "--resume")]["command"].endswith("--resume")
    for r in rows:  # every run command's plan file was written and loads
        if r["command"].startswith("loraplan run "):
            plan_path = r["command"].split()[2].replace("$WORK", str(tmp_path / "work"))
            assert os.path.exists(plan_path), plan_path
    md = (out / "gpu_check.md").read_text()
    fsdp = next(r for r in rows if r["entry"] == "fsdp_qlora_load")  # the two-GPU plan is built and checked too
    assert fsdp["method"] == "qlora" and fsdp["loading"]
    assert "| savers | offload_checkpoints |" in md and "| fsdp_qlora_load | dry-run ok |" in md


@pytest.mark.slow
def test_the_child_steps_run_on_a_tiny_model(tiny_model_dir, tmp_path, cli_run):
    """The plain-step, adapter-diff and merge-diff children, which the GPU entries call, on the CPU: the plain
    recipe trains (its loss is finite), an adapter equals itself and differs from another run's, and the merged
    model's logits match base + adapter."""
    pytest.importorskip("peft")
    from conftest import build_plan, data_file, write_plan

    plans = {}
    for name, lr in (("a", 2e-4), ("b", 5e-3)):
        plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(tmp_path / name), max_steps=2, save_steps=2,
                          micro_batch_size=2, seq_len=32, learning_rate=lr)
        plans[name] = write_plan(plan, tmp_path / f"{name}.yaml")
        assert cli_run(plans[name]).exit_code == 0
    plain = json.loads(gpu_check._child(["--plain-step", plans["a"]], timeout=300, what="plain step"))
    assert len(plain["losses"]) == 3 and all(x == x and x > 0 for x in plain["losses"]) and plain["tokens_per_s"] > 0
    a, b = str(tmp_path / "a" / "adapter"), str(tmp_path / "b" / "adapter")
    assert float(gpu_check._child(["--adapter-diff", a, a], timeout=120, what="diff")) == 0.0
    assert float(gpu_check._child(["--adapter-diff", a, b], timeout=120, what="diff")) > 0.0
    from click.testing import CliRunner

    from loraplan.executor.cli import merge_command

    merged = tmp_path / "merged"
    assert CliRunner().invoke(merge_command, [b, "--output", str(merged), "--dtype", "fp32"], catch_exceptions=False).exit_code == 0
    assert float(gpu_check._child(["--merge-diff", tiny_model_dir, b, str(merged)], timeout=300, what="merge")) < 1e-3


@pytest.mark.slow
def test_run_kill_and_resume_as_the_entries_do(tiny_model_dir, tmp_path):
    """Context.run outside --dry-run, on a CPU plan: the run's summary is read back, the kill after a complete
    checkpoint leaves an interrupted run (exit 130), and --resume (without --overwrite) finishes it."""
    from conftest import build_plan, data_file, write_plan

    out = tmp_path / "run"
    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(out), max_steps=30, save_steps=2, logging_steps=2,
                      micro_batch_size=2, seq_len=32)
    path = write_plan(plan, tmp_path / "plan.yaml")
    ctx = _ctx(tmp_path, card_args=["--gpu", "cpu"])
    ctx.entry_deadline = time.monotonic() + 300
    assert ctx.run_command(path)[-1] == "--overwrite"
    killed = ctx.run(path, interrupt_after=str(out / "checkpoint-2" / "COMPLETE"))
    assert killed["exit"] == 130 and killed["status"] == "interrupted" and 2 <= killed["steps"] < 30, killed
    resumed = ctx.run(path, "--resume")
    assert resumed["exit"] == 0 and resumed["status"] == "completed" and resumed["steps"] == 30, resumed
    assert resumed["command"].endswith("--resume") and "--overwrite" not in resumed["command"]
    assert resumed["observed_gib"] is None and os.path.isdir(resumed["adapter_dir"])  # no GPU: no peak to observe
