"""`--report-to`: the run's logs reach a real tracker, in the output folder, offline, and read back with the
tracker's own reader; a missing tracker package is one line before anything is written."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml

from conftest import one_line_error, requires_run

pytestmark = [requires_run, pytest.mark.slow]

STEPS = 6


def _demo(cli_run, out, *extra):
    result = cli_run("--demo", "--output-dir", str(out), "--max-steps", str(STEPS), *extra)
    assert result.exit_code == 0, result.output
    return result


def _train_losses(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_event_files_hold_the_loss_curve_and_resume_appends(cli_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "demo"
    result = _demo(cli_run, out, "--report-to", "tensorboard")
    assert "loss plot" in result.stdout
    with open(out / "plan.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["training"]["report_to"] == "tensorboard"  # the override is recorded
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses == pytest.approx(_train_losses(out), rel=1e-5)  # the same curve as metrics.jsonl
    assert sorted(losses) == list(range(1, STEPS + 1))
    tags = events.Tags()["scalars"]
    for name in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s", "train/cpu_rss_peak_gib",
                 "train/predicted_peak_gib"):
        assert name in tags, tags
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_s"))
    plan_text = events.Tensors("loraplan/plan/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: lora" in plan_text and "micro_batch_size" in plan_text  # the decisions, as run config
    ident = json.loads((out / "tracker.json").read_text())

    # resumed (at its last step here): the same folder keeps the same tracker run
    result = cli_run("--demo", "--output-dir", str(out), "--max-steps", str(STEPS), "--resume")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "tracker.json").read_text()) == ident


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow")
def test_mlflow_file_store_in_the_output_dir(cli_run, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "demo"
    _demo(cli_run, out, "--report-to", "mlflow")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the defaults are restored after the run
    ident = json.loads((out / "tracker.json").read_text())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file:" + str(out / "mlruns"))
    run = client.get_run(ident["mlflow_run_id"])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx(_train_losses(out), rel=1e-5)
    assert run.data.params["loraplan.method"] == "lora" and "loraplan.predicted_peak_gib" in run.data.params
    assert {"tokens_per_s", "learning_rate", "grad_norm", "predicted_peak_gib"} <= set(run.data.metrics)


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb", "trackio"])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(name, cli_run, tmp_path, monkeypatch):
    import sys

    from loraplan.executor.trackers import TRACKERS

    tracker = TRACKERS[name]
    monkeypatch.setitem(sys.modules, tracker.module, None)  # Python's own "not importable": find_spec says None
    out = tmp_path / "demo"
    result = cli_run("--demo", "--output-dir", str(out), "--report-to", name)
    one_line_error(result, 2, f"--report-to {name} needs the {tracker.package} package", f"pip install {tracker.package}")
    assert not out.exists()


def test_a_plan_with_an_unknown_tracker_is_refused_at_load(tmp_path):
    from loraplan.planner.errors import PlanError
    from loraplan.planner.planfile.schema import Plan

    plan = _plan_dict()
    plan["training"]["report_to"] = "neptune"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanError, match="training.report_to must be none, tensorboard"):
        Plan.load(str(tmp_path / "p.yaml"))
    del plan["training"]["report_to"]  # a plan written before trackers loads, reporting to none
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(plan))
    assert Plan.load(str(tmp_path / "p.yaml")).training.report_to == "none"


def _plan_dict():
    from loraplan.planner.api import PlanRequest, make_plan

    return make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", fit_table=False)).plan.to_dict()


def _cut_back_to_step_6(out):
    """As if the run had been killed after its step-6 checkpoint: the later checkpoint and the adapter gone."""
    import shutil

    shutil.rmtree(out / "checkpoint-12")
    shutil.rmtree(out / "adapter")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_resume_appends_without_doubling_steps(tiny_model_dir, tmp_path, cli_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import build_plan, data_file, write_plan

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=12, save_steps=6,
                      logging_steps=2, eval_fraction=0.25, report_to="tensorboard")
    path = write_plan(plan, tmp_path / "plan.yaml")
    assert cli_run(path).exit_code == 0
    first = _train_losses(out)
    _cut_back_to_step_6(out)
    result = cli_run(path, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed at 6" in result.stdout
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 12  # one curve, each step once
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert losses == pytest.approx(_train_losses(out), rel=1e-5)
    assert {s: v for s, v in losses.items() if s <= 6} == pytest.approx({s: v for s, v in first.items() if s <= 6})
    assert "eval/loss" in events.Tags()["scalars"]  # the eval set's loss, in the same run


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="needs mlflow")
def test_mlflow_resume_reattaches_to_the_same_run(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    from conftest import build_plan, data_file, write_plan

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=12, save_steps=6,
                      logging_steps=2, eval_fraction=0.25, report_to="mlflow")
    path = write_plan(plan, tmp_path / "plan.yaml")
    assert cli_run(path).exit_code == 0
    run_id = json.loads((out / "tracker.json").read_text())["mlflow_run_id"]
    _cut_back_to_step_6(out)
    assert cli_run(path, "--resume").exit_code == 0
    assert json.loads((out / "tracker.json").read_text())["mlflow_run_id"] == run_id
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri="file:" + str(out / "mlruns"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id]  # one run: the resume and the final eval went into it
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert set(steps) == set(_train_losses(out)) and max(steps) == 12  # MLflow keeps the retrained steps' old points too
    assert client.get_metric_history(run_id, "eval_loss")


def _wandb_records(run_dir):
    """W&B's own reader of an offline run's transaction log (`wandb leet inspect --json`): one dict per record."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def _wandb_losses(records):
    return {int(r["history"]["item"]["train/global_step"]): r["history"]["item"]["train/loss"]
            for r in records if r["type"] == "history" and "train/loss" in r["history"]["item"]}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="needs wandb")
