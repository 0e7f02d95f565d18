"""Worker processes through accelerate's launcher (torch.distributed underneath): one per GPU, on one node or several.

- ddp: `accelerate launch --multi_gpu ...`: every process holds a whole copy of the model.
- fsdp / fsdp-offload: `accelerate launch --config_file <output_dir>/accelerate_config.yaml ...`, the FSDP2 config
  generated from the plan (executor/fsdp.py), so the file beside the outputs is the one the run used.

Multi-node: the same `loraplan run plan.yaml` on every node, with `--machine-rank K --main-process-ip HOST
[--main-process-port P]`, or those values from SLURM (SLURM_NODEID, SLURM_JOB_NODELIST's first host) or a
torchrun-style environment (NODE_RANK, MASTER_ADDR, MASTER_PORT). accelerate's launcher starts
`hardware.num_gpus` processes on each of `hardware.num_nodes` machines and torchrun's static rendezvous joins them.

Without CUDA the same path runs CPU processes over gloo (how the tests exercise it). The launcher runs in its own
session so a terminal Ctrl-C reaches it once, forwarded by this process; the workers then save a checkpoint and stop.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Mapping, Optional

from loraplan.planner.planfile.schema import Plan

from . import run_files
from .errors import RunError, TrainingFailed
from .summary import RunSummary

DEFAULT_PORT = 29500  # torchrun's and accelerate's default rendezvous port


@dataclass(frozen=True)
class Rendezvous:
    """Where this machine stands in a multi-node run: its rank and machine 0's address (torchrun's static
    rendezvous). `source` says where the values came from, for the start line."""

    machine_rank: int = 0
    main_process_ip: Optional[str] = None
    main_process_port: Optional[int] = None
    source: str = "flags"
    timeout_s: int = 600  # how long machines other than 0 wait for it (rendezvous_wait; --rendezvous-timeout)

    @property
    def is_main_machine(self) -> bool:
        return self.machine_rank == 0


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM host list: "gpu[03-04,07],cpu1" -> "gpu03" (what `scontrol show hostnames` prints
    first; zero padding kept)."""
    depth, first = 0, ""
    for ch in nodelist.strip():
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            break
        first += ch
    m = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", first)
    if not m:
        return first
    prefix, ranges, suffix = m.groups()
    start = ranges.split(",")[0].split("-")[0]
    return prefix + start + (first_slurm_host(suffix) if "[" in suffix else suffix)


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RunError(f"{name}={value!r} in the environment is not an integer") from None


