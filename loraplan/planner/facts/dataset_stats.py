"""Token statistics of a training file, for the time estimate and the plan file.

The rows come from `planner.facts.dataset_reader`, the reader `run` uses too, so a file plan counts is a file run trains
on. Each row is rendered to the text run trains on: an instruction row as INSTRUCTION_TEMPLATE + output + EOS, a text
row as its text + EOS, a chat row in the fallback chat layout (executor.data.FALLBACK_CHAT_TEMPLATE; `run` uses the
model's own chat template when it has one). When the model's directory holds `tokenizer.json`, tokens are counted
with it (the `tokenizers` library: Rust, no torch, imported only on that path), exactly as run tokenizes (for a file
over TOKENIZE_BUDGET_CHARS characters, on a spread sample, the other rows scaled by their length, which keeps a
100k-row file near a second); otherwise they are estimated at CHARS_PER_TOKEN characters per token.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from ..errors import first_line
from .dataset_reader import read_dataset

CHARS_PER_TOKEN = 4.0
ESTIMATE_BASIS = f"estimated at {CHARS_PER_TOKEN:g} characters per token"
TOKENIZER_BASIS = "counted with the model's tokenizer"
# Rendered characters tokenized in full (about a second); a larger file has a spread sample of this size tokenized.
TOKENIZE_BUDGET_CHARS = 4_000_000

# The prompt of an instruction row; the `### Input:` block only when `input` is non-empty. executor/data.py
# tokenizes with these (the planner cannot import the executor), so plan counts the text run trains on.
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def instruction_prompt(row: dict) -> str:
    """The prompt run trains an instruction row's `output` after (the loss skips it)."""
    return (INSTRUCTION_TEMPLATE if row["input"] else INSTRUCTION_TEMPLATE_NO_INPUT).format(**row)


# Formats whose rows are a prompt (no loss) and a response (the loss), each closed by EOS: instruction (through
# INSTRUCTION_TEMPLATE) and trl's prompt-completion rows (the prompt as it is).
PROMPTED_FORMATS = ("instruction", "prompt_completion")


def prompt_and_response(row: dict, fmt: str) -> tuple[str, str]:
    """A prompted row's prompt (tokenized with the tokenizer's special tokens, the loss skips it) and response."""
    if fmt == "instruction":
        return instruction_prompt(row), row["output"]
    return row["prompt"], row["completion"]


def trainable_tokens(prompt_tokens: int, tokens: int, seq_len: int) -> int:
    """The tokens a row trains on once cut to seq_len: those after its prompt (0 prompt tokens for text and chat)."""
    return max(0, min(tokens, seq_len) - min(prompt_tokens, seq_len))


def is_dropped(prompt_tokens: int, tokens: int, seq_len: int) -> bool:
    """The one rule for a row `run` drops: nothing left to train on within seq_len (its prompt alone fills it).
    executor/data.py applies it to the tokenized rows; dataset_stats counts the same rows, so steps agree."""
    return trainable_tokens(prompt_tokens, tokens, seq_len) == 0


def fallback_chat_text(messages: list[dict], bos: Optional[str], eos: Optional[str]) -> str:
    """What executor.data.FALLBACK_CHAT_TEMPLATE renders, without jinja: BOS, then per message `### Role:\\n`
    content, EOS after an assistant turn, a blank line. tests/test_dataset_agreement.py pins the two equal."""
    parts = [bos or ""]
    for m in messages:
        parts.append(f"### {m['role'].capitalize()}:\n{m['content']}")
        if m["role"] == "assistant":
            parts.append(eos or "")
        parts.append("\n\n")
    return "".join(parts)


@dataclass
class DatasetStats:
    path: str
    format: str
    rows: int
    tokens_total: int  # each row capped at seq_len
    mean_tokens: float
    rows_over_seq_len: int
    rows_dropped: int = 0  # rows run drops (is_dropped: the prompt alone fills seq_len); `rows` counts them too
    estimated: bool = True  # False: counted with the model's tokenizer on the text run trains on
    tokenizer: Optional[str] = None  # the tokenizer.json counted with, or None
    basis: str = ESTIMATE_BASIS  # how tokens were counted, in words

    @property
    def rows_trained(self) -> int:
        """The rows run trains on (what its steps are counted from): the rows read less those it drops."""
        return self.rows - self.rows_dropped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tokenizer:
    path: str  # tokenizer.json
    backend: Any  # tokenizers.Tokenizer
    bos: Optional[str]
    eos: Optional[str]
    eos_id: Optional[int]
    own_chat_template: bool


