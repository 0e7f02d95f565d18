"""The run's folder: what is in it, whether a run may start there, and which checkpoint to resume from.

Layout under plan.output_dir:
    plan.yaml         the plan this run executes (written before training starts)
    checkpoint-N/     the Trainer's checkpoints; COMPLETE marks one whose every file was written, and lists
                      each file's size and sha256 so that a damaged one is told apart and skipped
    adapter/          the final PEFT adapter and tokenizer (swapped in by rename, so never half-written)
    metrics.jsonl     one JSON object per logged step
    summary.json      the run's outcome: predicted vs observed memory, tokens/s, wall time, paths
    dataset_fingerprint.json  size and sha256 of the dataset (and eval) file the run started with
    run.log           library messages the user can do nothing about (kept out of the terminal)
    .loraplan-run.json  the marker: loraplan made (or was allowed to use) this folder
    .loraplan.lock    exists while a `run` holds the folder (an OS lock; its text names the holder)

Only these names are ever written or removed: the folder may hold the user's own files beside them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from typing import Any, Iterator, Optional

from loraplan.planner.errors import PlanError, first_line
from loraplan.planner import plan_paths
from loraplan.planner.plan import Plan
from loraplan.planner.plan_io import atomic_write_text

from .checkpoints import (COMPLETE_MARKER, CHECKPOINT_RE, checkpoints, file_sha256, latest_complete_checkpoint,
                          remove_incomplete_checkpoints)
from .errors import RunError

PLAN_FILE = "plan.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ADAPTER_DIR = "adapter"
FINGERPRINT_FILE = "dataset_fingerprint.json"
RUN_LOG = "run.log"
MARKER_FILE = ".loraplan-run.json"
LOCK_FILE = ".loraplan.lock"
# What a run writes at the top of its folder, checkpoint-N/ aside (launch.log and .worker-error.json: ddp only).
RUN_NAMES = (PLAN_FILE, METRICS_FILE, SUMMARY_FILE, ADAPTER_DIR, ADAPTER_DIR + ".tmp", ADAPTER_DIR + ".old",
             RUN_LOG, "launch.log", ".worker-error.json", "dataset_fingerprint.json", "accelerate_config.yaml")
# ... and, on a multi-node run, per machine K: its launcher's log and the transient marker that proves the folder
# is shared (executor/launch.py, executor/worker.py)
RUN_NAME_PATTERNS = (re.compile(r"^launch-machine-\d+\.log$"), re.compile(r"^\.machine-\d+\."))

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
    if os.path.isdir(path):  # a `datasets` save_to_disk folder: its data files, in order (planner.dataset_reader)
        import hashlib

        from loraplan.planner.dataset_reader import saved_dataset_files

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
# --- the folder itself: created with a one-line error, held by one process, claimed with a marker -------------------


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def make_output_dir(path: str, what: str = "output dir") -> None:
    """Create PATH (and its parents), or fail with one line naming it and why (a file in the way, a read-only
    or virtual file system, no permission). Nothing else is touched."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RunError(f"{what} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        return
    except OSError as exc:
        cause = exc.strerror or first_line(exc)
        anc = _nearest_existing(os.path.dirname(os.path.abspath(path)))
        if os.path.lexists(anc) and not os.path.isdir(anc):
            cause = f"{anc} is a file, not a folder"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            cause = f"{anc} is not writable ({exc.strerror})"
        else:
            cause = f"{cause} (creating it under {anc})"
        raise RunError(f"cannot create {what} {path}: {cause}") from None


def _read_holder(lock_path: str) -> str:
    try:
        with open(lock_path, encoding="utf-8") as f:
            h = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        h = {}
    if not h.get("pid"):
        return "another loraplan process"
    return f"`{h.get('command', 'loraplan')}` (pid {h['pid']} on {h.get('host', '?')}, since {h.get('started', '?')})"


class _Held:
    def __init__(self, fd: Optional[int], path: str):
        self.fd, self.path, self.depth = fd, path, 1


_HELD: dict[str, _Held] = {}


