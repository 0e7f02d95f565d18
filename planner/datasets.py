"""Token statistics of a training file, for time estimates and the plan file. Standard library only.

Formats (detected from the first row): `text` (a "text" field), `instruction` (instruction/output, optional
input) and `chat` (a "messages" list of role/content). Tokens are estimated at 4 characters per token plus a
few tokens of template per turn: the planner has no tokenizer (it must not import transformers); `run`
reports the real count.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from .errors import InputError

CHARS_PER_TOKEN = 4.0
TEMPLATE_TOKENS_PER_TURN = 4


@dataclass
class DatasetStats:
    path: str
    format: str
    rows: int
    tokens_total: int  # estimated, each row capped at seq_len
    mean_tokens: float
    rows_over_seq_len: int
    estimated: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _messages(row: dict) -> Any:
    """The chat turns; a CSV cell holds them as JSON text."""
    msgs = row.get("messages")
    if isinstance(msgs, str):
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            return None
    return msgs


def detect_format(row: Any) -> str:
    """The format a row's fields name: chat (`messages`), instruction (`instruction` + `output`), text (`text`),
    or "unknown". The one definition: `run` detects with it too, then checks every row's contents."""
    if isinstance(row, dict):
        if "messages" in row:
            return "chat"
        if "instruction" in row and "output" in row:
            return "instruction"
        if "text" in row:
            return "text"
    return "unknown"


def _rows(path: str) -> Iterator[Any]:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{path} line {n} is not valid JSON: {exc.msg}") from None
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise InputError(f"{path} must hold a list of rows (or {{\"data\": [...]}})")
        yield from data
    elif ext == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f)
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("reading .parquet needs pyarrow: pip install -e '.[run]'") from None
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"cannot read {path} as parquet: {exc}") from None
        yield from table.to_pylist()
    else:
        raise InputError(f"unsupported dataset file type {ext or '(none)'} for {path}: use .jsonl, .json, .csv or .parquet")


def _chars(row: dict, fmt: str) -> tuple[int, int]:
    """(characters, turns) of the text a row trains on."""
    if fmt == "text":
        return len(str(row.get("text") or "")), 1
    if fmt == "instruction":
        return sum(len(str(row.get(k) or "")) for k in ("instruction", "input", "output")), 2
    msgs = _messages(row)
    if not isinstance(msgs, list):
        return 0, 0
    return sum(len(str(m.get("content") or "")) for m in msgs if isinstance(m, dict)), len(msgs)


def dataset_stats(path: str, seq_len: int) -> DatasetStats:
    if not os.path.exists(path):
        raise InputError(f"dataset file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"dataset path is a directory, not a file: {path}")
    try:
        rows = list(_rows(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read dataset {path}: {exc}") from None
    if not rows:
        raise InputError(f"dataset {path} is empty")
    fmt = detect_format(rows[0])
    if fmt == "unknown":
        raise InputError(f"dataset {path} line 1: no 'text', 'instruction'/'output' or 'messages' field to train on")
    total, over = 0, 0
    for n, row in enumerate(rows, 1):
        if detect_format(row) != fmt:
            raise InputError(f"dataset {path} row {n} does not have the fields of the {fmt} format of row 1")
        chars, turns = _chars(row, fmt)
        tokens = int(chars / CHARS_PER_TOKEN) + TEMPLATE_TOKENS_PER_TURN * turns
        if tokens > seq_len:
            over += 1
        total += min(tokens, seq_len)
    return DatasetStats(path=path, format=fmt, rows=len(rows), tokens_total=total, mean_tokens=total / len(rows),
                        rows_over_seq_len=over)
