"""One data-parallel worker: `accelerate launch ... -m executor.worker PLAN [--resume-from CKPT]`.

Rank 0 shows progress and writes the run's files; every rank trains. A one-line error is written to the file named
by --error-file (rank 0's, or the first rank to fail) so that `loraplan run` can print it without tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="executor.worker")
    parser.add_argument("plan")
    parser.add_argument("--resume-from", default=None)
    parser.add_argument("--error-file", default=None)
    args = parser.parse_args(argv)

    from planner.errors import PlanError
    from planner.plan import Plan

    from .errors import RunError

    rank = int(os.environ.get("RANK", "0"))
    try:
        from rich.console import Console

        from .train import train_plan

        plan = Plan.load(args.plan)
        train_plan(plan, args.resume_from, console=Console() if rank == 0 else None, foreground=False)
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


def _shut_down_process_group() -> None:
    """Leave together: a rank that exits while another still holds the gloo group open can abort in the group's
    destructor ("terminate called without an active exception"), failing a run that trained and saved."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
