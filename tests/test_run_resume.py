"""Interrupt and resume: SIGINT saves a checkpoint, --resume reaches the same final step; guards on the output dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import build_plan, data_file, requires_run, subprocess_env, wait_for_file, write_plan

pytestmark = requires_run


def _run_cli(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "run", *map(str, args)], env=subprocess_env(),
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
    wait_for_file(out / "checkpoint-5" / "COMPLETE", proc, timeout=120)
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
    from loraplan.executor import checkpoints
    from loraplan.executor.resume import prepare_output_dir

    from loraplan.planner.planfile import paths as plan_paths

    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path))
    plan_paths.save(plan, str(tmp_path / "plan.yaml"))  # as run writes it: paths relative to the file
    for step in (4, 8, 12):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    checkpoints.mark_complete(str(tmp_path / "checkpoint-4"), 4)
    checkpoints.mark_complete(str(tmp_path / "checkpoint-8"), 8)
    # checkpoint-12: a save cut short (no COMPLETE marker)
    assert prepare_output_dir(plan, resume=True, overwrite=False) == (8, str(tmp_path / "checkpoint-8"))
    assert not os.path.exists(tmp_path / "checkpoint-12")


def test_rotation_keeps_the_newest_complete_checkpoints(tmp_path):
    from loraplan.executor import checkpoints

    for step in (2, 4, 6, 8):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        if step != 8:
            checkpoints.mark_complete(str(tmp_path / f"checkpoint-{step}"), step)
    checkpoints.rotate_checkpoints(str(tmp_path), keep=1)
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
    wait_for_file(out / "checkpoint-3" / "COMPLETE", proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted by signal 15" in stderr, stderr
    stopped = json.loads((out / "summary.json").read_text())["steps"]
    assert stopped < 400 and os.path.exists(out / f"checkpoint-{stopped}" / "COMPLETE")


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def _train_steps(out):
    return [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train"]


def _assert_same_adapter(a_dir, b_tensors, tol=1e-6):
    a = _adapter_tensors(a_dir)
    assert a.keys() == b_tensors.keys()
    for k in a:
        assert (a[k] - b_tensors[k]).abs().max() <= tol, k


def _make_checkpoint(folder, files: dict):
    os.makedirs(folder)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)


def test_a_damaged_checkpoint_is_told_apart_by_its_marker(tmp_path):
    from loraplan.executor import checkpoints

    for step in (2, 4):
        _make_checkpoint(tmp_path / f"checkpoint-{step}", {"adapter_model.safetensors": bytes(range(200)) * 5,
                                                          "optimizer.pt": b"x" * 300})
        checkpoints.mark_complete(str(tmp_path / f"checkpoint-{step}"), step)
    marker = json.loads((tmp_path / "checkpoint-4" / "COMPLETE").read_text())
    assert marker["step"] == 4 and marker["files"]["optimizer.pt"]["size"] == 300
    assert len(marker["files"]["adapter_model.safetensors"]["sha256"]) == 64
    assert checkpoints.resumable_checkpoint(str(tmp_path)) == ((4, str(tmp_path / "checkpoint-4")), [])

    # Same size, one byte changed: only the hash tells.
    path = tmp_path / "checkpoint-4" / "optimizer.pt"
    path.write_bytes(b"x" * 299 + b"y")
    found, skipped = checkpoints.resumable_checkpoint(str(tmp_path))
    assert found == (2, str(tmp_path / "checkpoint-2"))
    assert skipped == [(4, str(tmp_path / "checkpoint-4"),
                        "optimizer.pt does not match the sha256 recorded when the checkpoint was saved")]
    # Truncated: the size tells (without hashing).
    path.write_bytes(b"x" * 10)
    assert checkpoints.resumable_checkpoint(str(tmp_path), verify_hashes=False)[1][0][2] == \
        "optimizer.pt is 10 bytes, 300 when the checkpoint was saved"
    path.unlink()
    assert checkpoints.resumable_checkpoint(str(tmp_path))[1][0][2] == "optimizer.pt is missing"

    # A marker from before the manifest ({"step": N} only) is still taken at its word.
    (tmp_path / "checkpoint-4" / "COMPLETE").write_text('{"step": 4}\n')
    assert checkpoints.latest_complete_checkpoint(str(tmp_path)) == (4, str(tmp_path / "checkpoint-4"))


@pytest.mark.slow
def test_resume_skips_a_damaged_newest_checkpoint_and_finishes_the_same_run(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan_path = write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=8,
                                      save_steps=4, logging_steps=1, micro_batch_size=2), tmp_path / "plan.yaml")
    assert cli_run(plan_path).exit_code == 0
    ref_tensors, ref = _adapter_tensors(out / "adapter"), _summary(out)

    # The newest checkpoint, marked complete, then cut to half its size (a copy or a disk that lost its end).
    weights = out / "checkpoint-8" / "adapter_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    resumed = cli_run(plan_path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (f"skipping checkpoint {out / 'checkpoint-8'}: adapter_model.safetensors is {size // 2:,} bytes, "
            f"{size:,} when the checkpoint was saved; resuming from {out / 'checkpoint-4'} instead") in resumed.stdout

    s = _summary(out)
    assert s["resumed_from_step"] == 4 and s["steps"] == 8 == s["max_steps"]
    assert s["tokens"] == ref["tokens"]  # the whole run's tokens, not only the 4 steps trained again
    assert _train_steps(out) == list(range(1, 9))  # steps 5-8 logged once, by the resumed run
    _assert_same_adapter(out / "adapter", ref_tensors, tol=1e-4)
    # checkpoint-8 was saved again, whole, and is what the next resume would use.
    from loraplan.executor import checkpoints

    assert checkpoints.latest_complete_checkpoint(str(out)) == (8, str(out / "checkpoint-8"))


@pytest.mark.slow
def test_resume_from_the_last_step_writes_its_adapter_without_another_step(tiny_model_dir, tmp_path, cli_run):
    # 8 rows, 2 per step: 4 steps per epoch, so 7 steps end mid-epoch (where Trainer used to run an 8th step).
    out = tmp_path / "out"
    plan_path = write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=7,
                                      save_steps=7, logging_steps=1, micro_batch_size=2), tmp_path / "plan.yaml")
    assert cli_run(plan_path).exit_code == 0
    ref_tensors, ref = _adapter_tensors(out / "adapter"), _summary(out)

    # Killed (or out of disk) while saving the final adapter: checkpoint-7 is complete, adapter/ never appeared.
    import shutil

    shutil.rmtree(out / "adapter")
    resumed = cli_run(plan_path, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"checkpoint {out / 'checkpoint-7'} is the run's last step (7): writing its adapter" in resumed.stdout
    assert "7 / 7 (resumed at 7)" in resumed.stdout
    s = _summary(out)
    assert s["status"] == "completed" and s["steps"] == 7 == s["max_steps"]
    assert s["tokens"] == ref["tokens"] and s["final_loss"] == ref["final_loss"]
    assert not os.path.exists(out / "checkpoint-8") and _train_steps(out) == list(range(1, 8))
    _assert_same_adapter(out / "adapter", ref_tensors, tol=0.0)


@pytest.mark.slow
def test_a_changed_dataset_refuses_resume(tiny_model_dir, tmp_path, cli_run):
    import shutil

    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    shutil.copy(data_file("instruction.jsonl"), train)
    shutil.copy(data_file("instruction.jsonl"), evals)
    out = tmp_path / "out"
    plan_path = write_plan(build_plan(tiny_model_dir, str(train), str(out), eval_path=str(evals), max_steps=4,
                                      save_steps=2), tmp_path / "plan.yaml")
    assert cli_run(plan_path).exit_code == 0
    recorded = json.loads((out / "dataset_fingerprint.json").read_text())
    assert recorded["dataset"]["size"] == train.stat().st_size and len(recorded["dataset"]["sha256"]) == 64

    original = train.read_bytes()
    train.write_bytes(original + b'{"instruction": "Name a tree.", "output": "An oak."}\n')
    refused = cli_run(plan_path, "--resume")
    assert refused.exit_code == 2
    assert refused.stderr.strip() == (
        f"Error: cannot resume in {out}: the dataset {train} changed since the run started "
        f"({len(original):,} -> {train.stat().st_size:,} bytes); restore it, or pass --overwrite to start over "
        f"on the new file")

    train.write_bytes(original)
    text = evals.read_text()
    evals.write_text(text.replace("Red", "Rot", 1))  # same size, other contents
    refused = cli_run(plan_path, "--resume")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert f"the eval dataset {evals} changed since the run started (same size, other contents)" in refused.stderr

    assert cli_run(plan_path, "--overwrite").exit_code == 0  # starts over, and records the new file
    assert json.loads((out / "dataset_fingerprint.json").read_text())["eval_dataset"]["size"] == len(text)
    assert cli_run(plan_path, "--resume").exit_code == 0


def _rows_file(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"instruction": f"Add {i} and {i + 1}.", "output": f"{i} plus {i + 1} is {2 * i + 1}."})
                    + "\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("rows,micro_batch,steps,interval", [(36, 4, 9, 1), (40, 2, 20, 2)])
def test_a_short_run_logs_often_enough_to_see_it_learn(rows, micro_batch, steps, interval, tiny_model_dir,
                                                       tmp_path, cli_run):
    # One epoch (max_steps -1): the number of steps is known only once the dataset is loaded and batched.
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, _rows_file(tmp_path / "rows.jsonl", rows), str(out), max_steps=-1,
                      num_epochs=1.0, logging_steps=10, save_steps=100, micro_batch_size=micro_batch)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["max_steps"] == steps and s["logging_steps"] == interval
    assert _train_steps(out) == sorted({1, *range(interval, steps + 1, interval), steps})
    assert s["final_loss"] < s["first_loss"]
    assert f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}" in result.stdout
