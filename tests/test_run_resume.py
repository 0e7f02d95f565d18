"""Interrupt and resume: SIGINT saves a checkpoint, --resume reaches the same final step; guards on the output dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_plan, data_file, requires_run, subprocess_env, write_plan

pytestmark = requires_run


def _run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "executor.cli", "run", *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _adapter_tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resume_finishes_the_same_run(tiny_model_dir, tmp_path, cli_run):
    steps = 100
    common = dict(max_steps=steps, save_steps=5, logging_steps=5, save_total_limit=2, micro_batch_size=2)

    # The reference: the same plan, uninterrupted (in-process).
    ref_out = tmp_path / "ref"
    ref = cli_run(write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(ref_out), **common),
                             tmp_path / "ref.yaml"))
    assert ref.exit_code == 0, ref.output

    out = tmp_path / "out"
    plan_path = write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), **common),
                           tmp_path / "plan.yaml")
    proc = _run_cli(plan_path)
    deadline = time.time() + 120
    while not os.path.exists(out / "checkpoint-5" / "COMPLETE"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (stdout, stderr)
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("Error: interrupted by signal 2: checkpoint saved at step"), stderr
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["status"] == "interrupted" and 5 <= stopped < steps
    assert os.path.exists(out / f"checkpoint-{stopped}" / "COMPLETE")
    assert not os.path.exists(out / "adapter")

    resumed = cli_run(plan_path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps
    assert summary["resumed_from_step"] == stopped
    state = json.loads((out / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps and state["max_steps"] == steps
    logged = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]
    assert logged == [1] + list(range(5, steps + 1, 5))  # each logged step once, none lost or repeated

    # Resuming restored the optimizer, scheduler, RNG and data position: the adapter matches the uninterrupted run.
    a, b = _adapter_tensors(out / "adapter"), _adapter_tensors(ref_out / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    from executor import outputs

    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path))
    plan.save(str(tmp_path / "plan.yaml"))
    for step in (4, 8, 12):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    outputs.mark_complete(str(tmp_path / "checkpoint-4"), 4)
    outputs.mark_complete(str(tmp_path / "checkpoint-8"), 8)
    # checkpoint-12: a save cut short (no COMPLETE marker)
    assert outputs.prepare_output_dir(plan, resume=True, overwrite=False) == (8, str(tmp_path / "checkpoint-8"))
    assert not os.path.exists(tmp_path / "checkpoint-12")


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    from executor import outputs

    for step in (2, 4, 6, 8):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if step != 8:
            outputs.mark_complete(str(tmp_path / f"checkpoint-{step}"), step)
    outputs.rotate_checkpoints(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-6", "checkpoint-8"]


@pytest.mark.slow
def test_output_dir_guards(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2, save_steps=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    assert cli_run(path).exit_code == 0

    # The same plan again, without --resume or --overwrite: refused (it would mix two runs' checkpoints).
    again = cli_run(path)
    assert again.exit_code == 2 and "already holds a run of this plan" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    # Another plan into the same folder: refused, naming the difference; --overwrite replaces the run.
    other = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2, save_steps=2,
                       learning_rate=1e-3)
    other_path = write_plan(other, tmp_path / "other.yaml")
    refused = cli_run(other_path)
    assert refused.exit_code == 2 and "another plan's run" in refused.stderr and "training.learning_rate" in refused.stderr
    resumed = cli_run(other_path, "--resume")
    assert resumed.exit_code == 2 and "cannot resume" in resumed.stderr
    assert cli_run(other_path, "--overwrite").exit_code == 0

    # A changed prediction (or other bookkeeping) does not block a resume: it does not change training.
    other.prediction.per_gpu_gib = 3.0  # re-planned, still fits the 16 GiB card (an infeasible plan is refused)
    other.reasons = {"note": "re-planned"}
    done = cli_run(write_plan(other, tmp_path / "other2.yaml"), "--resume")
    assert done.exit_code == 0, done.output


@pytest.mark.slow
def test_sigterm_also_saves_a_complete_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(out), max_steps=400, save_steps=3,
                      logging_steps=3, micro_batch_size=2)
    proc = _run_cli(write_plan(plan, tmp_path / "plan.yaml"))
    deadline = time.time() + 120
    while not os.path.exists(out / "checkpoint-3" / "COMPLETE"):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted by signal 15" in stderr, stderr
    stopped = json.loads((out / "summary.json").read_text())["steps"]
    assert stopped < 400 and os.path.exists(out / f"checkpoint-{stopped}" / "COMPLETE")
