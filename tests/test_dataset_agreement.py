"""`plan` and `run` accept and refuse exactly the same dataset files, with the same one-line message, and count
the same tokens when plan has the model's tokenizer.

Each file goes through the planner's path (planner.facts.dataset_stats.dataset_stats, and `loraplan plan --dataset`) and
through run's path (executor.data.load_rows / tokenize_rows, and `loraplan run`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT, build_plan, data_file, requires_run, subprocess_env, write_plan

pytestmark = requires_run

def _bytes(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _parquet(tmp_path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in Path(data_file("chat.jsonl")).read_text(encoding="utf-8").splitlines()]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


BOM = b"\xef\xbb\xbf"

# name -> a function of tmp_path giving the file's path
FILES = {
    "jsonl": lambda t: data_file("instruction.jsonl"),
    "json array": lambda t: data_file("instruction.json"),
    "json lines in .json": lambda t: data_file("instruction_lines.json"),
    "json {data: [...]}": lambda t: data_file("instruction_data.json"),
    "csv": lambda t: data_file("instruction.csv"),
    "csv with json messages": lambda t: data_file("chat.csv"),
    "chat jsonl": lambda t: data_file("chat.jsonl"),
    "text csv": lambda t: data_file("text.csv"),
    "parquet": _parquet,
    "bom jsonl": lambda t: _bytes(t, "bom.jsonl", BOM + Path(data_file("instruction.jsonl")).read_bytes()),
    "bom json": lambda t: _bytes(t, "bom.json", BOM + Path(data_file("instruction.json")).read_bytes()),
    "bom csv": lambda t: _bytes(t, "bom.csv", BOM + Path(data_file("instruction.csv")).read_bytes()),
    "single object .json": lambda t: data_file("single_object.json"),
    "empty file": lambda t: data_file("empty.jsonl"),
    "blank lines": lambda t: _bytes(t, "blank.jsonl", b"\n  \n\r\n"),
    "bad json line": lambda t: data_file("bad_json.jsonl"),
    "non-utf-8 jsonl": lambda t: _bytes(t, "latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n'),
    "non-utf-8 csv": lambda t: _bytes(t, "latin1.csv", b"text\nok\ncaf\xe9\n"),
    "utf-16": lambda t: _bytes(t, "utf16.jsonl", '{"text": "hi"}\n'.encode("utf-16")),
    "null output": lambda t: data_file("null_output.jsonl"),
    "empty messages": lambda t: data_file("empty_messages.jsonl"),
    "string messages": lambda t: data_file("string_messages.jsonl"),
    "message without content": lambda t: data_file("bad_chat.jsonl"),
    "csv empty output cell": lambda t: _bytes(t, "cell.csv", b"instruction,input,output\nq,,a\nq2,,\n"),
    "csv header only": lambda t: _bytes(t, "header.csv", b"instruction,input,output\n"),
    "csv extra field": lambda t: _bytes(t, "extra.csv", b"text\na\n\"b\",c\n"),
    "json array of non-objects": lambda t: _bytes(t, "mixed.json", b'[{"text": "a"}, "b"]'),
    "unknown fields": lambda t: _bytes(t, "odd.jsonl", b'{"question": "q", "answer": "a"}\n'),
    "unsupported extension": lambda t: _bytes(t, "data.txt", b"hello\n"),
    "directory": lambda t: str(t),
    "missing file": lambda t: str(t / "missing.jsonl"),
}

# what both must do: ("ok", rows, format) or ("error", a fragment of the one-line message)
EXPECTED = {
    "jsonl": ("ok", 8, "instruction"),
    "json array": ("ok", 8, "instruction"),
    "json lines in .json": ("ok", 8, "instruction"),
    "json {data: [...]}": ("ok", 8, "instruction"),
    "csv": ("ok", 8, "instruction"),
    "csv with json messages": ("ok", 6, "chat"),
    "chat jsonl": ("ok", 6, "chat"),
    "text csv": ("ok", 6, "text"),
    "parquet": ("ok", 6, "chat"),
    "bom jsonl": ("ok", 8, "instruction"),
    "bom json": ("ok", 8, "instruction"),
    "bom csv": ("ok", 8, "instruction"),
    "single object .json": ("error", ('holds a single JSON object, not a list of rows: expected a JSON array of '
                                      'objects, {"data": [...]}, or one JSON object per line')),
    "empty file": ("error", "empty.jsonl is empty"),
    "blank lines": ("error", "blank.jsonl is empty"),
    "bad json line": ("error", "bad_json.jsonl: line 2 is not valid JSON"),
    "non-utf-8 jsonl": ("error", "latin1.jsonl: line 2 is not UTF-8 (byte 0xe9 at position 14 of the line)"),
    "non-utf-8 csv": ("error", "latin1.csv: line 3 is not UTF-8 (byte 0xe9 at position 4 of the line)"),
    "utf-16": ("error", "utf16.jsonl is UTF-16 text"),
    "null output": ("error", "null_output.jsonl: line 2 has no `output`"),
    "empty messages": ("error", "empty_messages.jsonl: line 2 has no `messages` list"),
    "string messages": ("error", "string_messages.jsonl: line 2 has a `messages` string that is not a JSON list"),
    "message without content": ("error", "bad_chat.jsonl: line 2 message 1 lacks a string `role` or `content`"),
    "csv empty output cell": ("error", "cell.csv: line 3 has no `output`"),
    "csv header only": ("error", "header.csv has no rows"),
    "csv extra field": ("error", "extra.csv: line 3 has 2 fields, the header has 1"),
    "json array of non-objects": ("error", "mixed.json: record 2 is not a JSON object"),
    "unknown fields": ("error", "odd.jsonl: cannot tell its format from the first row (line 1; fields: answer, question)"),
    "unsupported extension": ("error", "unsupported file type .txt"),
    "directory": ("error", "dataset path is a directory, not a file"),
    "missing file": ("error", "dataset not found"),
}


def _planner(path: str) -> tuple:
    from loraplan.planner.facts.dataset_stats import dataset_stats
    from loraplan.planner.errors import InputError

    try:
        stats = dataset_stats(path, seq_len=64)
    except InputError as exc:
        return ("error", str(exc))
    return ("ok", stats.rows, stats.format)


def _run(path: str) -> tuple:
    from loraplan.executor.data import load_rows
    from loraplan.executor.errors import RunError

    try:
        rows, fmt = load_rows(path, "auto")
    except RunError as exc:
        return ("error", exc.message)
    return ("ok", len(rows), fmt)


def test_every_case_has_an_expectation():
    assert set(FILES) == set(EXPECTED)


@pytest.mark.parametrize("case", list(FILES))
def test_plan_and_run_agree(case, tmp_path):
    path = FILES[case](tmp_path)
    planned, run = _planner(path), _run(path)
    assert planned == run  # the same rows and format, or the very same message
    kind, *what = EXPECTED[case]
    assert planned[0] == kind, planned
    if kind == "ok":
        assert list(planned[1:]) == what
    else:
        message = planned[1]
        assert what[0] in message and "\n" not in message, message
        assert path.rstrip("/") in message  # names the file


def test_the_rows_run_trains_on_do_not_depend_on_the_file_type(tmp_path):
    from loraplan.executor.data import load_rows

    reference, _ = load_rows(data_file("instruction.jsonl"), "auto")
    for case in ("json array", "json lines in .json", "json {data: [...]}", "csv", "bom jsonl", "bom json", "bom csv"):
        assert load_rows(FILES[case](tmp_path), "auto")[0] == reference, case  # an empty CSV cell is input ""
    chat, _ = load_rows(data_file("chat.jsonl"), "auto")
    assert load_rows(data_file("chat.csv"), "auto")[0] == chat == load_rows(_parquet(tmp_path), "auto")[0]


def _plan_cli(*args) -> tuple[int, str, str]:
    from loraplan.cli import main

    res = CliRunner().invoke(main, ["plan", *map(str, args)])
    return res.exit_code, res.stdout, res.stderr


@pytest.mark.parametrize("case", ["single object .json", "non-utf-8 jsonl", "null output", "empty messages",
                                  "string messages", "bad json line", "empty file", "directory"])
def test_the_commands_print_the_same_error_line(case, tiny_model_dir, tmp_path, cli_run):
    path = FILES[case](tmp_path)
    code, _, err = _plan_cli(tiny_model_dir, "--gpu", "cpu", "--dataset", path, "--no-fit-table")
    plan = build_plan(tiny_model_dir, path, str(tmp_path / "out"))
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert code == result.exit_code == 2
    assert err.strip() == result.stderr.strip()  # one identical line
    assert len(err.strip().splitlines()) == 1 and err.startswith("Error: ") and "Traceback" not in err
    assert EXPECTED[case][1] in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("case", ["json lines in .json", "json {data: [...]}", "bom csv", "parquet"])
def test_a_file_plan_accepts_is_one_run_trains_on(case, tiny_model_dir, tiny_tokenizer, tmp_path):
    from loraplan.executor.data import prepare_datasets

    path = FILES[case](tmp_path)
    code, out, _ = _plan_cli(tiny_model_dir, "--gpu", "cpu", "--dataset", path, "--no-fit-table", "--json")
    assert code in (0, 1)
    planned = json.loads(out)["dataset"]
    train, _, report, _ = prepare_datasets(build_plan(tiny_model_dir, path, str(tmp_path / "out"),
                                                      fmt=planned["format"], seq_len=4096), tiny_tokenizer)
    assert (planned["rows"], planned["format"]) == (report.rows, report.format) == (len(train), EXPECTED[case][2])


@pytest.mark.parametrize("name", ["instruction.jsonl", "text.jsonl", "chat.jsonl", "chat.csv"])
@pytest.mark.parametrize("seq_len", [4096, 30])  # 30: some rows of each file are cut, no prompt fills it
def test_tokens_counted_with_the_models_tokenizer_match_run(name, seq_len, tiny_model_dir, tiny_tokenizer):
    from loraplan.executor.data import load_rows, tokenize_rows
    from loraplan.planner.facts.dataset_stats import dataset_stats

    stats = dataset_stats(data_file(name), seq_len, tokenizer_dir=tiny_model_dir)
    rows, fmt = load_rows(data_file(name), "auto")
    _, report = tokenize_rows(rows, fmt, tiny_tokenizer, seq_len, data_file(name))
    assert stats.estimated is False and stats.tokenizer.endswith("tokenizer.json")
    assert stats.basis == "counted with the model's tokenizer"
    assert stats.tokens_total == report.tokens and stats.rows_over_seq_len == report.truncated
    assert report.dropped == 0 and (report.truncated > 0) == (seq_len == 30)
    guess = dataset_stats(data_file(name), seq_len)  # no tokenizer: 4 characters per token
    assert guess.estimated is True and guess.tokenizer is None and guess.basis.startswith("estimated at 4 characters")


def test_the_planners_chat_layout_is_runs_fallback_template(tiny_model_dir):
    from transformers import AutoTokenizer

    from loraplan.executor.data import FALLBACK_CHAT_TEMPLATE, load_rows
    from loraplan.planner.facts.dataset_stats import fallback_chat_text

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = load_rows(data_file("chat.jsonl"), "auto")
    for row in rows:
        rendered = tok.apply_chat_template(row["messages"], tokenize=False, chat_template=FALLBACK_CHAT_TEMPLATE)
        assert fallback_chat_text(row["messages"], tok.bos_token, tok.eos_token) == rendered


def test_a_model_with_its_own_chat_template_counts_chat_as_an_estimate(tiny_model_dir, tmp_path):
    import shutil

    from loraplan.planner.facts.dataset_stats import dataset_stats

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    chat = dataset_stats(data_file("chat.jsonl"), 4096, tokenizer_dir=str(model))
    assert chat.estimated is True and "fallback chat layout" in chat.basis
    assert dataset_stats(data_file("text.jsonl"), 4096, tokenizer_dir=str(model)).estimated is False


def test_a_large_file_tokenizes_a_spread_sample(tiny_model_dir, monkeypatch):
    from loraplan.planner.facts import dataset_stats as datasets

    exact = datasets.dataset_stats(data_file("instruction.jsonl"), 4096, tokenizer_dir=tiny_model_dir)
    monkeypatch.setattr(datasets, "TOKENIZE_BUDGET_CHARS", 400)  # the 8 rows hold about 620 characters
    sampled = datasets.dataset_stats(data_file("instruction.jsonl"), 4096, tokenizer_dir=tiny_model_dir)
    assert sampled.estimated is True and "on 4 of 8 rows" in sampled.basis
    assert abs(sampled.tokens_total - exact.tokens_total) <= 0.1 * exact.tokens_total


def test_a_model_directory_without_a_usable_tokenizer_falls_back_to_the_estimate(tmp_path):
    from loraplan.planner.facts.dataset_stats import dataset_stats

    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    broken = dataset_stats(data_file("text.jsonl"), 64, tokenizer_dir=str(tmp_path))
    assert broken.estimated is True and "cannot be loaded" in broken.basis
    none = dataset_stats(data_file("text.jsonl"), 64, tokenizer_dir=str(tmp_path / "nothing"))
    assert none.estimated is True and "no tokenizer.json" in none.basis
    assert broken.tokens_total == none.tokens_total == dataset_stats(data_file("text.jsonl"), 64).tokens_total


def test_counting_with_the_tokenizer_keeps_the_planner_torch_free(tiny_model_dir):
    code = ("import sys; from loraplan.planner.facts.dataset_stats import dataset_stats; "
            f"s = dataset_stats({data_file('chat.jsonl')!r}, 64, tokenizer_dir={tiny_model_dir!r}); "
            "assert s.estimated is False, s; "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=subprocess_env())
