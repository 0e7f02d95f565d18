"""What a newcomer typed into `loraplan plan` that it used to accept or misreport (issue: "What a newcomer tripped
over"): every case a one-line error (exit 2) or an honest plan."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

from loraplan.cli import main


def plan(*args):
    return CliRunner().invoke(main, ["plan", *args])


@pytest.mark.parametrize("args,message", [
    (["--lr", "nan"], "--learning-rate must be a positive finite number, got nan"),
    (["--lr", "inf"], "--learning-rate must be a positive finite number, got inf"),
    (["--lr", "-1"], "--learning-rate must be a positive finite number"),
    (["--epochs", "inf"], "--epochs must be a positive finite number, got inf"),
    (["--train-tokens", "-1"], "--train-tokens must be a positive integer, got -1"),
    (["--seq-len", str(10**30)], "beyond any model's context"),
    (["--seq-len", "0"], "--seq-len must be a positive integer"),
    (["--dropout", "nan"], "--dropout must be in [0, 1)"),
])
def test_numbers_no_plan_can_use_are_refused_in_one_line(args, message):
    res = plan("llama-3.1-8b", "--gpu", "rtx-4090", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def _json(*args):
    res = plan(*args, "--json", "--no-fit-table")
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.output)


def test_a_sequence_beyond_the_models_context_plans_with_a_warning_in_the_plan_and_the_report():
    j = _json("llama-3.1-8b", "--gpu", "h200", "--seq-len", "200000", "--method", "qlora")
    assert any("max_position_embeddings (131,072)" in w for w in j["warnings"])
    assert j["plan"]["warnings"] == j["warnings"]
    res = plan("llama-3.1-8b", "--gpu", "h200", "--seq-len", "200000", "--method", "qlora", "--no-fit-table")
    assert "warning:" in res.output and "max_position_embeddings" in res.output


def test_cpu_processes_share_one_ram():
    one, four = _json("qwen2.5-0.5b", "--gpu", "cpu"), _json("qwen2.5-0.5b", "--gpu", "cpu", "--num-gpus", "4")
    assert four["hardware"]["memory_gib"] == pytest.approx(one["hardware"]["memory_gib"] / 4, rel=0.01)
    assert any("share one machine's RAM" in w for w in four["warnings"])


def test_reasons_name_the_compute_dtype_of_the_card():
    t4 = _json("llama-3.1-8b", "--gpu", "t4")
    assert t4["plan"]["training"]["dtype"] == "float16"
    assert "bf16" not in t4["decision"]["reasons"]["method"]
    assert "fp16" in t4["estimate"]["basis"]


def test_moe_qlora_says_in_words_that_the_experts_stay_unquantized():
    j = _json("mixtral-8x7b", "--gpu", "a100-80gb", "--method", "qlora")
    why = j["decision"]["reasons"]["quantization"]
    assert "expert weights stay in bf16" in why and "GiB" in why


def test_the_dataset_path_is_stored_absolute_so_the_plan_runs_from_any_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello world"}\n' * 3)
    monkeypatch.chdir(tmp_path)
    j = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", "data/train.jsonl")
    assert j["plan"]["dataset"]["path"] == os.path.join(str(tmp_path), "data", "train.jsonl")


def test_logging_scales_with_a_short_run(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello world"}\n' * 40)
    j = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--dataset", str(data), "--epochs", "1", "--global-batch-size", "4")
    assert j["plan"]["training"]["logging_steps"] == 1  # 10 steps: log each one, not only the first
    j = _json("llama-3.1-8b", "--gpu", "rtx-4090", "--max-steps", "1000")
    assert j["plan"]["training"]["logging_steps"] == 10


@pytest.mark.parametrize("content,message", [
    (b'{"model_type": "llama",', "is not valid JSON: Expecting"),
    (b'["llama"]', "must hold a JSON object, not list"),
    (b'\xff\xfe{"a": 1}', "cannot read"),
])
def test_a_broken_model_config_is_named_in_one_line(content, message, tmp_path):
    """A model's config.json that transformers could not read either: said in one line (exit 2), by the one reader
    the model configs and other tools' YAML configs share (planner.facts.config_file)."""
    path = tmp_path / "config.json"
    path.write_bytes(content)
    for target in (str(path), str(tmp_path)):  # the file, or its model folder
        res = plan(target, "--gpu", "rtx-4090")
        assert res.exit_code == 2, res.output
        assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert str(path) in res.output and "Traceback" not in res.output


def test_a_plan_file_that_cannot_be_written_names_the_path_given(tmp_path):
    """-o naming a folder, or a place no file can go: one line with the user's path (not a temp file's), exit 2,
    and no temp file left anywhere."""
    res = plan("llama-3.1-8b", "--gpu", "rtx-4090", "-o", str(tmp_path))
    assert res.exit_code == 2, res.output
    assert f"cannot write {tmp_path}: it is a directory" in res.output and len(res.output.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = plan("llama-3.1-8b", "--gpu", "rtx-4090", "-o", str(blocker / "plan.yaml"))  # a file where a folder must be
    assert res.exit_code == 2 and f"cannot write {blocker / 'plan.yaml'}" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and not list(tmp_path.parent.glob(".tmp-*"))
