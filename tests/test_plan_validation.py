"""Plans that cannot run are refused at load, with one line naming the field and what it may be.

Without these checks a hand-edited plan ends in a traceback from torch or transformers, or "completes" an
untrained adapter with exit 0 (num_epochs: -1 gave "steps 0 / -3").
"""

from __future__ import annotations

import pytest
import yaml

from conftest import build_plan, data_file

from loraplan.planner.errors import PlanError
from loraplan.planner.planfile.schema import Plan


def _plan_file(tmp_path, edit=None, **training) -> str:
    plan = build_plan(str(tmp_path / "no-model"), data_file("instruction.jsonl"), str(tmp_path / "out"), **training)
    data = plan.to_dict()
    if edit:
        section, field, value = edit
        data[section][field] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


BAD = [
    ("training", "num_epochs", -1.0, "training.num_epochs must be > 0 (or set training.max_steps > 0), got -1"),
    ("training", "num_epochs", 0.0, "training.num_epochs must be > 0"),
    ("training", "learning_rate", -1.0, "training.learning_rate must be > 0, got -1"),
    ("training", "learning_rate", 0.0, "training.learning_rate must be > 0, got 0"),
    ("training", "learning_rate", float("nan"), "training.learning_rate must be a finite number, got nan"),
    ("training", "learning_rate", float("inf"), "training.learning_rate must be a finite number, got inf"),
    ("training", "logging_steps", 0, "training.logging_steps must be >= 1, got 0"),
    ("training", "save_steps", 0, "training.save_steps must be >= 1, got 0"),
    ("training", "save_total_limit", 0, "training.save_total_limit must be >= 1, got 0"),
    ("training", "warmup_ratio", 1.0, "training.warmup_ratio must be in [0, 1), got 1"),
    ("training", "warmup_ratio", -0.1, "training.warmup_ratio must be in [0, 1), got -0.1"),
    ("training", "weight_decay", -0.01, "training.weight_decay must be >= 0, got -0.01"),
    ("training", "max_grad_norm", 0.0, "training.max_grad_norm must be > 0, got 0"),
    ("training", "max_grad_norm", float("-inf"), "training.max_grad_norm must be a finite number, got -inf"),
    ("training", "seq_len", 2**25, "training.seq_len must be between 1 and 16,777,216 (2**24), got 3.35544e+07"),
    ("training", "seed", -1, "training.seed must be in [0, 2**32), got -1"),
    ("dataset", "eval_fraction", 1.0, "dataset.eval_fraction must be in [0, 1), got 1"),
    ("dataset", "eval_fraction", float("nan"), "dataset.eval_fraction must be a finite number, got nan"),
    ("lora", "lora_alpha", 0, "lora.lora_alpha must be > 0, got 0"),
    ("hardware", "memory_gib", float("nan"), "hardware.memory_gib must be a finite number, got nan"),
    ("prediction", "margin", 1.5, "prediction.margin must be in [0, 1), got 1.5"),
]


@pytest.mark.parametrize("section,field,value,message", BAD, ids=[f"{b[1]}={b[2]}" for b in BAD])
def test_run_refuses_a_number_that_cannot_run(section, field, value, message, tmp_path, cli_run):
    # max_steps -1: the number of epochs decides the run's length (max_steps > 0 would override it)
    result = cli_run(_plan_file(tmp_path, (section, field, value), max_steps=-1))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_yaml_nan_written_by_hand_is_refused(tmp_path, cli_run):
    path = tmp_path / "plan.yaml"
    text = open(_plan_file(tmp_path)).read()
    assert "learning_rate: 0.005\n" in text
    path.write_text(text.replace("learning_rate: 0.005\n", "learning_rate: .nan\n"))
    result = cli_run(str(path))
    assert result.exit_code == 2 and "training.learning_rate must be a finite number, got nan" in result.stderr


def test_epochs_may_be_unset_when_max_steps_decides(tmp_path):
    plan = build_plan("m", data_file("instruction.jsonl"), str(tmp_path), max_steps=5, num_epochs=-1.0)
    plan.validate()  # max_steps > 0 overrides num_epochs: a valid plan
    plan.training.max_steps = -1
    with pytest.raises(PlanError, match="training.num_epochs must be > 0"):
        plan.validate()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.75, 0.9])
def test_a_truncated_plan_file_says_so(tmp_path, cli_run, fraction):
    full = open(_plan_file(tmp_path), "rb").read()
    cut = tmp_path / "cut.yaml"
    cut.write_bytes(full[: int(len(full) * fraction)])
    result = cli_run(str(cut))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"Error: plan file {cut} has no version field: truncated, or not a loraplan plan")


@pytest.mark.parametrize("content", ["", "just a string\n", "- a\n- list\n", "model: {name: x}\n"])
def test_a_file_that_is_not_a_plan_says_so(content, tmp_path):
    path = tmp_path / "notes.yaml"
    path.write_text(content)
    with pytest.raises(PlanError, match="has no version field: truncated, or not a loraplan plan"):
        Plan.load(str(path))


@pytest.mark.parametrize("model,gpu", [("llama-3.1-8b", "a100-80gb"), ("llama-3.1-70b", "h100-80gb"),
                                       ("llama-3.2-1b", "t4")])
def test_what_the_planner_writes_passes(model, gpu, tmp_path):
    """The checks refuse nothing the planner writes: its plans round-trip through a file and load."""
    from loraplan.planner.api import PlanRequest, make_plan

    plan = make_plan(PlanRequest(model=model, gpu=gpu)).plan
    plan.save(str(tmp_path / "plan.yaml"))
    assert Plan.load(str(tmp_path / "plan.yaml")) == plan