def _special(config: dict, key: str) -> Optional[str]:
    value = config.get(key)
    if isinstance(value, dict):  # older configs: {"content": "</s>", "lstrip": false, ...}
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _load_tokenizer(tokenizer_dir: Optional[str]) -> tuple[Optional[_Tokenizer], str]:
    """The model's tokenizer, or None and why the estimate is used instead."""
    if not tokenizer_dir:
        return None, ESTIMATE_BASIS
    path = os.path.join(os.path.expanduser(tokenizer_dir), "tokenizer.json")
    if not os.path.isfile(path):
        return None, f"{ESTIMATE_BASIS} (no tokenizer.json in {tokenizer_dir})"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None, f"{ESTIMATE_BASIS} (the tokenizers library is not installed)"
    try:
        backend = Tokenizer.from_file(path)
    except Exception as exc:  # the Rust side raises a plain Exception for a file it cannot parse
        return None, f"{ESTIMATE_BASIS} ({path} cannot be loaded: {first_line(exc)})"
    backend.no_truncation()  # a tokenizer.json may carry a truncation or padding setting: count whole rows
    backend.no_padding()
    config: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        try:
            with open(os.path.join(os.path.dirname(path), name), encoding="utf-8-sig") as f:
                loaded = json.load(f)
            config.update(loaded if isinstance(loaded, dict) else {})
        except (OSError, ValueError):
            pass
    eos = _special(config, "eos_token")
    own_template = bool(config.get("chat_template")) or any(
        os.path.isfile(os.path.join(os.path.dirname(path), n)) for n in ("chat_template.jinja", "chat_template.json"))
    return _Tokenizer(path, backend, _special(config, "bos_token"), eos,
                      backend.token_to_id(eos) if eos else None, own_template), TOKENIZER_BASIS


def _texts(rows: list[dict], fmt: str, bos: Optional[str], eos: Optional[str]) -> tuple[list[str], list[str]]:
    """Per row, the text tokenized with the tokenizer's special tokens (BOS) and the text tokenized without, as run
    does (EOS after instruction and text rows is added by the caller)."""
    if fmt in PROMPTED_FORMATS:
        pairs = [prompt_and_response(r, fmt) for r in rows]
        return [p for p, _ in pairs], [o for _, o in pairs]
    if fmt == "text":
        return [r["text"] for r in rows], []
    return [], [fallback_chat_text(r["messages"], bos, eos) for r in rows]


def _exact_counts(tok: _Tokenizer, fmt: str, with_special: list[str], plain: list[str]) -> list[int]:
    """Tokens per row as run tokenizes: the pieces' token counts, plus the EOS run appends."""
    encode = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)  # _fast: no offsets computed
    counts = [0] * max(len(with_special), len(plain))
    last_ids: list[Optional[int]] = [None] * len(counts)
    for texts, special in ((with_special, True), (plain, False)):
        for i, enc in enumerate(encode(texts, add_special_tokens=special) if texts else []):
            counts[i] += len(enc)
            if fmt == "text" and len(enc):
                last_ids[i] = enc.ids[-1]
    if fmt in (*PROMPTED_FORMATS, "text") and tok.eos_id is not None:
        # run appends EOS to every prompted row, and to a text row not already ending with it
        counts = [c + (fmt in PROMPTED_FORMATS or last != tok.eos_id) for c, last in zip(counts, last_ids)]
    return counts


