"""Writing the run's files safely: JSON written atomically, metrics appended line by line, a folder swapped in
whole, and the one-line message of a full disk."""

from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any

from loraplan.planner.planfile import paths as plan_paths
from loraplan.planner.planfile.io import atomic_write_text

from .checkpoints import COMPLETE_MARKER, latest_complete_checkpoint
from .run_files import ADAPTER_TMP


def write_json(path: str, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path: str, row: dict) -> None:
    """Append one line and flush it to disk: the log survives a crash up to its last whole line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a crash: keep what was whole
    return rows


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Swap a fully written folder into place: old -> .old, tmp -> final, drop .old."""
    old = final_dir + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


_DISK_FULL_TEXT = ("no space left on device", "storagefull", "disk quota exceeded", "iostream error",
                   "file write failed")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC as the savers raise it: OSError errno 28 (Python, torch), safetensors' `IoError(... StorageFull)`,
    torch's C++ writer (`basic_ios::clear: iostream error`, `PytorchStreamWriter failed writing file`)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(exc).lower() for t in _DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def disk_full_message(output_dir: str, step: int) -> str:
    """One line: the disk is full, how much is free, what was being saved, which checkpoint is the last complete one.
    A half-written adapter.tmp is removed (it frees space and nothing reads it); a half-written checkpoint stays
    unmarked, so resume skips it."""
    partial = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, ADAPTER_TMP)
    if os.path.isdir(partial) and not os.path.exists(os.path.join(partial, COMPLETE_MARKER)):
        what = f"checkpoint {partial}"
    elif os.path.isdir(tmp):
        what = "the adapter"
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        what = "the run's files"
    try:
        free = format_bytes(shutil.disk_usage(output_dir).free)
    except OSError:
        free = "unknown"
    latest = latest_complete_checkpoint(output_dir)
    kept = (f"the last complete checkpoint is {latest[1]}; free some space and continue with "
            f"`{plan_paths.resume_command(output_dir)}`" if latest
            else "no checkpoint is complete yet")
    return f"the disk is full: saving {what} failed ({free} free in {output_dir}); {kept}"
