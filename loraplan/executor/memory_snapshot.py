"""`run --memory-snapshot`: what held the GPU's memory at a run's peak, tensor by tensor, from torch's own allocator
history (torch.cuda.memory._record_memory_history / _snapshot, the data behind https://pytorch.org/memory_viz).

Each process records the allocator's every alloc and free over the first steps it trains (`steps`, 3 by default, as
the calibration's peaks were taken over three steps), then writes, into OUT/memory/:

- `snapshot-rank{R}.pickle`: torch's snapshot (drop it on pytorch.org/memory_viz to browse it);
- `peak-rank{R}.json`: the live blocks at the peak of allocated memory, replayed from that history, grouped by the
  code that allocated them (`peak_breakdown`): the figures to hold each term of the plan's budget against.

Blocks allocated before the recording began (the weights and the adapter, loaded before training) are one line,
`before training`: memory_allocated() when it began (one of them freed during the recording still counts there). The peak is of allocated memory (what tensors hold); the
caching allocator's reserve above it and the CUDA context are in the summary's observed peak.

The flag reaches every process of the run (accelerate's workers too) as LORAPLAN_MEMORY_SNAPSHOT=steps in the
environment, set by `api.run` for the run; setting it by hand does the same. CUDA only: the CPU has no caching
allocator to record (`api.run` says so in one line before anything is written).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

from .run_files import MEMORY_DIR

ENV = "LORAPLAN_MEMORY_SNAPSHOT"
DEFAULT_STEPS = 3
MAX_ENTRIES = 2_000_000  # alloc/free events kept; three steps of a 70B layer stack stay well below
# Code whose allocations the plan's terms model: the innermost frame in one of these names a block's group.
LIBRARIES = ("loraplan", "peft", "trl", "transformers", "bitsandbytes", "accelerate", "liger_kernel", "unsloth",
             "unsloth_zoo")
NO_FRAME = "no Python frame (autograd's backward, or C++)"
BACKWARD = "autograd's backward (no library frame)"
BEFORE = "before training (weights, adapter, what loading left)"


def requested_steps() -> int:
    """How many steps this process records (0: no snapshot), from LORAPLAN_MEMORY_SNAPSHOT."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return 0
    try:
        steps = int(value)
    except ValueError:
        steps = DEFAULT_STEPS if value.lower() in ("1", "true", "yes", "on") else 0
    return max(steps, 0)


def _where(frames: list[dict]) -> str:
    """A block's group: the innermost frame in a library the plan models, else autograd's backward when the
    allocation came from it, else the innermost frame. Frames are innermost first, as torch records them; a frame
    made from a profile (torch.cuda._memory_viz._profile_to_snapshot) carries "path/file.py(line): function" as its
    name."""
    if not frames:
        return NO_FRAME
    labels = []
    for f in frames:
        filename, name = str(f.get("filename", "")), str(f.get("name", ""))
        m = re.fullmatch(r"(.+\.py)\((\d+)\): (.+)", name) if filename in ("", "none", "??") else None
        if m:
            filename, name = m.group(1), m.group(3)
        labels.append((filename.replace("\\", "/"), re.sub(r" at 0x[0-9a-fA-F]+", "", name)))
    for filename, name in labels:
        parts = filename.split("/")
        for lib in LIBRARIES:
            if lib in parts:
                return f"{'/'.join(parts[parts.index(lib):])}:{name}"
    if any("run_backward" in name or "autograd/__init__" in filename for filename, name in labels):
        return BACKWARD
    filename, name = labels[0]
    return f"{'/'.join(filename.split('/')[-2:])}:{name}" if filename not in ("", "none", "??") else name