def _token_counts(rows: list[dict], fmt: str, tok: Optional[_Tokenizer]) -> tuple[list[int], Optional[str]]:
    """Tokens per row, and how they were counted when only a sample went through the tokenizer (else None)."""
    if tok is None:
        columns = [texts for texts in _texts(rows, fmt, "", "") if texts]
        eos = fmt in (*PROMPTED_FORMATS, "text")
        return [math.ceil(sum(map(len, pieces)) / CHARS_PER_TOKEN) + eos for pieces in zip(*columns)], None
    with_special, plain = _texts(rows, fmt, tok.bos, tok.eos)
    chars = [sum(map(len, pieces)) for pieces in zip(*[texts for texts in (with_special, plain) if texts])]
    if sum(chars) <= TOKENIZE_BUDGET_CHARS:
        return _exact_counts(tok, fmt, with_special, plain), None
    # A large file: tokenize every step-th row, scale the others by their characters at the sample's ratio.
    sample = range(0, len(rows), math.ceil(sum(chars) / TOKENIZE_BUDGET_CHARS))
    exact = _exact_counts(tok, fmt, [with_special[i] for i in sample] if with_special else [],
                          [plain[i] for i in sample] if plain else [])
    tokens_per_char = sum(exact) / max(sum(chars[i] for i in sample), 1)
    counts = [round(c * tokens_per_char) for c in chars]
    for i, n in zip(sample, exact):
        counts[i] = n
    how = (f"{TOKENIZER_BASIS} on {len(sample):,} of {len(rows):,} rows, the others scaled by their characters "
           f"({1 / max(tokens_per_char, 1e-9):.2f} characters per token)")
    return counts, how


def _prompt_counts(rows: list[dict], fmt: str, tok: Optional[_Tokenizer]) -> list[int]:
    """Tokens of each row's prompt (0 for text and chat rows, whose loss covers every token), counted the way
    _token_counts counts the whole row (exactly, on a spread sample, or estimated)."""
    if fmt not in PROMPTED_FORMATS:
        return [0] * len(rows)
    prompts = [prompt_and_response(r, fmt)[0] for r in rows]
    if tok is None:
        return [math.ceil(len(p) / CHARS_PER_TOKEN) for p in prompts]
    encode = getattr(tok.backend, "encode_batch_fast", tok.backend.encode_batch)
    chars = [len(p) for p in prompts]
    if sum(chars) <= TOKENIZE_BUDGET_CHARS:
        return [len(e) for e in encode(prompts, add_special_tokens=True)]
    sample = range(0, len(rows), math.ceil(sum(chars) / TOKENIZE_BUDGET_CHARS))
    exact = [len(e) for e in encode([prompts[i] for i in sample], add_special_tokens=True)]
    per_char = sum(exact) / max(sum(chars[i] for i in sample), 1)
    counts = [round(c * per_char) for c in chars]
    for i, n in zip(sample, exact):
        counts[i] = n
    return counts


def dataset_stats(path: str, seq_len: int, tokenizer_dir: Optional[str] = None) -> DatasetStats:
    """Rows, format and tokens of a training file (each row capped at seq_len, as run truncates), read and checked
    by the reader run uses. With `tokenizer_dir` (a model directory holding tokenizer.json) tokens are counted with
    the model's tokenizer (on a spread sample of TOKENIZE_BUDGET_CHARS characters for a larger file, the other rows
    scaled by their length); without it, or when it cannot be used, they are estimated (`basis` says which)."""
    data = read_dataset(path)
    tok, basis = _load_tokenizer(tokenizer_dir)
    counts, sampled = _token_counts(data.rows, data.format, tok)
    estimated = tok is None or sampled is not None or (data.format == "chat" and tok.own_chat_template)
    basis = sampled or basis
    if tok is not None and data.format == "chat" and tok.own_chat_template:
        basis += ", chat rows in the fallback chat layout (the model's own chat template is not rendered)"
    prompts = _prompt_counts(data.rows, data.format, tok)
    dropped = [is_dropped(p, c, seq_len) for p, c in zip(prompts, counts)]
    total = sum(min(c, seq_len) for c, d in zip(counts, dropped) if not d)  # run's tokens: the rows it keeps
    kept = max(len(counts) - sum(dropped), 1)
    return DatasetStats(path=data.path, format=data.format, rows=len(counts), tokens_total=total,
                        mean_tokens=total / kept, rows_over_seq_len=sum(c > seq_len for c in counts),
                        rows_dropped=sum(dropped),
                        estimated=estimated, tokenizer=tok.path if tok else None, basis=basis)
