"""The Python API: `loraplan.plan` / `loraplan.run` / `loraplan.merge`, the same facts and errors as the CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import loraplan
from conftest import requires_run


def test_import_and_plan_stay_free_of_torch():
    code = ("import loraplan, sys; r = loraplan.plan('llama-3.1-8b', gpu='rtx-4090'); "
            "assert r.feasible; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_plan_returns_the_same_facts_as_json(tmp_path):
    from click.testing import CliRunner

    from loraplan.cli import main

    res = loraplan.plan("llama-3.1-8b", gpu="rtx-4090", method="qlora", rank=32, seq_len=4096, fit_table=False,
                        report_to="tensorboard", output=str(tmp_path / "plan.yaml"))
    cli = CliRunner().invoke(main, ["plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--method", "qlora", "--rank", "32",
                                    "--seq-len", "4096", "--no-fit-table", "--report-to", "tensorboard", "--json"])
    assert cli.exit_code == 0, cli.output
    from_cli = json.loads(cli.stdout)
    from_api = res.to_json()
    from_cli.pop("plan_file"), from_cli.pop("plot_file")
    assert from_api == from_cli
    assert from_api["training"]["report_to"] == "tensorboard"
    assert loraplan.run.__module__ == "loraplan.api"
    from loraplan.planner.planfile.schema import Plan

    assert Plan.load(str(tmp_path / "plan.yaml")) == res.plan
    text = repr(res)
    assert "llama-3.1-8b" in text and "fits" in text and "qlora" in text and "GiB" in text and len(text) < 400
    html = res._repr_html_()
    assert "<html" in html.lower() and "lora_B" not in html and "Memory" in html


@pytest.mark.parametrize("options, fragment", [
    ({"report_to": "neptune"}, "--report-to must be none, tensorboard"),
    ({"ranks": 8}, "unknown option 'ranks'"),
    ({"rank": -1}, "--rank must be a positive integer"),
    ({"method": "dora"}, "--method must be"),
])
def test_bad_input_is_one_documented_exception(options, fragment):
    with pytest.raises(loraplan.LoraplanError, match=fragment.replace("(", r"\(")) as info:
        loraplan.plan("llama-3.1-8b", gpu="rtx-4090", **options)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_the_error_types_share_one_base():
    from loraplan.executor.errors import Interrupted, RunError, TrainingFailed
    from loraplan.planner.errors import ArchitectureError, InputError, PlanError

    for cls in (InputError, PlanError, ArchitectureError, RunError, TrainingFailed, Interrupted):
        assert issubclass(cls, loraplan.LoraplanError)
    assert issubclass(InputError, ValueError)  # what callers caught before keeps working
    assert (TrainingFailed.exit_code, Interrupted.exit_code) == (1, 130)


@requires_run
@pytest.mark.slow
def test_run_returns_the_summary_and_merge_the_model(tmp_path):
    from loraplan.executor.summary import RunSummary

    out = tmp_path / "demo"
    summary = loraplan.run(demo=True, output_dir=str(out), max_steps=4, console=None)
    assert isinstance(summary, RunSummary) and summary.status == "completed" and summary.steps == 4
    assert RunSummary.read(str(out / "summary.json")) == summary
    if importlib.util.find_spec("matplotlib") is not None:  # the [plot] extra (in [dev])
        assert summary.loss_plot == str(out / "loss.png") and os.path.getsize(summary.loss_plot) > 10_000
    with pytest.raises(loraplan.LoraplanError, match="already holds a run"):
        loraplan.run(str(out / "plan.yaml"), console=None)
    merged = loraplan.merge(summary.adapter_dir, str(tmp_path / "merged"), dtype="fp32")
    assert os.path.exists(os.path.join(merged, "config.json"))
    with pytest.raises(loraplan.LoraplanError, match="--dtype"):
        loraplan.merge(summary.adapter_dir, str(tmp_path / "merged2"), dtype="int3")
