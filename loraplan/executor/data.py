"""Datasets for `run`: read and check every row (planner.facts.dataset_reader, the reader `plan` uses too), render rows to
text, tokenize, truncate to seq_len.

Formats (named in the plan, or detected from the first row when the plan says `auto`):
- instruction: `instruction`, `output`, optional `input`. Rendered with planner.facts.dataset_stats.INSTRUCTION_TEMPLATE; the
  loss covers the response only (the prompt's labels are -100), as trl does for prompt-completion data.
- chat: `messages`, a list of {role, content}. Rendered with the tokenizer's chat template, or FALLBACK_CHAT_TEMPLATE
  when the tokenizer has none; the loss covers the whole conversation.
- prompt_completion: `prompt`, `completion` (trl's prompt-completion rows). The prompt as it is, then the completion;
  the loss covers the completion only (trl's completion-only loss).
- text: `text`. The loss covers all of it.
An end-of-sequence token closes every instruction, prompt-completion and text example so the model learns to stop.

Rows are tokenized here (not inside trl) so that truncation is counted: a row longer than seq_len is cut to
seq_len and counted in the report; a row left with no trainable token is dropped and counted too, by the rule the
planner counts dropped rows with (planner.datasets.is_dropped).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from loraplan.planner.errors import InputError, first_line
from loraplan.planner.facts.dataset_reader import read_dataset
from loraplan.planner.facts.dataset_stats import PROMPTED_FORMATS, is_dropped, prompt_and_response

from .errors import RunError

# Used when the tokenizer has no chat template of its own; saved with the adapter's tokenizer so inference matches.
# planner.facts.dataset_stats.fallback_chat_text renders the same text without jinja, for plan's token count.
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


def load_rows(path: Optional[str], fmt: str, what: str = "dataset") -> tuple[list[dict], str]:
    """Read and check every row; returns the normalized rows and the format (detected when `auto`). The planner's
    reader does the work, so `run` refuses exactly the files `plan` refuses, with the same one-line message."""
    if not path:
        raise RunError(f"the plan names no {what} (dataset.path is empty)")
    try:
        data = read_dataset(path, fmt, what)
    except InputError as exc:
        raise RunError(str(exc)) from None
    return data.rows, data.format


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
    if fmt in PROMPTED_FORMATS:  # instruction, prompt_completion: the loss covers the response only
        pairs = [prompt_and_response(r, fmt) for r in rows]
        prompt_ids = _ids(tokenizer, [p for p, _ in pairs], True)
        output_ids = _ids(tokenizer, [o for _, o in pairs], False)
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
        prompt = next((i for i, x in enumerate(lab) if x != -100), len(lab))  # the leading no-loss tokens
        dropped = is_dropped(prompt, len(ids), seq_len)  # the planner's rule (planner.datasets), counted alike there
        if len(ids) > seq_len:
            report.truncated += 1
            ids, lab = ids[:seq_len], lab[:seq_len]
        if dropped:
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