def test_wandb_offline_run_in_the_output_dir_and_resume_keeps_its_id(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    from conftest import build_plan, data_file, write_plan

    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=12, save_steps=6,
                      logging_steps=2, report_to="wandb")
    path = write_plan(plan, tmp_path / "plan.yaml")
    assert cli_run(path).exit_code == 0
    assert "WANDB_MODE" not in os.environ  # the offline defaults are restored after the run
    ident = json.loads((out / "tracker.json").read_text())
    [first_dir] = (out / "wandb").glob("offline-run-*")  # offline: nothing left the machine
    records = _wandb_records(first_dir)
    [run] = [r["run"] for r in records if r["type"] == "run"]
    assert run["run_id"] == ident["run_id"] and run["display_name"] == ident["run_name"] and run["project"] == "loraplan"
    assert _wandb_losses(records) == pytest.approx(_train_losses(out), rel=1e-5)  # metrics.jsonl's curve
    logged = {k for r in records if r["type"] == "history" for k in r["history"]["item"]}
    assert {"train/tokens_per_s", "train/learning_rate", "train/grad_norm", "train/predicted_peak_gib"} <= logged
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"].get("update", {}).items()}
    assert config["loraplan"]["method"] == "lora" and config["loraplan"]["lora_r"] == plan.lora.r  # the decisions

    _cut_back_to_step_6(out)
    result = cli_run(path, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed at 6" in result.stdout
    resumed = [d for d in (out / "wandb").glob("offline-run-*") if d != first_dir]
    assert resumed, "the resumed run wrote no W&B run"
    records = _wandb_records(resumed[-1])
    assert [r["run"]["run_id"] for r in records if r["type"] == "run"] == [ident["run_id"]]  # the same W&B run
    after = {step: loss for step, loss in _train_losses(out).items() if step > 6}
    assert after and _wandb_losses(records) == pytest.approx(after, rel=1e-5)  # the retrained steps, once each


def _trackio_logs(out, run_name):
    """trackio's own reader (its SQLiteStorage) over the run's folder: (logs, config) of that run."""
    from trackio import sqlite_storage, utils

    from loraplan.executor.trackers import PROJECT

    saved = utils.TRACKIO_DIR, sqlite_storage.TRACKIO_DIR
    utils.TRACKIO_DIR = sqlite_storage.TRACKIO_DIR = out / "trackio"  # trackio reads TRACKIO_DIR once, at import
    try:
        storage = sqlite_storage.SQLiteStorage
        assert storage.get_runs(PROJECT) == [run_name]
        return storage.get_logs(PROJECT, run_name), storage.get_run_config(PROJECT, run_name)
    finally:
        utils.TRACKIO_DIR, sqlite_storage.TRACKIO_DIR = saved


@pytest.mark.skipif(importlib.util.find_spec("trackio") is None, reason="needs trackio")
def test_trackio_logs_stay_in_each_runs_own_folder(cli_run, tmp_path, monkeypatch):
    """Two runs in one process (the Python API, a notebook): each one's trackio database is in its own output folder,
    although trackio reads TRACKIO_DIR only when first imported."""
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    outs = [tmp_path / "first", tmp_path / "second"]
    for out in outs:
        _demo(cli_run, out, "--report-to", "trackio")
        assert "TRACKIO_DIR" not in os.environ
    for out in outs:
        ident = json.loads((out / "tracker.json").read_text())
        logs, config = _trackio_logs(out, ident["run_name"])
        losses = {int(row["train/global_step"]): row["train/loss"] for row in logs if "train/loss" in row}
        assert losses == pytest.approx(_train_losses(out), rel=1e-5)  # this run's curve, and only it
        assert all(row["train/predicted_peak_gib"] > 0 for row in logs if "train/loss" in row)
        assert config["loraplan"]["method"] == "lora" and config["loraplan"]["strategy"] == "cpu"
