"""Bad input to `run` exits 2 with one line and no traceback; out of memory exits 1 naming what to try."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import build_plan, data_file, one_line_error, requires_run, subprocess_env, write_plan

pytestmark = requires_run


def test_executor_cli_imports_no_training_stack():
    code = ("import sys, loraplan.executor.cli; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', "
            "'accelerate', 'bitsandbytes') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_plan_file_errors(tmp_path, cli_run):
    one_line_error(cli_run(tmp_path / "nope.yaml"), 2, "plan file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    one_line_error(cli_run(bad), 2, "not valid YAML")
    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path / "out"))
    data = plan.to_dict()
    data["version"] = 99
    import yaml

    (tmp_path / "v99.yaml").write_text(yaml.safe_dump(data))
    one_line_error(cli_run(tmp_path / "v99.yaml"), 2, "unknown plan version 99")
    data["version"] = 1
    data["training"]["global_batch_size"] = 7
    (tmp_path / "inconsistent.yaml").write_text(yaml.safe_dump(data))
    one_line_error(cli_run(tmp_path / "inconsistent.yaml"), 2, "global_batch_size 7")
    one_line_error(cli_run(), 2, "missing PLAN")
    one_line_error(cli_run(tmp_path / "v99.yaml", "--demo"), 2, "not both")
    one_line_error(cli_run(tmp_path / "v99.yaml", "--resume", "--overwrite"), 2, "not both")


def test_an_infeasible_plan_is_refused_unless_forced(tmp_path, cli_run, tiny_model_dir):
    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(tmp_path / "out"), max_steps=2)
    plan.prediction.per_gpu_gib = 20.0  # more than 90 % of the plan's 16 GiB card
    path = write_plan(plan, tmp_path / "big.yaml")
    one_line_error(cli_run(path), 2, "does not fit", "--force")
    assert not (tmp_path / "out").exists()
    result = cli_run(path, "--force")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()


def test_model_path_without_a_model(tmp_path, cli_run):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    plan = build_plan(str(empty), data_file("text.jsonl"), str(tmp_path / "out"))
    one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, "holds no model")
    (empty / "config.json").write_text("{}")
    one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, "holds no model weights")
    plan = build_plan(str(tmp_path / "missing"), data_file("text.jsonl"), str(tmp_path / "out"))
    one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, "does not exist")
    assert not os.path.exists(tmp_path / "out")  # nothing written before the inputs check out


def test_hub_id_not_in_the_local_cache(tmp_path, cli_run, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    plan = build_plan("x", data_file("text.jsonl"), str(tmp_path / "out"))
    plan.model.path = None
    plan.model.hub_id = "nobody/not-a-model"
    line = one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, "not in the local Hugging Face cache")
    assert "nobody/not-a-model" in line


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("missing.jsonl", "dataset not found"),
        ("empty.jsonl", "is empty"),
        ("bad_instruction.jsonl", "line 3 has no `output`"),
        ("bad_json.jsonl", "line 2 is not valid JSON"),
    ],
)
def test_dataset_errors(name, fragment, tiny_model_dir, tmp_path, cli_run):
    plan = build_plan(tiny_model_dir, data_file(name), str(tmp_path / "out"))
    one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, fragment)


def test_missing_run_extra_names_the_install_command(tmp_path, cli_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # import trl now raises ImportError
    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path / "out"))
    one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 2, 'pip install -e ".[run]"', "trl")


@pytest.mark.slow
def test_out_of_memory_stops_with_advice_and_keeps_the_last_checkpoint(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    """No GPU here to exhaust, so the step raises the error torch raises when an allocation fails."""
    import torch
    import transformers

    original = transformers.Trainer.training_step

    def failing_step(self, *args, **kwargs):
        if self.state.global_step >= 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", failing_step)
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=6, save_steps=2)
    line = one_line_error(cli_run(write_plan(plan, tmp_path / "p.yaml")), 1, "out of memory at step 3", "observed peak",
                           "plan again with", "micro_batch_size 2 with grad_accum_steps 2", "qlora")
    assert str(out / "checkpoint-2") in line
    assert os.path.exists(out / "checkpoint-2" / "COMPLETE")
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "out_of_memory" and summary["steps"] == 3 and summary["message"] in line


def test_loraplan_cli_exposes_run_and_merge():
    for command, option in (("run", "--resume"), ("merge", "--dtype")):
        out = subprocess.run([sys.executable, "-c", "from loraplan.cli import main; main()", command, "--help"],
                             env=subprocess_env(), capture_output=True, text=True)
        assert out.returncode == 0 and option in out.stdout, out.stderr
