"""The training-backend seam: the planner's table (planner/plugins/backends.py) and the executor's registry
(executor/backends/) name the same backends, a plan names one in training.backend (old files: "hf"), an unknown
or refusing one is refused at load in one line, and the standard backend trains through the seam."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, build_plan, data_file, one_line_error, requires_run, subprocess_env, write_plan

from loraplan.planner.plugins.backends import BACKENDS, DEFAULT_BACKEND, Backend
from loraplan.planner.errors import PlanError
from loraplan.planner.planfile.schema import Plan


def test_the_planner_table_and_the_executor_registry_name_the_same_backends():
    import loraplan.executor.backends as registry

    assert list(BACKENDS)[0] == DEFAULT_BACKEND == "hf"  # the standard path is the first entry
    assert set(registry.MODULES) == set(BACKENDS)
    # every module in the package is a planner entry's (no executor-only backend), and says so itself
    modules = {m.name for m in pkgutil.iter_modules(registry.__path__)}
    assert modules == {name.replace("-", "_") for name in BACKENDS}
    for name in BACKENDS:
        backend = registry.backend_named(name)
        assert backend.name == name
        for step in ("check_installed", "prepare_process", "set_seed", "load_tokenizer", "load_model",
                     "wrap_adapter", "build_trainer", "load_last_step"):
            assert callable(getattr(backend, step)), (name, step)


def test_the_registry_and_the_planner_table_import_no_training_library():
    code = ("import sys, loraplan.planner.plugins.backends, loraplan.executor.backends as b; [b.backend_named(n) for n in b.MODULES]; "
            "print([m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def _plan_dict(tmp_path) -> dict:
    plan = build_plan("m", data_file("text.jsonl"), str(tmp_path / "out"))
    return plan.to_dict()


def test_a_plan_file_without_the_backend_field_loads_as_hf(tmp_path):
    data = _plan_dict(tmp_path)
    assert data["training"]["backend"] == "hf"
    del data["training"]["backend"]
    path = tmp_path / "old-plan.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    plan = Plan.load(str(path))
    assert plan.training.backend == "hf"
    again = tmp_path / "old-plan.json"
    again.write_text(json.dumps(data), encoding="utf-8")
    assert Plan.load(str(again)).training.backend == "hf"


def test_an_unknown_backend_is_refused_at_load_in_one_line(tmp_path):
    data = _plan_dict(tmp_path)
    data["training"]["backend"] = "nope"
    with pytest.raises(PlanError, match=r"^training.backend must be hf or unsloth, not 'nope'$"):
        Plan.from_dict(data)


def test_run_refuses_a_plan_with_an_unknown_backend_with_exit_2(tmp_path, cli_run):
    data = _plan_dict(tmp_path)
    data["training"]["backend"] = "nope"
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    one_line_error(cli_run(path), 2, "training.backend", "nope", "hf")
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_a_backend_refusal_is_one_line_at_load(tmp_path, monkeypatch):
    """What a backend refuses (strategy, method, savers on) is asked at load, by the table entry itself."""
    def refusal(strategy, method, savers):
        return f"no {method} under {strategy}" if method == "lora" and not savers else None

    monkeypatch.setitem(BACKENDS, "picky", Backend("picky", "refuses plain LoRA", (), "", refusal=refusal))
    data = _plan_dict(tmp_path)
    data["training"]["backend"] = "picky"
    with pytest.raises(PlanError) as err:
        Plan.from_dict(data)
    assert str(err.value) == "training.backend picky cannot train this plan: no lora under cpu"
    assert BACKENDS["hf"].refuses("cpu", "lora", frozenset()) is None


@requires_run
@pytest.mark.slow
def test_the_hf_backend_trains_the_tiny_model_on_the_cpu_through_the_seam(tiny_model_dir, tmp_path, cli_run):
    from loraplan.executor.backends import backend_for
    from loraplan.executor.backends.hf import HFBackend

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(out), max_steps=4, save_steps=4)
    assert isinstance(backend_for(plan), HFBackend)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert summary["first_loss"] is not None and summary["final_loss"] is not None
    # the backend's wrap_adapter recorded where merge finds the base
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
    assert Plan.load(str(out / "plan.yaml")).training.backend == "hf"
