"""How fast `plan` is: whole processes, measured in one run so the machine's noise hits both alike.

    python benchmarks/speed.py [--repeats 7]

Prints the median wall time of `loraplan plan llama-3.1-8b --gpu rtx-4090` and of `python -c "import torch"`
(the bar: plan takes at most half), then in-process times for planning the 405B model and for a sweep of the
request over every catalog card.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def wall(cmd: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    exe = shutil.which("loraplan")
    plan_cmd = [exe] if exe else [sys.executable, "-m", "loraplan.cli"]
    plan_cmd += ["plan", "llama-3.1-8b", "--gpu", "rtx-4090"]
    # interleave so drift in machine load affects both
    plan_t, torch_t = [], []
    for _ in range(args.repeats):
        plan_t.append(wall(plan_cmd, 1))
        torch_t.append(wall([sys.executable, "-c", "import torch"], 1))
    p, t = statistics.median(plan_t), statistics.median(torch_t)
    print(f"loraplan plan llama-3.1-8b --gpu rtx-4090 : {p:.3f} s (median of {args.repeats})")
    print(f'python -c "import torch"                  : {t:.3f} s (median of {args.repeats})')
    print(f"ratio plan / import torch                 : {p / t:.2f}  (bar: <= 0.50)")

    from loraplan.planner.api import PlanRequest, make_plan

    t0 = time.perf_counter()
    make_plan(PlanRequest(model="llama-3.1-405b", gpu="h200", num_gpus=8, fit_table=False))
    t1 = time.perf_counter()
    make_plan(PlanRequest(model="llama-3.1-405b", gpu="h200", num_gpus=8, fit_table=True))
    t2 = time.perf_counter()
    print(f"plan llama-3.1-405b in-process            : {1000 * (t1 - t0):.1f} ms")
    print(f"plan llama-3.1-405b + sweep of every card : {1000 * (t2 - t1):.1f} ms")


if __name__ == "__main__":
    main()
