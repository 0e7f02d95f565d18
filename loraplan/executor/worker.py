"""One worker of a ddp or fsdp run: `accelerate launch ... -m loraplan.executor.worker PLAN [--resume-from CKPT]`.

Rank 0 (on machine 0) shows progress and writes the run's files; every rank trains (and, under FSDP, writes its
own checkpoint shards). A one-line error is written to the file named
by --error-file (rank 0's, or the first rank to fail) so that `loraplan run` can print it without tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from loraplan.planner.planfile import paths as plan_paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="loraplan.executor.worker")
    parser.add_argument("plan")
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--error-file", default=None)
    args = parser.parse_args(argv)
    from . import lifetime

    lifetime.bind_worker()  # die with the launcher, and never start as an orphan
    lifetime.hold_folder_lock()  # the run's folder stays locked while this process lives

    from loraplan.planner.errors import PlanError

    from .errors import RunError

    rank = int(os.environ.get("RANK", "0"))
    try:
        from .backends import backend_for

        plan = plan_paths.load(args.plan)  # its relative paths against the plan file's folder
        backend_for(plan).prepare_process()  # first, before the training stack is imported

        from rich.console import Console

        from .train import train_plan

        resume_from = args.resume_from
        if plan.hardware.num_nodes > 1:
            resume_from = _agree_across_machines(plan, resume_from)
        train_plan(plan, resume_from, console=Console() if rank == 0 else None, foreground=False)
        _shut_down_process_group()
        return 0
    except (RunError, PlanError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):  # a signal before training started: nothing new was saved
            message, code = "interrupted before training started; nothing new was saved", 130
        else:
            message = exc.message if isinstance(exc, RunError) else str(exc)
            code = exc.exit_code if isinstance(exc, RunError) else 2
        if args.error_file and (rank == 0 or not os.path.exists(args.error_file)):
            try:
                with open(args.error_file + f".{rank}", "w", encoding="utf-8") as f:
                    json.dump({"message": message, "exit_code": code, "rank": rank}, f)
                os.replace(args.error_file + f".{rank}", args.error_file)
            except OSError:
                pass
        print(f"Error (rank {rank}): {message}", file=sys.stderr)
        return code


def _agree_across_machines(plan, resume_from):
    """Multi-node: global rank 0 (machine 0, which checked the output folder) decides where to resume, and every
    machine checks that it runs the same plan and sees the same output folder. Returns machine 0's resume_from.

    The output dir must be one shared filesystem: checkpoints are written by every rank (each its shard, its RNG
    state) and read back whole by every rank on resume. Each machine's first process writes a marker file there;
    a machine that cannot see every other machine's marker refuses the run on all ranks, in one line."""
    import uuid
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    from loraplan.planner.planfile.schema import Plan

    from .errors import RunError
    from .resume import training_differences
    from .run_files import machine_marker

    # The process group the Trainer would create (TrainingArguments' PartialState, ddp_timeout 1800 s), made early.
    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=1800))
    machine = int(os.environ.get("GROUP_RANK", "0"))
    box = [uuid.uuid4().hex, resume_from, plan.to_dict()] if dist.get_rank() == 0 else [None, None, None]
    dist.broadcast_object_list(box, src=0)
    token, resume_from, main_plan = box
    diffs = training_differences(Plan.from_dict(main_plan), plan)
    problems = []
    if diffs:
        problems.append(f"machine {machine} runs another plan than machine 0 ({'; '.join(diffs[:3])}); start the "
                        f"same plan file on every machine")
    out = plan.output_dir
    marker = os.path.join(out, machine_marker(machine, token))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        os.makedirs(out, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as f:
            f.write(str(machine))
    dist.barrier()
    if not problems:
        missing = [k for k in range(plan.hardware.num_nodes)
                   if not os.path.exists(os.path.join(out, machine_marker(k, token)))]
        if missing:
            problems.append(f"the output dir {out} is not shared between the machines: machine {machine} does not see "
                            f"machine {', '.join(map(str, missing))}'s files in it; a multi-node run needs its output "
                            f"dir on a filesystem every node mounts (NFS, Lustre, ...)")
    verdicts: list = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, problems)
    dist.barrier()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and os.path.exists(marker):
        os.unlink(marker)
    for problem in (p for v in verdicts for p in v):
        raise RunError(problem)
    return resume_from


def _shut_down_process_group() -> None:
    """Leave together: a rank that exits while another still holds the gloo group open can abort in the group's
    destructor ("terminate called without an active exception"), failing a run that trained and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
