"""Datasets: read local files, check every row, render them to text, tokenize, truncate to seq_len.

Formats (named in the plan, or detected from the first row when the plan says `auto`):
- instruction: `instruction`, `output`, optional `input`. Rendered with INSTRUCTION_TEMPLATE; the loss covers the
  response only (the prompt's labels are -100), as trl does for prompt-completion data.
- chat: `messages`, a list of {role, content}. Rendered with the tokenizer's chat template, or FALLBACK_CHAT_TEMPLATE
  when the tokenizer has none; the loss covers the whole conversation.
- text: `text`. The loss covers all of it.
An end-of-sequence token closes every instruction and text example so the model learns to stop.

Rows are tokenized here (not inside trl) so that truncation is counted: a row longer than seq_len is cut to
seq_len and counted in the report; a row left with no trainable token is dropped and counted too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from planner.errors import first_line

from .errors import RunError

FORMATS = ("instruction", "chat", "text")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")

INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# Used when the tokenizer has no chat template of its own; saved with the adapter's tokenizer so inference matches.
FALLBACK_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '### ' + (message['role'] | capitalize) + ':\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


@dataclass
class DataReport:
    path: str
    format: str
    rows: int = 0
    truncated: int = 0  # rows longer than seq_len, cut to seq_len
    dropped: int = 0  # rows with no trainable token left after truncation
    tokens: int = 0  # tokens after truncation
    longest: int = 0  # longest row before truncation
    chat_template: str = "n/a"  # "tokenizer" or "fallback" for chat data

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Table:
    path: str
    rows: list[dict]
    where: list[str] = field(default_factory=list)  # how to name each row in an error: "line 7", "record 3"


def _read_jsonl(path: str) -> _Table:
    rows, where = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunError(f"dataset {path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise RunError(f"dataset {path}: line {lineno} is not a JSON object")
            rows.append(row)
            where.append(f"line {lineno}")
    return _Table(path, rows, where)


def _read_with_datasets(path: str, ext: str) -> _Table:
    import datasets

    datasets.disable_progress_bars()
    try:
        if ext == ".csv":
            ds = datasets.Dataset.from_csv(path, keep_in_memory=True)
            where = lambda i: f"line {i + 2}"  # noqa: E731  (line 1 is the header)
        elif ext == ".parquet":
            ds = datasets.Dataset.from_parquet(path, keep_in_memory=True)
            where = lambda i: f"row {i + 1}"  # noqa: E731
        else:  # .json holding a JSON array of objects
            ds = datasets.Dataset.from_json(path, keep_in_memory=True)
            where = lambda i: f"record {i + 1}"  # noqa: E731
    except Exception as exc:  # pyarrow/pandas errors are long; the first line says enough
        first = first_line(exc)
        raise RunError(f"dataset {path} cannot be read as {ext[1:]}: {first}") from None
    # pandas reads an empty CSV cell as NaN: make it a missing value, as in JSON
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in ds.to_list()]
    return _Table(path, rows, [where(i) for i in range(len(rows))])


def read_table(path: Optional[str], what: str = "dataset") -> _Table:
    """Read a local data file into rows. Errors name the file and the first bad line (1-based)."""
    if not path:
        raise RunError(f"the plan names no {what} (dataset.path is empty)")
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise RunError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise RunError(f"{what} path is a directory, not a file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise RunError(f"{what} {path}: unsupported file type {ext or '(none)'} (use {', '.join(EXTENSIONS)})")
    if os.path.getsize(path) == 0:
        raise RunError(f"{what} {path} is empty")
    if ext == ".jsonl":
        table = _read_jsonl(path)
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        # A .json file is either a JSON array of objects or JSON lines under another name.
        table = _read_with_datasets(path, ext) if head.startswith("[") else _read_jsonl(path)
    else:
        table = _read_with_datasets(path, ext)
    if not table.rows:
        raise RunError(f"{what} {path} has no rows")
    return table


def detect_format(row: dict, path: str) -> str:
    """The format of a dataset, from the fields of its first row (planner.datasets.detect_format's rules)."""
    from planner.datasets import detect_format as format_of

    fmt = format_of(row)
    if fmt != "unknown":
        return fmt
    fields = ", ".join(sorted(map(str, row))) or "none"
    raise RunError(
        f"dataset {path}: cannot tell its format from the first row (fields: {fields}); expected `messages` (chat), "
        f"`instruction` + `output` (instruction) or `text` (text)"
    )


def _string(value: Any) -> Optional[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _check_row(row: dict, fmt: str, where: str, path: str) -> dict:
    """The row normalized to its format's fields, or an error naming the row."""

    def bad(msg: str) -> RunError:
        return RunError(f"dataset {path}: {where} {msg}")

    if fmt == "text":
        text = _string(row.get("text"))
        if text is None or not text.strip():
            raise bad("has no `text` (format text needs a non-empty string `text`)")
        return {"text": text}
    if fmt == "instruction":
        for name in ("instruction", "output"):
            if _string(row.get(name)) is None:
                raise bad(f"has no `{name}` (format instruction needs `instruction` and `output`, optional `input`)")
        inp = row.get("input")
        if inp is not None and _string(inp) is None:
            raise bad("has an `input` that is not a string")
        return {"instruction": _string(row["instruction"]), "input": _string(inp) or "", "output": _string(row["output"])}
    # chat
    messages = row.get("messages")
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise bad("has a `messages` cell that is not a JSON list") from None
    if not isinstance(messages, list) or not messages:
        raise bad("has no `messages` list (format chat needs a non-empty list of {role, content})")
    clean = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict) or _string(m.get("role")) is None or _string(m.get("content")) is None:
            raise bad(f"message {i} lacks a string `role` or `content`")
        clean.append({"role": m["role"], "content": _string(m["content"])})
    return {"messages": clean}


def load_rows(path: Optional[str], fmt: str, what: str = "dataset") -> tuple[list[dict], str]:
    """Read and check every row; returns the normalized rows and the format (detected when `auto`)."""
    table = read_table(path, what)
    if fmt == "auto":
        fmt = detect_format(table.rows[0], table.path)
    elif fmt not in FORMATS:
        raise RunError(f"dataset.format {fmt!r} is not auto, {', '.join(FORMATS)}")
    rows = [_check_row(r, fmt, w, table.path) for r, w in zip(table.rows, table.where)]
    return rows, fmt


def ensure_chat_template(tokenizer) -> str:
    """Give a tokenizer without a chat template the documented fallback. Returns which template is used."""
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer"
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return "fallback"


def _ids(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=special)["input_ids"]


def tokenize_rows(rows: list[dict], fmt: str, tokenizer, seq_len: int, path: str):
    """Rows -> a datasets.Dataset of input_ids and labels (-100 where no loss), and a DataReport."""
    import datasets

    eos = tokenizer.eos_token_id
    report = DataReport(path=path, format=fmt)
    sequences: list[tuple[list[int], list[int]]] = []
    if fmt == "instruction":
        prompts = [
            (INSTRUCTION_TEMPLATE if r["input"] else INSTRUCTION_TEMPLATE_NO_INPUT).format(**r) for r in rows
        ]
        prompt_ids = _ids(tokenizer, prompts, True)
        output_ids = _ids(tokenizer, [r["output"] for r in rows], False)
        for p, o in zip(prompt_ids, output_ids):
            o = o + ([eos] if eos is not None else [])
            sequences.append((p + o, [-100] * len(p) + o))
    elif fmt == "text":
        for ids in _ids(tokenizer, [r["text"] for r in rows], True):
            ids = ids + ([eos] if eos is not None and (not ids or ids[-1] != eos) else [])
            sequences.append((ids, list(ids)))
    else:
        report.chat_template = ensure_chat_template(tokenizer)
        try:
            texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
        except Exception as exc:
            first = first_line(exc)
            raise RunError(f"dataset {path}: the tokenizer's chat template cannot render it: {first}") from None
        for ids in _ids(tokenizer, texts, False):
            sequences.append((ids, list(ids)))

    input_ids, labels = [], []
    for ids, lab in sequences:
        report.longest = max(report.longest, len(ids))
        if len(ids) > seq_len:
            report.truncated += 1
            ids, lab = ids[:seq_len], lab[:seq_len]
        if all(x == -100 for x in lab):
            report.dropped += 1
            continue
        input_ids.append(ids)
        labels.append(lab)
        report.tokens += len(ids)
    report.rows = len(input_ids)
    if not input_ids:
        raise RunError(f"dataset {path}: no row keeps a token to train on within seq_len {seq_len}")
    return datasets.Dataset.from_dict({"input_ids": input_ids, "labels": labels}), report


def prepare_datasets(plan, tokenizer):
    """(train_dataset, eval_dataset or None, train DataReport, eval DataReport or None) from the plan's dataset."""
    d = plan.dataset
    seq_len = plan.training.seq_len
    rows, fmt = load_rows(d.path, d.format)
    eval_rows: list[dict] = []
    eval_fmt = fmt
    if d.eval_path:
        eval_rows, eval_fmt = load_rows(d.eval_path, fmt, what="eval dataset")
    elif d.eval_fraction > 0:
        import random

        if not 0 < d.eval_fraction < 1:
            raise RunError(f"dataset.eval_fraction must be in (0, 1), got {d.eval_fraction}")
        n_eval = max(1, round(len(rows) * d.eval_fraction))
        if n_eval >= len(rows):
            raise RunError(f"dataset {d.path}: {len(rows)} row(s) are too few to hold out {d.eval_fraction:.0%} for eval")
        order = list(range(len(rows)))
        random.Random(plan.training.seed).shuffle(order)
        held = set(order[:n_eval])
        eval_rows = [r for i, r in enumerate(rows) if i in held]
        rows = [r for i, r in enumerate(rows) if i not in held]
    train_ds, train_report = tokenize_rows(rows, fmt, tokenizer, seq_len, d.path)
    eval_ds = eval_report = None
    if eval_rows:
        eval_ds, eval_report = tokenize_rows(eval_rows, eval_fmt, tokenizer, seq_len, d.eval_path or d.path)
    return train_ds, eval_ds, train_report, eval_report
