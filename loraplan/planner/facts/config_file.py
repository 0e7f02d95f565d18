"""Reading a config file the user named (a model's config.json, another tool's YAML config) into the mapping it
holds, with every way it can be wrong said in one line: missing, unreadable, not UTF-8, not valid JSON or YAML (with
the line), or not a mapping of keys. A plan file has its own reader (planner.planfile.io.read_plan_file): it says
what a cut-short plan looks like."""

from __future__ import annotations

import json

from ..errors import InputError


def read_mapping(path, syntax: str) -> dict:
    """The mapping the JSON or YAML (`syntax`) file at `path` holds, or an InputError naming what is wrong."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f) if syntax == "JSON" else yaml.safe_load(f)
    except FileNotFoundError:
        raise InputError(f"no such config file: {path}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        kind = "a JSON object" if syntax == "JSON" else "a YAML mapping of keys"
        raise InputError(f"{path} must hold {kind}, not {type(data).__name__}")
    return data
