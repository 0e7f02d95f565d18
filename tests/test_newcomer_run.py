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
