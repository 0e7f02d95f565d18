"""Plan files: reading one (`read_plan_file`), rebuilding the typed plan from its plain data with every field's
type checked (`build_dataclass`), listing its numbers for the range checks (`numbers_in`), and writing any text
file atomically (`atomic_write_text`, which the executor's outputs use too). planner.planfile.schema's `Plan.load`,
`Plan.save` and `Plan.from_dict` call these; the schema itself is planner.planfile.schema.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import tempfile
import typing
from typing import Any

from ..errors import PlanError, first_line


def read_plan_file(path: str) -> dict:
    """The mapping a plan file holds, or a PlanError naming what is wrong with the file: missing, a folder, not
    UTF-8, not YAML, or without the `version:` line loraplan writes last (cut short, or not a plan)."""
    import yaml

    if not os.path.exists(path):
        raise PlanError(f"plan file not found: {path}")
    if os.path.isdir(path):
        raise PlanError(f"plan path is a directory, not a file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as exc:
        raise PlanError(f"plan file {path} is not valid YAML: {first_line(exc)}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # `version` is the last line loraplan writes: without it the file was cut short (or is not a plan)
        if not re.search(r"^version:", text, re.MULTILINE):
            raise PlanError(f"plan file {path} has no version field: truncated, or not a loraplan plan "
                            f"(it is not valid YAML either: {first_line(exc)})") from None
        raise PlanError(f"plan file {path} is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict) or "version" not in data:
        raise PlanError(f"plan file {path} has no version field: truncated, or not a loraplan plan")
    return data


def numbers_in(data: Any, where: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of every number in a (nested) dataclass, dict or list."""
    if dataclasses.is_dataclass(data):
        items = [(f.name, getattr(data, f.name)) for f in dataclasses.fields(data)]
    elif isinstance(data, dict):
        items = list(data.items())
    elif isinstance(data, list):
        return [n for i, v in enumerate(data) for n in numbers_in(v, f"{where}[{i}]")]
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        return [(where, data)]
    else:
        return []
    return [n for k, v in items for n in numbers_in(v, f"{where}.{k}" if where else str(k))]


def atomic_write_text(path: str, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old file or the new one, never a part: a temp file in the
    same folder, flushed to disk, then renamed over `path`. An OSError names `path`, not the temp file (a folder
    given as `path` is refused before anything is written)."""
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "it is a directory; name a file in it", path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise type(exc)(exc.errno, exc.strerror, path) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_dataclass(tp: Any, value: Any, where: str) -> Any:
    """Rebuild a (nested) dataclass from plain data, checking types so a hand-edited file fails clearly."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise PlanError(f"{where} must be a mapping")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise PlanError(f"{where} has unknown field(s): {', '.join(sorted(unknown))}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = build_dataclass(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanError(f"{where} is missing required field {f.name!r}")
        return tp(**kwargs)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return build_dataclass(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise PlanError(f"{where} must be a list")
        return [build_dataclass(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PlanError(f"{where} must be a mapping")
        return {str(k): build_dataclass(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PlanError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PlanError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PlanError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PlanError(f"{where} must be a string, got {value!r}")
        return value
    raise PlanError(f"{where}: unsupported type {tp}")
