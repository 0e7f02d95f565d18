"""The run's folder: what is in it, whether a run may start there, and which checkpoint to resume from.

Layout under plan.output_dir:
    plan.yaml         the plan this run executes (written before training starts)
    checkpoint-N/     the Trainer's checkpoints; COMPLETE marks one whose every file was written, and lists
                      each file's size and sha256 so that a damaged one is told apart and skipped
    adapter/          the final PEFT adapter and tokenizer (swapped in by rename, so never half-written)
    metrics.jsonl     one JSON object per logged step
    summary.json      the run's outcome: predicted vs observed memory, tokens/s, wall time, paths
    dataset_fingerprint.json  size and sha256 of the dataset (and eval) file the run started with
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Any, Optional

from planner.errors import PlanError
from planner.plan import Plan, atomic_write_text

from .errors import RunError

PLAN_FILE = "plan.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
COMPLETE_MARKER = "COMPLETE"
FINGERPRINT_FILE = "dataset_fingerprint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Plan fields that do not change what is trained (the estimate, the explanation, bookkeeping, where logs go):
# a resumed run may differ from the original in these and nothing else.
IGNORED_FOR_RESUME = (
    "prediction",
    "reasons",
    "assumptions",
    "output_dir",
    "model.name",
    "model.source",
    "hardware.gpu",
    "hardware.gpu_name",
    "hardware.memory_gib",
    "hardware.peak_bf16_tflops",
    "hardware.bandwidth_gbs",
    "dataset.rows",
    "dataset.tokens_total",
    "dataset.mean_tokens_per_row",
    "training.logging_steps",
    "training.save_steps",
    "training.save_total_limit",
)


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


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: data}


def training_differences(a: Plan, b: Plan) -> list[str]:
    """Fields (dotted names) where two plans differ in a way that changes training."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    ignored = lambda k: any(k == i or k.startswith(i + ".") for i in IGNORED_FOR_RESUME)  # noqa: E731
    keys = sorted(k for k in set(fa) | set(fb) if not ignored(k))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in keys if fa.get(k) != fb.get(k)]


def checkpoints(output_dir: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) for every checkpoint-N folder, oldest first."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            m = _CHECKPOINT_RE.match(name)
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
    write_json(os.path.join(checkpoint_dir, COMPLETE_MARKER), {"step": step, "files": files})
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


def _holds_run(output_dir: str) -> bool:
    return bool(checkpoints(output_dir)) or os.path.isdir(os.path.join(output_dir, ADAPTER_DIR))


def prepare_output_dir(plan: Plan, *, resume: bool, overwrite: bool) -> Optional[tuple[int, str]]:
    """Check the output folder against this plan and get it ready. Returns the checkpoint to resume from, if any.

    - empty or absent: a fresh run.
    - holds a run of another plan: refused, unless --overwrite (which removes that run's files).
    - holds a run of this plan: --resume continues it, --overwrite starts over, neither is refused.
    """
    out = plan.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"output dir {out} exists and is not a directory")
    saved_path = os.path.join(out, PLAN_FILE)
    if overwrite:
        clear_run(out)
        return None
    if not _holds_run(out):
        return None  # nothing trained here yet (at most a plan.yaml from a run that failed to start)
    saved: Optional[Plan] = None
    if os.path.exists(saved_path):
        try:
            saved = Plan.load(saved_path)
        except PlanError as exc:
            raise RunError(f"output dir {out} holds a run with an unreadable plan.yaml ({exc}); "
                           f"pass --overwrite to replace it") from None
    if saved is None:
        raise RunError(f"output dir {out} holds checkpoints or an adapter but no plan.yaml; "
                       f"pass --overwrite to replace them")
    diffs = training_differences(saved, plan)
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        what = "cannot resume" if resume else "output dir holds another plan's run"
        raise RunError(f"{what} in {out}: the plan differs from the one its run came from ({shown}); "
                       f"use another --output-dir or pass --overwrite")
    if not resume:
        raise RunError(f"output dir {out} already holds a run of this plan; pass --resume to continue it "
                       f"or --overwrite to start over")
    remove_incomplete_checkpoints(out)
    return latest_complete_checkpoint(out)


def clear_run(output_dir: str) -> None:
    """Remove what a run writes (and nothing else the user may keep in the folder)."""
    for _, path, _ in checkpoints(output_dir):
        shutil.rmtree(path, ignore_errors=True)
    for name in (ADAPTER_DIR, ADAPTER_DIR + ".tmp", ADAPTER_DIR + ".old"):
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    for name in (PLAN_FILE, METRICS_FILE, SUMMARY_FILE, "README.md", "launch.log", ".worker-error.json"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            os.unlink(path)


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Swap a fully written folder into place: old -> .old, tmp -> final, drop .old."""
    old = final_dir + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final_dir):
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def _fingerprint(path: str) -> dict:
    return {"path": path, "size": os.path.getsize(path), "sha256": file_sha256(path)}


def check_and_record_datasets(plan: Plan, *, resuming: bool) -> None:
    """Record the size and sha256 of the dataset (and eval) file a run starts with; on resume, refuse when one
    differs from what the run started with (its remaining steps would train on other rows than the first ones,
    and the data position restored from the checkpoint would point into another file)."""
    out = plan.output_dir
    record = os.path.join(out, FINGERPRINT_FILE)
    now = {"dataset": _fingerprint(plan.dataset.path)}
    if plan.dataset.eval_path:
        now["eval_dataset"] = _fingerprint(plan.dataset.eval_path)
    if resuming and os.path.exists(record):
        try:
            with open(record, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError):
            before = None
        if not isinstance(before, dict):
            raise RunError(f"cannot resume in {out}: {FINGERPRINT_FILE} is unreadable, so the dataset cannot be "
                           f"checked against the one the run started with; pass --overwrite to start over")
        for role, label in (("dataset", "dataset"), ("eval_dataset", "eval dataset")):
            was, is_ = before.get(role), now.get(role)
            if not isinstance(was, dict) or is_ is None:
                continue  # not recorded (or the plan has none): a changed path is the plan check's business
            if (was.get("size"), was.get("sha256")) != (is_["size"], is_["sha256"]):
                how = (f"{was['size']:,} -> {is_['size']:,} bytes" if isinstance(was.get("size"), int)
                       and was["size"] != is_["size"] else "same size, other contents")
                raise RunError(f"cannot resume in {out}: the {label} {is_['path']} changed since the run started "
                               f"({how}); restore it, or pass --overwrite to start over on the new file")
        if before == now:
            return
    write_json(record, now)
