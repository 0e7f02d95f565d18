"""Which run a folder holds and whether this plan may continue it: the plan's training fields and the dataset's
fingerprint compared with the ones the run started with; --overwrite clears the run's own files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

from loraplan.planner.errors import PlanError
from loraplan.planner.facts.dataset_reader import saved_dataset_files
from loraplan.planner.planfile import paths as plan_paths
from loraplan.planner.planfile.schema import Plan

from .checkpoints import checkpoints, file_sha256, latest_complete_checkpoint, remove_incomplete_checkpoints
from .disk import write_json
from .errors import RunError
from .run_files import ADAPTER_DIR, FINGERPRINT_FILE, PLAN_FILE, RUN_NAME_PATTERNS, RUN_NAMES

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
    "training.report_to",  # run --report-to may change the tracker on resume; the run's plan.yaml records it
)


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


def holds_run(output_dir: str) -> bool:
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
    if not holds_run(out):
        if resume:
            raise RunError(f"nothing to resume in {out}: it holds no checkpoint and no adapter; start the run "
                           f"without --resume (or check the plan's output_dir)")
        return None  # nothing trained here yet (at most a plan.yaml from a run that failed to start)
    saved: Optional[Plan] = None
    if os.path.exists(saved_path):
        try:
            saved = plan_paths.load(saved_path)
        except PlanError as exc:
            raise RunError(f"output dir {out} holds a run with an unreadable plan.yaml ({exc}); "
                           f"pass --overwrite to replace it") from None
    if saved is None:
        raise RunError(f"output dir {out} holds checkpoints or an adapter but no plan.yaml; "
                       f"pass --overwrite to replace them")
    diffs = training_differences(saved, plan_paths.absolute(plan))  # paths compared as absolute
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
    """Remove what a run writes (and nothing else the user may keep in the folder: a README.md there is theirs)."""
    for _, path, _ in checkpoints(output_dir):
        shutil.rmtree(path, ignore_errors=True)
    extra = [e for e in os.listdir(output_dir) if any(p.match(e) for p in RUN_NAME_PATTERNS)] \
        if os.path.isdir(output_dir) else []
    for name in (*RUN_NAMES, *extra):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)


def _fingerprint(path: str) -> dict:
    if os.path.isdir(path):  # a `datasets` save_to_disk folder: its data files, in order (planner dataset_reader)
        files = saved_dataset_files(path) or []
        digest = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
        return {"path": path, "size": sum(os.path.getsize(f) for f in files), "sha256": digest}
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
