"""The names of the run's files: every name a run writes at the top of its folder, each defined once here.

Layout under plan.output_dir:
    plan.yaml         the plan this run executes (written before training starts)
    checkpoint-N/     the Trainer's checkpoints; COMPLETE marks one whose every file was written, and lists
                      each file's size and sha256 so that a damaged one is told apart and skipped
                      (executor/checkpoints.py)
    adapter/          the final PEFT adapter and tokenizer (swapped in by rename, so never half-written)
    metrics.jsonl     one JSON object per logged step
    summary.json      the run's outcome: predicted vs observed memory, tokens/s, wall time, paths
    dataset_fingerprint.json  size and sha256 of the dataset (and eval) file the run started with
    run.log           library messages the user can do nothing about (kept out of the terminal)
    memory/           `run --memory-snapshot`: each rank's allocator snapshot and what held its peak
                      (executor/memory_snapshot.py)
    launch.log, .worker-error.json, accelerate_config.yaml  a run started through accelerate's launcher
                      (ddp, fsdp): the launcher's log, a worker's one-line error, the generated config
    .loraplan-run.json  the marker: loraplan made (or was allowed to use) this folder
    .loraplan.lock    exists while a `run` holds the folder (an OS lock; its text names the holder)

Only these names are ever written or removed: the folder may hold the user's own files beside them.
"""

from __future__ import annotations

import re

PLAN_FILE = "plan.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
ADAPTER_TMP = ADAPTER_DIR + ".tmp"  # the final adapter while it is written (executor/train.py)
ADAPTER_OLD = ADAPTER_DIR + ".old"  # the previous adapter while the new one is swapped in (executor/disk.py)
FINGERPRINT_FILE = "dataset_fingerprint.json"
RUN_LOG = "run.log"
LAUNCH_LOG = "launch.log"  # accelerate's launcher's output on machine 0 (executor/launch.py)
WORKER_ERROR_FILE = ".worker-error.json"  # a worker's one-line error for `loraplan run` to print
ACCELERATE_CONFIG_FILE = "accelerate_config.yaml"  # the launcher's config generated from the plan (executor/fsdp.py)
MARKER_FILE = ".loraplan-run.json"
LOCK_FILE = ".loraplan.lock"

# What a run writes at the top of its folder, checkpoint-N/ aside (the launcher's three: ddp and fsdp runs).
LOSS_PLOT = "loss.png"  # train and eval loss (executor/plots.py)
MEMORY_PLOT = "memory.png"  # predicted against observed memory, on a GPU (executor/plots.py)
TRACKER_FILE = "tracker.json"  # the run's stable tracker name and ids, so that --resume appends (executor/trackers.py)
MEMORY_DIR = "memory"  # run --memory-snapshot's files (executor/memory_snapshot.py)
# each tracker's log folder (executor/trackers.py TRACKERS)
TRACKER_DIRS = {"tensorboard": "tensorboard", "mlflow": "mlruns", "wandb": "wandb", "trackio": "trackio"}
RUN_NAMES = (PLAN_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, ADAPTER_TMP, ADAPTER_OLD, RUN_LOG, LAUNCH_LOG,
             WORKER_ERROR_FILE, FINGERPRINT_FILE, ACCELERATE_CONFIG_FILE, LOSS_PLOT, MEMORY_PLOT, TRACKER_FILE,
             MEMORY_DIR, *TRACKER_DIRS.values())


def machine_log(machine: int) -> str:
    """Machine K's launcher log on a multi-node run (machine 0's is LAUNCH_LOG)."""
    return f"launch-machine-{machine}.log"


def machine_marker(machine: int, token: str) -> str:
    """The transient file by which machine K proves the output folder is shared (executor/worker.py)."""
    return f".machine-{machine}.{token}"


# ... and, on a multi-node run, the names above for every machine K
RUN_NAME_PATTERNS = (re.compile(r"^launch-machine-\d+\.log$"), re.compile(r"^\.machine-\d+\."))
