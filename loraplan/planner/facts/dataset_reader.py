"""Read a training file, detect its format, check and normalize every row: the one reader `plan` and `run` share.

Files: `.jsonl` (one JSON object per line), `.json` (a JSON array of objects, `{"data": [...]}`, or JSON lines
under a .json name), `.csv` (a header row; an empty cell is a missing value) and `.parquet` (through pyarrow,
imported only there), and a folder written by `datasets`' `save_to_disk` (state.json, dataset_info.json and
data-*.arrow in Arrow's streaming format, read with pyarrow without importing `datasets`; a DatasetDict folder,
dataset_dict.json beside one folder per split, is read through its `train` split). Text files are UTF-8, with or
without a byte-order mark.

Formats, detected from the first row's fields unless given: `chat` (`messages`: a list of {role, content}, or that
list as JSON text as a CSV cell holds it), `instruction` (`instruction` + `output`, optional `input`),
`prompt_completion` (`prompt` + `completion` strings, trl's prompt-completion rows: the loss covers the completion)
and `text` (`text`). Every row is checked against the format; the first bad one is named in a one-line InputError: "line 7"
in JSON lines and CSV (line 1 is the header), "record 3" in a JSON array, "row 2" in parquet.

Standard library only: the planner must start fast and never needs torch or `datasets` to read a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..errors import InputError, first_line

FORMATS = ("instruction", "chat", "text", "prompt_completion")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
SAVED_DATASET = "save_to_disk folder"  # what _check_file returns for a `datasets` save_to_disk folder
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
FORMAT_FIELDS = ("`messages` (chat), `instruction` + `output` (instruction), `prompt` + `completion` "
                 "(prompt_completion) or `text` (text)")


@dataclass
class DatasetRows:
    """A checked dataset: every row normalized to its format's fields (strings only)."""

    path: str
    format: str  # instruction | chat | text
    rows: list[dict]


def detect_format(row: Any) -> str:
    """The format a row's fields name: chat (`messages`), instruction (`instruction` + `output`), text (`text`),
    or "unknown"."""
    if isinstance(row, dict):
        if "messages" in row:
            return "chat"
        if "instruction" in row and "output" in row:
            return "instruction"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
        if "text" in row:
            return "text"
    return "unknown"


def read_dataset(path: str, fmt: str = "auto", what: str = "dataset") -> DatasetRows:
    """Read, detect (when `fmt` is auto) and check every row of a local data file. `what` names the file in
    errors ("dataset", "eval dataset")."""
    path = os.path.expanduser(path)
    name = f"{what} {path}"
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"dataset.format {fmt!r} is not auto, {', '.join(FORMATS)}")
    ext = _check_file(path, what)
    unit, records = _records(path, ext, name)
    rows: list[dict] = []
    for n, record in records:
        where = f"{unit} {n}"
        if not isinstance(record, dict):  # only JSON can hold a non-object; CSV and parquet rows have fields
            raise InputError(f"{name}: {where} is not a JSON object")
        if fmt == "auto":
            fmt = detect_format(record)
            if fmt == "unknown":
                fields = ", ".join(sorted(map(str, record))) or "none"
                raise InputError(f"{name}: cannot tell its format from the first row ({where}; fields: {fields}); "
                                 f"expected {FORMAT_FIELDS}")
        rows.append(check_row(record, fmt, f"{name}: {where}"))
    if not rows:
        raise InputError(f"{name} has no rows")
    return DatasetRows(path=path, format=fmt, rows=rows)