def resolve_rendezvous(plan: Plan, machine_rank: Optional[int] = None, main_process_ip: Optional[str] = None,
                       main_process_port: Optional[int] = None,
                       environ: Optional[Mapping[str, str]] = None) -> Rendezvous:
    """This machine's rank and machine 0's address: the flags, else a torchrun-style environment (NODE_RANK,
    MASTER_ADDR, MASTER_PORT), else SLURM's (SLURM_NODEID, the first host of SLURM_JOB_NODELIST). The
    environment is read only for a plan with hardware.num_nodes > 1."""
    env = os.environ if environ is None else environ
    nodes = plan.hardware.num_nodes
    if nodes == 1:
        if (machine_rank or 0) != 0 or main_process_ip:
            raise RunError("--machine-rank and --main-process-ip are for multi-node plans; this plan has "
                           "hardware.num_nodes 1")
        return Rendezvous(0, None, main_process_port, "flags")
    source = "flags"
    if machine_rank is None and _int_env(env, "NODE_RANK") is not None:
        machine_rank, source = _int_env(env, "NODE_RANK"), "NODE_RANK"
    if machine_rank is None and _int_env(env, "SLURM_NODEID") is not None:
        if (_int_env(env, "SLURM_LOCALID") or 0) != 0:
            raise RunError("SLURM started more than one `loraplan run` on this node (SLURM_LOCALID "
                           f"{env['SLURM_LOCALID']}): start one per node (srun --ntasks-per-node=1); it launches "
                           f"the node's {plan.hardware.num_gpus} processes itself")
        machine_rank, source = _int_env(env, "SLURM_NODEID"), "SLURM"
    if main_process_ip is None and env.get("MASTER_ADDR"):
        main_process_ip = env["MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if main_process_ip is None and nodelist:
        main_process_ip = first_slurm_host(nodelist)
    if main_process_port is None:
        main_process_port = _int_env(env, "MASTER_PORT") or DEFAULT_PORT
    if machine_rank is None or not main_process_ip:
        raise RunError(f"this plan runs on {nodes} nodes: start it on each with --machine-rank K (0 to {nodes - 1}) "
                       f"and --main-process-ip HOST (machine 0's address), or under SLURM (SLURM_NODEID, "
                       f"SLURM_JOB_NODELIST) or with NODE_RANK and MASTER_ADDR set")
    if not 0 <= machine_rank < nodes:
        raise RunError(f"machine rank {machine_rank} is outside this plan's {nodes} nodes (0 to {nodes - 1})")
    return Rendezvous(machine_rank, main_process_ip, main_process_port, source)



def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(plan: Plan, plan_path: str, resume_from: Optional[str], error_file: str,
                   rdzv: Rendezvous = Rendezvous(), config_path: Optional[str] = None) -> tuple[list[str], dict]:
    """The launcher's command line and environment. A sharded plan's settings are all in the config file at
    `config_path` (written by `write_fsdp_config`); a ddp plan's are flags."""
    import torch

    n = plan.hardware.num_gpus  # per node
    use_cuda = torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() < n:
        raise RunError(f"the plan needs {n} GPUs for {plan.strategy} but {torch.cuda.device_count()} are visible")
    threads = max(1, (os.cpu_count() or 1) // n) if not use_cuda else 1
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_path:
        cmd += ["--config_file", config_path]
    else:
        cmd += [
            "--multi_gpu",  # torch.distributed's launcher; on a machine without CUDA the workers join over gloo
            "--num_processes", str(plan.hardware.world_size),
            "--num_machines", str(plan.hardware.num_nodes),
            "--mixed_precision", "no",  # the Trainer sets bf16/fp16 from the plan
            "--dynamo_backend", "no",
            "--main_process_port", str(rdzv.main_process_port or _free_port()),
        ]
        if plan.hardware.num_nodes > 1:
            cmd += ["--machine_rank", str(rdzv.machine_rank), "--main_process_ip", str(rdzv.main_process_ip),
                    "--same_network"]
    if plan.hardware.num_nodes > 1:
        from .rendezvous_wait import launcher_args

        cmd += launcher_args(rdzv.timeout_s)  # the static rendezvous' TCPStore timeout
    cmd += ["--num_cpu_threads_per_process", str(threads),
            "-m", "loraplan.executor.worker", plan_path, "--error-file", error_file]
    if resume_from:
        cmd += ["--resume-from", resume_from]
    env = dict(os.environ)  # the workers import the installed `loraplan`, the same package this process runs
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return cmd, env


def write_fsdp_config(plan: Plan, path: str, plan_path: str, rdzv: Rendezvous) -> dict:
    """Generate the sharded plan's accelerate config for this machine and write it to `path`."""
    import torch

    from . import fsdp
    from .model import plan_model_dir

    port = rdzv.main_process_port or (_free_port() if plan.hardware.num_nodes == 1 else DEFAULT_PORT)
    config = fsdp.accelerate_config(
        plan, use_cuda=torch.cuda.is_available(), layer_class=fsdp.wrap_class(plan, plan_model_dir(plan)),
        machine_rank=rdzv.machine_rank, main_process_ip=rdzv.main_process_ip, main_process_port=port)
    fsdp.write_accelerate_config(config, path, plan_path)
    return config


def launch_workers(plan: Plan, resume_from: Optional[str], console=None, rdzv: Rendezvous = Rendezvous()) -> RunSummary:
    """Start this machine's worker processes and wait for them; returns the run's summary (written by global
    rank 0, on machine 0). Machine 0 keeps its files in the output dir; another machine keeps its plan copy and
    accelerate config in a temporary folder and its log as launch-machine-K.log (the output dir may be shared)."""
    from . import fsdp

    out = plan.output_dir
    summary_path = os.path.join(out, run_files.SUMMARY_FILE)
    if not rdzv.is_main_machine:  # say what this machine waits for, and not forever
        from .rendezvous_wait import wait_for_machine_0

        wait_for_machine_0(rdzv.main_process_ip, rdzv.main_process_port or DEFAULT_PORT, rdzv.timeout_s, out,
                           os.path.join(out, run_files.machine_log(rdzv.machine_rank)), console)
    if rdzv.is_main_machine:
        private = None
        plan_path = os.path.abspath(os.path.join(out, run_files.PLAN_FILE))
        log_path = os.path.join(out, run_files.LAUNCH_LOG)
        error_file = os.path.abspath(os.path.join(out, run_files.WORKER_ERROR_FILE))
        for stale in (error_file, summary_path):
            if os.path.exists(stale):
                os.unlink(stale)
    else:
        private = tempfile.mkdtemp(prefix=f"loraplan-machine-{rdzv.machine_rank}-")
        plan_path = os.path.join(private, run_files.PLAN_FILE)
        plan.save(plan_path)
        os.makedirs(out, exist_ok=True)
        log_path = os.path.join(out, run_files.machine_log(rdzv.machine_rank))
        error_file = os.path.join(private, run_files.WORKER_ERROR_FILE)
    config_path = None
    if fsdp.is_sharded(plan):
        config_dir = out if rdzv.is_main_machine else private
        config_path = os.path.abspath(os.path.join(config_dir, run_files.ACCELERATE_CONFIG_FILE))
        write_fsdp_config(plan, config_path, plan_path, rdzv)
    cmd, env = launch_command(plan, plan_path, resume_from, error_file, rdzv, config_path)
    if console is not None:
        where = (f" on machine {rdzv.machine_rank} of {plan.hardware.num_nodes} (rendezvous {rdzv.main_process_ip}:"
                 f"{rdzv.main_process_port}, from {rdzv.source})" if plan.hardware.num_nodes > 1 else "")
        config = f", config {config_path}" if config_path else ""
        console.print(f"launching {plan.hardware.num_gpus} processes (accelerate){where}{config}; their log: "
                      f"{log_path}", soft_wrap=True)
    try:
        lock_path = os.path.join(out, run_files.LOCK_FILE) if rdzv.is_main_machine else None
        code, forwarded = _run_launcher(cmd, env, log_path, lock_path)
        return _outcome(code, forwarded, error_file, summary_path, log_path, rdzv, plan)
    finally:
        if private:
            import shutil

            shutil.rmtree(private, ignore_errors=True)


def _run_launcher(cmd: list[str], env: dict, log_path: str, lock_path: Optional[str] = None) -> tuple[int, list[int]]:
    from . import lifetime  # the launcher and its workers never outlive this process

    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, env=lifetime.launcher_env(env, lock_path), stdout=None, stderr=log,
                                start_new_session=True, preexec_fn=lifetime.launcher_preexec(os.getpid()))

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
            lifetime.end_group(proc, lock_path)
    return code, forwarded


def _outcome(code: int, forwarded: list[int], error_file: str, summary_path: str, log_path: str, rdzv: Rendezvous,
             plan: Plan) -> RunSummary:
    from .errors import Interrupted

    if os.path.exists(error_file):
        with open(error_file, encoding="utf-8") as f:
            err = json.load(f)
        os.unlink(error_file)
        exc_type = {1: TrainingFailed, 130: Interrupted}.get(err.get("exit_code"), RunError)
        raise exc_type(err["message"])
    if code != 0 and forwarded:
        raise Interrupted(f"interrupted by signal {forwarded[0]} before training started; nothing new was saved")
    if code != 0:
        raise TrainingFailed(f"the training processes failed (exit {code}); see {log_path}")
    if not rdzv.is_main_machine:
        # Global rank 0 (on machine 0) wrote the summary; this machine reads it when the folder is shared.
        summary = RunSummary(status="completed", output_dir=os.path.abspath(plan.output_dir))
        if os.path.exists(summary_path):
            summary = RunSummary.read(summary_path)
        summary.machine_rank = rdzv.machine_rank
        return summary
    if not os.path.exists(summary_path):
        raise TrainingFailed(f"the training processes failed (exit {code}); see {log_path}")
    return RunSummary.read(summary_path)