def peak_breakdown(snapshot: dict, device: int = 0, before_bytes: int = 0, top: int = 25) -> dict[str, Any]:
    """The live blocks at the peak of allocated memory in `snapshot`'s trace for `device`, grouped by `_where`.

    The trace is replayed event by event: `alloc` adds a block, `free_completed` removes it (the allocator's own
    accounting; `free_requested` alone, for a block another stream still uses, keeps it; a trace without completion
    events counts the requests). `before_bytes` is what was
    allocated before the recording began. Returns peak_bytes (before_bytes + the trace's peak), the event index of
    the peak, the groups (largest first, with their block counts) and the largest single blocks."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    # a block is free once the allocator completes the free; a trace with no completion events counts the requests
    freed = "free_completed" if any(e.get("action") == "free_completed" for e in events) else "free_requested"

    def replay(stop: Optional[int]) -> tuple[int, int, dict]:
        live: dict[int, dict] = {}
        total = peak = 0
        peak_at = -1
        for i, e in enumerate(events):
            if stop is not None and i > stop:
                break
            action = e.get("action")
            if action == "alloc":
                live[e["addr"]] = e
                total += e["size"]
                if total > peak:
                    peak, peak_at = total, i
            elif action == freed and e["addr"] in live:
                total -= live.pop(e["addr"])["size"]
        return peak, peak_at, live

    peak, peak_at, _ = replay(None)
    _, _, live = replay(peak_at) if peak_at >= 0 else (0, -1, {})
    groups: dict[str, list[int]] = {}
    for block in live.values():
        g = groups.setdefault(_where(block.get("frames") or []), [0, 0])
        g[0] += block["size"]
        g[1] += 1
    rows = [{"where": k, "bytes": v[0], "blocks": v[1]} for k, v in groups.items()]
    if before_bytes:
        rows.append({"where": BEFORE, "bytes": before_bytes, "blocks": None})
    rows.sort(key=lambda r: -r["bytes"])
    largest = sorted(live.values(), key=lambda b: -b["size"])[:top]
    return {
        "peak_bytes": before_bytes + peak,
        "before_bytes": before_bytes,
        "trace_peak_bytes": peak,
        "peak_event": peak_at,
        "events": len(events),
        "truncated": len(events) >= MAX_ENTRIES,  # the history kept only its last MAX_ENTRIES events
        "groups": rows[:top] + ([{"where": f"{len(rows) - top} more groups",
                                  "bytes": sum(r["bytes"] for r in rows[top:]), "blocks": None}]
                                if len(rows) > top else []),
        "largest_blocks": [{"bytes": b["size"], "where": _where(b.get("frames") or [])} for b in largest],
    }


def output_paths(output_dir: str, rank: int) -> tuple[str, str]:
    folder = os.path.join(output_dir, MEMORY_DIR)
    return os.path.join(folder, f"snapshot-rank{rank}.pickle"), os.path.join(folder, f"peak-rank{rank}.json")


def recorder(output_dir: str, rank: int, steps: int):
    """The TrainerCallback that records the first `steps` steps this process trains and writes OUT/memory/ (built
    on first use: transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class MemorySnapshot(TrainerCallback):
        def __init__(self):
            self.first_step: Optional[int] = None
            self.before = 0
            self.done = False

        def on_train_begin(self, args, state, control, **kwargs):
            import torch

            self.first_step = state.global_step
            self.before = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(max_entries=MAX_ENTRIES, stacks="python")

        def on_step_end(self, args, state, control, **kwargs):
            if not self.done and self.first_step is not None and state.global_step - self.first_step >= steps:
                self.write()

        def on_train_end(self, args, state, control, **kwargs):
            if not self.done and self.first_step is not None:
                self.write()

        def write(self) -> None:
            import pickle

            import torch

            from .disk import write_json

            self.done = True
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            pickle_path, peak_path = output_paths(output_dir, rank)
            os.makedirs(os.path.dirname(pickle_path), exist_ok=True)
            tmp = pickle_path + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(snap, f)
            os.replace(tmp, pickle_path)
            breakdown = peak_breakdown(snap, torch.cuda.current_device(), self.before)
            breakdown.update(rank=rank, steps=steps, first_step=self.first_step,
                             max_allocated_bytes=torch.cuda.max_memory_allocated(),
                             max_reserved_bytes=torch.cuda.max_memory_reserved())
            write_json(peak_path, breakdown)

    return MemorySnapshot()


def read_peak(output_dir: str, rank: int = 0) -> Optional[dict]:
    """OUT/memory/peak-rank{rank}.json, or None when the run wrote none."""
    _, path = output_paths(output_dir, rank)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
