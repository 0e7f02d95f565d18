"""Data-parallel launch: one worker process per GPU through accelerate's launcher (torch.distributed underneath).

Without CUDA the same path runs CPU processes over gloo (how the tests exercise it). The launcher runs in its own
session so a terminal Ctrl-C reaches it once, forwarded by this process; the workers then save a checkpoint and stop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from typing import Optional

from planner.plan import Plan

from . import outputs
from .errors import RunError, TrainingFailed

LAUNCH_LOG = "launch.log"
ERROR_FILE = ".worker-error.json"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(plan: Plan, plan_path: str, resume_from: Optional[str], error_file: str) -> tuple[list[str], dict]:
    import torch

    n = plan.hardware.num_gpus
    use_cuda = torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() < n:
        raise RunError(f"the plan needs {n} GPUs for ddp but {torch.cuda.device_count()} are visible")
    threads = max(1, (os.cpu_count() or 1) // n) if not use_cuda else 1
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",  # torch.distributed's launcher; on a machine without CUDA the workers join over gloo
        "--num_processes", str(n),
        "--num_machines", "1",
        "--mixed_precision", "no",  # the Trainer sets bf16/fp16 from the plan
        "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "--num_cpu_threads_per_process", str(threads),
        "-m", "executor.worker", plan_path, "--error-file", error_file,
    ]
    if resume_from:
        cmd += ["--resume-from", resume_from]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # so `-m executor.worker` imports this tree
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cmd, env


def launch_ddp(plan: Plan, resume_from: Optional[str], console=None) -> dict:
    out = plan.output_dir
    plan_path = os.path.abspath(os.path.join(out, outputs.PLAN_FILE))
    error_file = os.path.abspath(os.path.join(out, ERROR_FILE))
    summary_path = os.path.join(out, outputs.SUMMARY_FILE)
    for stale in (error_file, summary_path):
        if os.path.exists(stale):
            os.unlink(stale)
    cmd, env = launch_command(plan, plan_path, resume_from, error_file)
    log_path = os.path.join(out, LAUNCH_LOG)
    if console is not None:
        console.print(f"launching {plan.hardware.num_gpus} processes (accelerate); their log: {log_path}")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=None, stderr=log, start_new_session=True)

        forwarded: list[int] = []

        def forward(signum, frame):
            forwarded.append(signum)
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = proc.wait()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
    if os.path.exists(error_file):
        with open(error_file, encoding="utf-8") as f:
            err = json.load(f)
        os.unlink(error_file)
        exc_type = {1: TrainingFailed}.get(err.get("exit_code"), RunError)
        if err.get("exit_code") == 130:
            from .errors import Interrupted

            exc_type = Interrupted
        raise exc_type(err["message"])
    if code != 0 and forwarded:
        from .errors import Interrupted

        raise Interrupted(f"interrupted by signal {forwarded[0]} before training started; nothing new was saved")
    if code != 0 or not os.path.exists(summary_path):
        raise TrainingFailed(f"the training processes failed (exit {code}); see {log_path}")
    with open(summary_path, encoding="utf-8") as f:
        return json.load(f)
