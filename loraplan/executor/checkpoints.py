"""Checkpoints of a run: which exist, which are whole (the COMPLETE manifest of every file's size and sha256),
which one a resume continues from, and their rotation. executor/run_files.py names the folder's other
files; resume.py, claim.py, folder_lock.py and disk.py hold its rules."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Optional

from loraplan.planner.planfile.io import atomic_write_text

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(output_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint-N folder, oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = CHECKPOINT_RE.match(name)
            path = os.path.join(output_dir, name)
            if m and os.path.isdir(path):
                found.append((int(m.group(1)), path, os.path.exists(os.path.join(path, COMPLETE_MARKER))))
    return sorted(found)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _checkpoint_files(checkpoint_dir: str) -> list[str]:
    """Every file of a checkpoint but its marker, as paths relative to the folder (sorted)."""
    files = []
    for root, _, names in os.walk(checkpoint_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), checkpoint_dir)
            if rel != COMPLETE_MARKER:
                files.append(rel)
    return sorted(files)


# Verdicts already reached in this process, keyed by the checkpoint's files' (name, size, mtime): resume looks a
# checkpoint up more than once (choosing it, then reporting what it skipped) and should hash it once.
_verdicts: dict[tuple, Optional[str]] = {}


def _stat_key(checkpoint_dir: str, verify_hashes: bool) -> tuple:
    entries = []
    for rel in [COMPLETE_MARKER] + _checkpoint_files(checkpoint_dir):
        st = os.stat(os.path.join(checkpoint_dir, rel))
        entries.append((rel, st.st_size, st.st_mtime_ns))
    return (os.path.abspath(checkpoint_dir), verify_hashes, tuple(entries))


def checkpoint_problem(checkpoint_dir: str, *, verify_hashes: bool = True) -> Optional[str]:
    """Why a checkpoint marked complete cannot be resumed from, or None when it can.

    The marker lists every file with its size and sha256 (written last, after all processes finished writing);
    a file missing, of another size (checked first: cheap) or with another hash means the checkpoint was damaged
    after it was marked (a truncated copy, a full disk on another machine, a hand edit). A marker from an older
    loraplan lists no files and is taken at its word."""
    try:
        key = _stat_key(checkpoint_dir, verify_hashes)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror})"
    if key in _verdicts:
        return _verdicts[key]
    verdict = _check_against_marker(checkpoint_dir, verify_hashes)
    _verdicts[key] = verdict
    return verdict


def _check_against_marker(checkpoint_dir: str, verify_hashes: bool) -> Optional[str]:
    try:
        with open(os.path.join(checkpoint_dir, COMPLETE_MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return f"its {COMPLETE_MARKER} marker is unreadable"
    listed = marker.get("files") if isinstance(marker, dict) else None
    if listed is None:
        return None  # an old-style marker: no manifest to check against
    if not isinstance(listed, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in listed.values()):
        return f"its {COMPLETE_MARKER} marker is unreadable"
    for rel, entry in listed.items():
        path = os.path.join(checkpoint_dir, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        size = os.path.getsize(path)
        if size != entry["size"]:
            return f"{rel} is {size:,} bytes, {entry['size']:,} when the checkpoint was saved"
    if verify_hashes:
        for rel, entry in listed.items():
            if file_sha256(os.path.join(checkpoint_dir, rel)) != entry["sha256"]:
                return f"{rel} does not match the sha256 recorded when the checkpoint was saved"
    return None


def resumable_checkpoint(output_dir: str, *, verify_hashes: bool = True
                         ) -> tuple[Optional[tuple[int, str]], list[tuple[int, str, str]]]:
    """The newest checkpoint marked complete whose files match its marker, and the newer ones skipped on the way
    as (step, path, why), newest first."""
    skipped = []
    for step, path, complete in reversed(checkpoints(output_dir)):
        if not complete:
            continue
        problem = checkpoint_problem(path, verify_hashes=verify_hashes)
        if problem is None:
            return (step, path), skipped
        skipped.append((step, path, problem))
    return None, skipped


def latest_complete_checkpoint(output_dir: str, *, verify_hashes: bool = True) -> Optional[tuple[int, str]]:
    return resumable_checkpoint(output_dir, verify_hashes=verify_hashes)[0]


def mark_complete(checkpoint_dir: str, step: int) -> None:
    """Write the COMPLETE marker (atomically, after every file): the step and each file's size and sha256."""
    files = {}
    for rel in _checkpoint_files(checkpoint_dir):
        path = os.path.join(checkpoint_dir, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    atomic_write_text(os.path.join(checkpoint_dir, COMPLETE_MARKER),
                      json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _verdicts[_stat_key(checkpoint_dir, True)] = None  # just hashed: resuming or reporting it needs no second pass


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete checkpoint folders without the marker: a save that was cut short. Returns what was removed."""
    removed = []
    for _, path, complete in checkpoints(output_dir):
        if not complete:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate_checkpoints(output_dir: str, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all when keep <= 0). Runs only after a new marker is written,
    so a crash mid-save never leaves the folder without a complete checkpoint."""
    if keep <= 0:
        return
    done = [path for _, path, complete in checkpoints(output_dir) if complete]
    for path in done[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