@contextlib.contextmanager
def lock_output_dir(path: str, command: str, what: str = "output dir", flag: str = "--output-dir") -> Iterator[None]:
    """Hold PATH for one process: create the folder, then take an OS lock (flock) on PATH/.loraplan.lock, whose
    text names the holder. A second process is refused with one line naming the holder; a lock file left by a
    killed process does not block (the kernel released its lock). Re-entrant within one process (the demo takes
    it before building its model, `execute` again). The workers of a ddp or fsdp run hold a shared POSIX lock on
    the same file while they live (executor/lifetime.py), so the folder stays refused until the last of them is
    gone, even when the run process was killed before them."""
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key].depth += 1
        try:
            yield
        finally:
            _HELD[key].depth -= 1
        return
    make_output_dir(path, what)
    lock_path = os.path.join(path, LOCK_FILE)
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"cannot write to {what} {path}: {exc.strerror or first_line(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{what} {path} is in use by {_read_holder(lock_path)}; wait for it to finish or "
                           f"choose another {flag}") from None
        except OSError:  # a file system without locks (rare): run unguarded rather than not at all
            os.close(fd)
            fd = None
            break
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same and _workers_hold(fd):  # the workers of a run that was killed, still alive (executor/lifetime.py)
            os.close(fd)
            raise RunError(f"{what} {path} is in use by the processes of an earlier run, still writing there "
                           f"(its `loraplan run` ended before them); wait for them to finish") from None
        if same:
            break
        os.close(fd)
    if fd is not None:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _HELD[key] = held = _Held(fd, lock_path)
    try:
        yield
    finally:
        del _HELD[key]
        if held.fd is not None:
            with contextlib.suppress(OSError):
                if os.stat(held.path).st_ino == os.fstat(held.fd).st_ino:
                    os.unlink(held.path)  # while still locked: whoever opened it before sees it is gone
            os.close(held.fd)


def _workers_hold(fd: int) -> bool:
    from .lifetime import workers_hold

    return workers_hold(fd)


def _marker_path(path: str) -> str:
    return os.path.join(path, MARKER_FILE)


def is_loraplan_dir(path: str) -> bool:
    """A folder loraplan made or was allowed to use: it holds the marker, or (a run from before the marker
    existed) a plan.yaml beside checkpoints or an adapter."""
    if os.path.exists(_marker_path(path)):
        return True
    return os.path.exists(os.path.join(path, PLAN_FILE)) and _holds_run(path)


def claim_output_dir(path: str, *, use_existing: bool = False, plan_file: Optional[str] = None,
                     plan_text: Optional[str] = None, also_writes: tuple[str, ...] = ()) -> None:
    """Decide whether a run may write into PATH (held with lock_output_dir) and mark it as loraplan's.

    - empty (or holding only the plan file being run, exactly as the run would write it): claimed;
    - loraplan's (the marker): the run rules of prepare_output_dir apply;
    - anything else: refused, unless use_existing; even then refused when a name the run writes is already
      there (the user's plan.yaml, README.md stays as it is since nothing writes it).
    """
    entries = check_claim(path, use_existing=use_existing, plan_file=plan_file, plan_text=plan_text,
                          also_writes=also_writes)
    if not os.path.exists(_marker_path(path)):
        write_json(_marker_path(path), {"created_by": "loraplan run", "claimed": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "existing_files": entries})


def check_claim(path: str, *, use_existing: bool = False, plan_file: Optional[str] = None,
                plan_text: Optional[str] = None, also_writes: tuple[str, ...] = ()) -> list[str]:
    """claim_output_dir's decision, without writing anything: raises RunError when refused, else returns the
    user's entries the run will write beside. Run once before the lock (a refused folder is not touched at all)
    and again under it."""
    if not os.path.isdir(path) or is_loraplan_dir(path):
        return []
    # the lock, and what the other machines of a multi-node run write there before machine 0 claims the folder
    # (their launcher logs, the shared-folder markers): the run's own, not the user's
    entries = sorted(e for e in os.listdir(path)
                     if e != LOCK_FILE and not any(p.match(e) for p in RUN_NAME_PATTERNS))
    own_plan = os.path.join(path, PLAN_FILE)
    if (PLAN_FILE in entries and plan_file and plan_text is not None and os.path.isfile(plan_file)
            and os.path.samefile(plan_file, own_plan) and _same_text(own_plan, plan_text)):
        entries.remove(PLAN_FILE)  # the plan being run, where `loraplan plan` put it: the run leaves it as it is
    if entries:
        shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
        if not use_existing:
            raise RunError(f"output dir {path} is not empty and was not made by loraplan (it holds {shown}); "
                           f"choose a new or empty folder, or pass --use-existing-dir to write the run beside "
                           f"those files")
        names = set(RUN_NAMES) | set(also_writes)
        clash = [e for e in entries if e in names or CHECKPOINT_RE.match(e)
                 or any(p.match(e) for p in RUN_NAME_PATTERNS)]
        if clash:
            raise RunError(f"output dir {path} already holds {', '.join(clash)}, which the run would replace "
                           f"and loraplan did not write; move them or choose another folder")
    return entries


def _same_text(path: str, text: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read() == text.encode("utf-8")
    except OSError:
        return False


def save_plan(plan: Plan, path: str) -> None:
    """Write the run's plan.yaml unless it already holds exactly this plan (e.g. `run out/plan.yaml --resume`):
    the user's file is left byte for byte as it was."""
    text = plan_paths.text_for(plan, path)  # its paths relative to the file (planner.plan_paths)
    if not _same_text(path, text):
        atomic_write_text(path, text)


# --- a full disk -------------------------------------------------------------------------------------------------

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
    tmp = os.path.join(output_dir, ADAPTER_DIR + ".tmp")
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