def _check_file(path: str, what: str) -> str:
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        if saved_dataset_files(path) is not None:
            return SAVED_DATASET
        raise InputError(f"{what} path is a directory, not a file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise InputError(f"{what} {path}: unsupported file type {ext or '(none)'} (use {', '.join(EXTENSIONS)})")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    if size == 0:
        raise InputError(f"{what} {path} is empty")
    return ext


def _records(path: str, ext: str, name: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """How rows are numbered ("line", "record", "row") and the (number, record) pairs of the file."""
    if ext == ".parquet":
        return "row", enumerate(_parquet_records(path, name), 1)
    if ext == SAVED_DATASET:
        return "row", enumerate(_arrow_records(path, name), 1)
    text = _read_text(path, name)
    if ext == ".csv":
        return "line", _csv_records(text, name)
    if ext == ".jsonl":
        return "line", _json_lines(text, name)
    return _json_document(text, name)


def _read_text(path: str, name: str) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped. Not UTF-8: an error naming line and column."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror or exc})") from None
    if data.startswith(UTF16_BOMS):
        raise InputError(f"{name} is UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8")
    if data.startswith(UTF8_BOM):
        data = data[len(UTF8_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InputError(f"{name}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x} at position {column} of "
                         "the line): save the file as UTF-8") from None
    if not text.strip():
        raise InputError(f"{name} is empty")
    return text


def _json_lines(text: str, name: str) -> Iterator[tuple[int, Any]]:
    # split on "\n" only: str.splitlines() would also split inside strings at U+2028 and other separators
    for n, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{name}: line {n} is not valid JSON ({exc.msg})") from None


def _json_document(text: str, name: str) -> tuple[str, Iterator[tuple[int, Any]]]:
    """A .json file: a JSON array of rows, {"data": [...]}, or JSON lines under a .json name."""
    expected = 'expected a JSON array of objects, {"data": [...]}, or one JSON object per line'
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):  # a second value follows the first: JSON lines
            return "line", _json_lines(text, name)
        raise InputError(f"{name} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict):
        raise InputError(f"{name} holds a single JSON object, not a list of rows: {expected}")
    if not isinstance(data, list):
        raise InputError(f"{name} holds a JSON {type(data).__name__}, not a list of rows: {expected}")
    return "record", enumerate(data, 1)


def _csv_records(text: str, name: str) -> Iterator[tuple[int, dict]]:
    """CSV rows as dicts keyed by the header, numbered by the line each starts on. An empty or absent cell is
    None: a missing value, as JSON's null (the column still names the format)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: Optional[list[str]] = None
    last_line = 0
    try:
        for cells in reader:
            start, last_line = last_line + 1, reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                continue
            if len(cells) > len(header):
                raise InputError(f"{name}: line {start} has {len(cells)} fields, the header has {len(header)}")
            yield start, {k: cells[i] if i < len(cells) and cells[i] != "" else None for i, k in enumerate(header) if k}
    except csv.Error as exc:
        raise InputError(f"{name}: line {reader.line_num} is not valid CSV ({exc})") from None


def _parquet_records(path: str, name: str) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f'{name}: reading .parquet needs pyarrow (in the [run] extra: pip install -e ".[run]")') from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a file it cannot read
        raise InputError(f"{name} cannot be read as parquet: {first_line(exc)}") from None


def saved_dataset_files(path: str) -> Optional[list[str]]:
    """The data-*.arrow files of a `datasets` save_to_disk folder, in the order its state.json lists them (a
    DatasetDict folder: its train split's), or None when `path` is not such a folder."""
    folder = path
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        folder = os.path.join(path, "train")
    state = os.path.join(folder, "state.json")
    if not (os.path.isfile(state) and os.path.isfile(os.path.join(folder, "dataset_info.json"))):
        return None
    try:
        with open(state, encoding="utf-8") as f:
            files = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [os.path.join(folder, n) for n in files]


def _arrow_records(path: str, name: str) -> Iterator[dict]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")) and not os.path.isdir(os.path.join(path, "train")):
        raise InputError(f"{name} is a DatasetDict folder without a `train` split; pass one split's folder")
    try:
        import pyarrow as pa
    except ImportError:
        raise InputError(f'{name}: reading a save_to_disk folder needs pyarrow (in the [run] extra)') from None
    for file in saved_dataset_files(path) or []:
        try:
            with pa.memory_map(file) as source:
                table = pa.ipc.open_stream(source).read_all()
        except Exception as exc:  # pyarrow raises several types for a file it cannot read
            raise InputError(f"{name}: {os.path.basename(file)} cannot be read as Arrow: {first_line(exc)}") from None
        yield from table.to_pylist()


def _string(value: Any) -> Optional[str]:
    """A field as text: strings as they are, numbers written out; anything else (null, lists, bools) is not text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def check_row(row: dict, fmt: str, where: str) -> dict:
    """The row normalized to its format's fields, or an InputError starting with `where` ("dataset F: line 7")."""

    def bad(msg: str) -> InputError:
        return InputError(f"{where} {msg}")

    if fmt == "text":
        text = _string(row.get("text"))
        if text is None or not text.strip():
            raise bad("has no `text` (format text needs a non-empty string `text`)")
        return {"text": text}
    if fmt == "instruction":
        for field in ("instruction", "output"):
            if _string(row.get(field)) is None:
                raise bad(f"has no `{field}` (format instruction needs `instruction` and `output`, optional `input`)")
        inp = row.get("input")
        if inp is not None and _string(inp) is None:
            raise bad("has an `input` that is not a string")
        return {"instruction": _string(row["instruction"]), "input": _string(inp) or "", "output": _string(row["output"])}
    if fmt == "prompt_completion":
        for field in ("prompt", "completion"):
            if isinstance(row.get(field), list):
                raise bad(f"has a conversational `{field}` (a list of messages); loraplan trains prompt-completion "
                          f"rows of strings: write them as `messages` (format chat) instead")
            if _string(row.get(field)) is None:
                raise bad(f"has no `{field}` (format prompt_completion needs strings `prompt` and `completion`)")
        if not _string(row["completion"]).strip():
            raise bad("has an empty `completion` (nothing to train on)")
        return {"prompt": _string(row["prompt"]), "completion": _string(row["completion"])}
    messages = row.get("messages")
    if isinstance(messages, str):  # a CSV cell holds the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise bad("has a `messages` string that is not a JSON list of {role, content}") from None
    if not isinstance(messages, list) or not messages:
        raise bad("has no `messages` list (format chat needs a non-empty list of {role, content})")
    clean = []
    for i, m in enumerate(messages, 1):
        role = _string(m.get("role")) if isinstance(m, dict) else None
        content = _string(m.get("content")) if isinstance(m, dict) else None
        if role is None or content is None:
            raise bad(f"message {i} lacks a string `role` or `content`")
        clean.append({"role": role, "content": content})
    return {"messages": clean}
