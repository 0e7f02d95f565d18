"""Dataset reading, checking, rendering and tokenizing (no model, no training)."""

from __future__ import annotations

import json

import pytest

from conftest import build_plan, data_file, requires_run

pytestmark = requires_run


def _parquet(tmp_path, src: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(src, encoding="utf-8") if line.strip()]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@pytest.mark.parametrize("name", ["instruction.jsonl", "instruction.json", "instruction.csv"])
def test_instruction_files_read_alike(name):
    from loraplan.executor.data import load_rows

    rows, fmt = load_rows(data_file(name), "auto")
    reference, _ = load_rows(data_file("instruction.jsonl"), "auto")
    assert fmt == "instruction"
    assert rows == reference  # an empty CSV cell reads as an empty input, not "nan"


def test_parquet_reads(tmp_path):
    from loraplan.executor.data import load_rows

    rows, fmt = load_rows(_parquet(tmp_path, data_file("chat.jsonl")), "auto")
    assert fmt == "chat" and len(rows) == 6 and rows[1]["messages"][0]["role"] == "system"


@pytest.mark.parametrize("name,fmt", [("chat.jsonl", "chat"), ("text.jsonl", "text"), ("text.csv", "text")])
def test_format_detected_from_first_row(name, fmt):
    from loraplan.executor.data import load_rows

    assert load_rows(data_file(name), "auto")[1] == fmt


@pytest.mark.parametrize(
    "name,fmt,expected",
    [
        ("bad_instruction.jsonl", "auto", "line 3 has no `output`"),
        ("bad_json.jsonl", "auto", "line 2 is not valid JSON"),
        ("bad_chat.jsonl", "auto", "line 2 message 1 lacks a string `role` or `content`"),
        ("empty.jsonl", "auto", "is empty"),
        ("text.jsonl", "instruction", "line 1 has no `instruction`"),
        ("missing.jsonl", "auto", "dataset not found"),
    ],
)
def test_bad_data_names_first_bad_line(name, fmt, expected):
    from loraplan.executor.data import load_rows
    from loraplan.executor.errors import RunError

    with pytest.raises(RunError) as info:
        load_rows(data_file(name), fmt)
    assert expected in info.value.message
    assert "\n" not in info.value.message


def test_unknown_fields_and_file_types(tmp_path):
    from loraplan.executor.data import load_rows
    from loraplan.executor.errors import RunError

    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(RunError, match="cannot tell its format"):
        load_rows(str(odd), "auto")
    txt = tmp_path / "data.txt"
    txt.write_text("hello\n")
    with pytest.raises(RunError, match="unsupported file type .txt"):
        load_rows(str(txt), "auto")


def test_instruction_loss_covers_the_response_only(tiny_tokenizer):
    from loraplan.executor.data import load_rows, tokenize_rows

    rows, fmt = load_rows(data_file("instruction.jsonl"), "auto")
    ds, report = tokenize_rows(rows, fmt, tiny_tokenizer, seq_len=256, path="x")
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    trained = [i for i, l in zip(ids, labels) if l != -100]
    assert tiny_tokenizer.decode(trained) == "Red is a primary colour." + tiny_tokenizer.eos_token
    assert "### Response:" in tiny_tokenizer.decode(ids)
    assert report.rows == 8 and report.truncated == 0 and report.tokens == sum(len(x) for x in ds["input_ids"])


def test_chat_uses_the_fallback_template_when_the_tokenizer_has_none(tiny_model_dir):
    from transformers import AutoTokenizer

    from loraplan.executor.data import FALLBACK_CHAT_TEMPLATE, load_rows, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not tok.chat_template
    rows, fmt = load_rows(data_file("chat.jsonl"), "auto")
    ds, report = tokenize_rows(rows, fmt, tok, seq_len=256, path="x")
    assert report.chat_template == "fallback" and tok.chat_template == FALLBACK_CHAT_TEMPLATE
    text = tok.decode(ds[1]["input_ids"])
    assert text == ("<s>### System:\nYou answer briefly.\n\n### User:\nCapital of Italy?\n\n"
                    "### Assistant:\nRome.</s>\n\n")


def test_chat_uses_the_tokenizers_own_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from loraplan.executor.data import load_rows, tokenize_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    rows, fmt = load_rows(data_file("chat.jsonl"), "auto")
    ds, report = tokenize_rows(rows, fmt, tok, seq_len=256, path="x")
    assert report.chat_template == "tokenizer"
    assert tok.decode(ds[0]["input_ids"]) == "<user>Hi there.<assistant>Hello! How can I help?"


def test_long_rows_are_truncated_and_counted(tiny_tokenizer):
    from loraplan.executor.data import load_rows, tokenize_rows

    rows, fmt = load_rows(data_file("text.jsonl"), "auto")
    ds, report = tokenize_rows(rows, fmt, tiny_tokenizer, seq_len=6, path="x")
    full, _ = tokenize_rows(rows, fmt, tiny_tokenizer, seq_len=10_000, path="x")
    longer = sum(len(x) > 6 for x in full["input_ids"])
    assert report.truncated == longer > 0
    assert max(len(x) for x in ds["input_ids"]) == 6


def test_prompt_filling_seq_len_is_dropped_and_counted(tiny_tokenizer):
    from loraplan.executor.data import tokenize_rows

    rows = [{"instruction": "word " * 50, "input": "", "output": "x"}, {"instruction": "a", "input": "", "output": "b"}]
    ds, report = tokenize_rows(rows, "instruction", tiny_tokenizer, seq_len=16, path="x")
    assert report.dropped == 1 and report.truncated == 1 and len(ds) == 1


def test_eval_fraction_holds_out_rows(tiny_tokenizer, tmp_path):
    from loraplan.executor.data import prepare_datasets

    plan = build_plan("m", data_file("instruction.jsonl"), str(tmp_path), eval_fraction=0.25)
    train, evals, report, eval_report = prepare_datasets(plan, tiny_tokenizer)
    assert len(train) == 6 and len(evals) == 2
    plan = build_plan("m", data_file("instruction.jsonl"), str(tmp_path), eval_path=data_file("instruction.csv"))
    train, evals, _, _ = prepare_datasets(plan, tiny_tokenizer)
    assert len(train) == 8 and len(evals) == 8
