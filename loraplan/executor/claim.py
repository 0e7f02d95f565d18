"""Whether a run may write into a folder, and the marker that makes it loraplan's (held with folder_lock)."""

from __future__ import annotations

import os
import time
from typing import Optional

from loraplan.planner.planfile import paths as plan_paths
from loraplan.planner.planfile.io import atomic_write_text
from loraplan.planner.planfile.schema import Plan

from .checkpoints import CHECKPOINT_RE
from .disk import write_json
from .errors import RunError
from .resume import holds_run
from .run_files import LOCK_FILE, MARKER_FILE, PLAN_FILE, RUN_NAME_PATTERNS, RUN_NAMES


def _marker_path(path: str) -> str:
    return os.path.join(path, MARKER_FILE)


def is_loraplan_dir(path: str) -> bool:
    """A folder loraplan made or was allowed to use: it holds the marker, or (a run from before the marker
    existed) a plan.yaml beside checkpoints or an adapter."""
    if os.path.exists(_marker_path(path)):
        return True
    return os.path.exists(os.path.join(path, PLAN_FILE)) and holds_run(path)


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
    text = plan_paths.text_for(plan, path)  # its paths relative to the file (planner/planfile/paths.py)
    if not _same_text(path, text):
        atomic_write_text(path, text)
