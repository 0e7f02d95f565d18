"""Issue 17, the executor's side: what a newcomer and an adversarial tester found in `loraplan run` and `merge`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_plan, data_file, one_line_error, requires_run, subprocess_env, wait_for_file, write_plan


def _run_cli(*args, cwd=None):
    return subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "run", *map(str, args)],
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc/<pid>/task/*/children (psutil need not be installed)."""
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for k in kids:
                if k not in found:
                    found.add(k)
                    todo.append(k)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that does not reap it counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- item 1: kill -9 of `loraplan run` itself --------------------------------------------------------------------

@requires_run
@pytest.mark.slow
def test_kill_9_of_the_run_takes_its_workers_with_it_and_resume_finishes(tiny_model_dir, tmp_path, cli_run):
    from loraplan.executor.lifetime import lock_holders

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), strategy="ddp", num_gpus=2,
                      micro_batch_size=2, max_steps=60, save_steps=2, logging_steps=2, save_total_limit=2)
    path = write_plan(plan, tmp_path / "plan.yaml")
    proc = _run_cli(path)
    wait_for_file(out / "checkpoint-2" / "COMPLETE", proc, timeout=240)
    tree = _descendants(proc.pid)
    lock = str(out / ".loraplan.lock")
    workers = set(lock_holders(lock))
    assert len(workers) == 2 and workers <= tree, (workers, tree)  # each worker holds the folder's lock
    # a second run is refused while they train
    refused = cli_run(path, "--resume")
    assert refused.exit_code == 2 and "in use" in refused.stderr, refused.stderr

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline:
        holders = lock_holders(lock)
        alive = [p for p in tree if _alive(p)]
        if not holders:
            assert not alive, f"the lock is free while processes of the run live: {alive}"
            break
        time.sleep(0.02)
    assert not [p for p in tree if _alive(p)], "the run's processes outlived it"
    assert not lock_holders(lock)
    stopped = max(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")
                  and os.path.exists(out / n / "COMPLETE"))
    time.sleep(1.0)  # nothing writes there any more: no new checkpoint appears
    assert stopped == max(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-")
                          and os.path.exists(out / n / "COMPLETE"))

    done = cli_run(path, "--resume")
    assert done.exit_code == 0, done.output + (out / "launch.log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60 and summary["resumed_from_step"] >= 2


# --- item 3: every plan field checked at load against one definition -----------------------------------------------

def test_lr_schedulers_are_transformers_scheduler_types():
    pytest.importorskip("transformers")
    from transformers.trainer_utils import SchedulerType

    from loraplan.planner.options import LR_SCHEDULERS

    assert list(LR_SCHEDULERS) == [s.value for s in SchedulerType]


def test_attn_implementations_are_transformers_own():
    pytest.importorskip("transformers")
    from transformers import AttentionInterface

    from loraplan.planner.options import ATTN_IMPLEMENTATIONS

    known = set(AttentionInterface._global_mapping) | {"eager"}
    assert set(ATTN_IMPLEMENTATIONS) <= known


@pytest.mark.parametrize("section, field, value, fragment", [
    ("training", "lr_scheduler", "warp", "training.lr_scheduler must be linear, cosine"),
    ("lora", "task_type", "SEQ_CLS", "lora.task_type must be CAUSAL_LM, not 'SEQ_CLS'"),
    ("training", "attn_implementation", "flash", "training.attn_implementation must be eager, sdpa"),
    ("lora", "bias", "some", "lora.bias must be none, all or lora_only"),
    ("quantization", "quant_type", "int4", "quantization.quant_type must be nf4 or fp4"),
    ("quantization", "compute_dtype", "fp8", "quantization.compute_dtype must be"),
    ("model", "source", "web", "model.source must be catalog"),
    ("model", "family", "", "model.family must be a non-empty string"),
    ("distributed", "quant_storage", "int8", "distributed.quant_storage must be"),
    ("distributed", "wrap_class", "Llama Layer", "distributed.wrap_class must be a class name"),
])
def test_a_hand_edited_field_is_refused_at_load_in_one_line(tmp_path, section, field, value, fragment):
    import yaml
    from click.testing import CliRunner

    from loraplan.executor.cli import run_command

    plan = build_plan(str(tmp_path / "model"), data_file("instruction.jsonl"), str(tmp_path / "out"))
    data = plan.to_dict()
    data[section][field] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(run_command, [str(path)], catch_exceptions=False)
    one_line_error(result, 2, fragment)
    assert not (tmp_path / "out").exists()
