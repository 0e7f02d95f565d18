"""Where a plan's paths point: in a plan file, a relative path is relative to the folder of the file that holds it.

The path fields are `output_dir`, `dataset.path`, `dataset.eval_path` and `model.path`. In memory a path is what
this process opens (a relative one is relative to the working directory, e.g. what `--output-dir` was given);
in a file it is relative to the file's folder, so a plan and its folder can be moved together and
`loraplan run wf/out/plan.yaml --resume` means the same from any directory.

- `load(path)`: the plan in the file, its relative paths made absolute against the file's folder (`Plan.load` reads
  the fields as written);
- `text_for(plan, dest)` / `save(plan, dest)`: the plan as a file at `dest` holds it: a path that came relative
  from a file in the same folder is written as it was (so `run out/plan.yaml` leaves that file byte for byte),
  another relative one (or an absolute one that came relative) relative to `dest`'s folder, an absolute one as is;
- `shell_command(*words)` and `shown_path(path)`: a command the CLI suggests, quoted for a POSIX shell, with paths
  as short as they can be from the working directory.
"""

from __future__ import annotations

import copy
import os
import shlex
from typing import Optional

from .schema import Plan
from .io import atomic_write_text

PATH_FIELDS = ("output_dir", "dataset.path", "dataset.eval_path", "model.path")
_RECORD = "_paths_from_file"  # on a loaded Plan: {field: (the text in the file, the file's folder)}


def _get(plan: Plan, field: str) -> Optional[str]:
    obj = plan
    *parents, name = field.split(".")
    for p in parents:
        obj = getattr(obj, p)
    return getattr(obj, name)


def _set(plan: Plan, field: str, value: Optional[str]) -> None:
    obj = plan
    *parents, name = field.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, name, value)


def resolve(plan: Plan, base: str) -> Plan:
    """Make `plan`'s relative paths absolute against the folder `base` (in place; returns it)."""
    base = os.path.abspath(base)
    record = {}
    for field in PATH_FIELDS:
        value = _get(plan, field)
        if not value:
            continue
        expanded = os.path.expanduser(value)
        if not os.path.isabs(expanded):
            record[field] = (value, base)
            expanded = os.path.join(base, expanded)
        _set(plan, field, os.path.normpath(expanded))
    setattr(plan, _RECORD, record)
    return plan


def load(path: str) -> Plan:
    """The plan in the file at `path`, with its relative paths resolved against the file's folder."""
    return resolve(Plan.load(path), os.path.dirname(os.path.abspath(path)))


def forget(plan: Plan, field: str) -> None:
    """`field` no longer holds what the file said (a flag replaced it)."""
    getattr(plan, _RECORD, {}).pop(field, None)


def absolute(plan: Plan) -> Plan:
    """A copy of `plan` whose paths are absolute (a relative one in memory is relative to the working directory):
    what two plans are compared in, whichever file or flag their paths came from."""
    out = copy.deepcopy(plan)
    for field in PATH_FIELDS:
        value = _get(out, field)
        if value:
            _set(out, field, os.path.normpath(os.path.abspath(os.path.expanduser(value))))
    return out


def text_for(plan: Plan, dest: str) -> str:
    """The YAML text of `plan` as the file `dest` holds it (its paths relative to `dest`'s folder)."""
    folder = os.path.dirname(os.path.abspath(dest))
    record = getattr(plan, _RECORD, {})
    out = copy.deepcopy(plan)
    for field in PATH_FIELDS:
        value = _get(plan, field)
        if not value:
            continue
        was = record.get(field)
        if was and was[1] == folder and os.path.normpath(os.path.join(was[1], os.path.expanduser(was[0]))) == value:
            _set(out, field, was[0])
        elif was or not os.path.isabs(os.path.expanduser(value)):
            _set(out, field, os.path.relpath(os.path.abspath(os.path.expanduser(value)), folder))
    return out.to_yaml()


def save(plan: Plan, dest: str) -> None:
    atomic_write_text(dest, text_for(plan, dest))


def shown_path(path: str) -> str:
    """`path` relative to the working directory when it lies under it, else absolute."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path, os.getcwd())
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def shell_command(*words: str) -> str:
    """A command line to paste: each word quoted for a POSIX shell (a path with spaces stays one word)."""
    return " ".join(shlex.quote(str(w)) for w in words)


def resume_command(output_dir: str) -> str:
    """`loraplan run OUT/plan.yaml --resume`, quoted, the path as short as it can be from here."""
    return shell_command("loraplan", "run", shown_path(os.path.join(output_dir, "plan.yaml")), "--resume")
