"""Experiment trackers (`--report-to`, plan field training.report_to): transformers' own integrations
(TensorBoardCallback, MLflowCallback, WandbCallback, TrackioCallback), set up so that

- a tracker whose package is missing is one line naming the pip command, before anything is written
  (`check_installed`, from runner.check_inputs and the `run` command);
- logs go into the run's output folder and stay offline unless the user's environment says otherwise: each
  tracker's defaults below are set only where the variable is unset, and restored after the run;
- a resumed run appends to the same run: a stable run name and id kept in OUTPUT/tracker.json, the MLflow run id
  recorded there, and TensorBoard's events after the resumed step purged (SummaryWriter's purge_step);
- what reaches the tracker: the trainer's logs (loss, learning rate, grad norm) plus tokens/s, the memory meter's
  readings and the plan's predicted peak (`TrackerFields`, ahead of the integration), and the plan's decisions as
  the run's configuration (`PlanConfig`, after the integration has started its run).

Hooks (train.py): `Tracking(...)` before the trainer is built, `trainer_settings(plan)` in SFTConfig,
`Tracking.attach(trainer)` after, `Tracking.close()` when training ends.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

from loraplan.planner.facts import options

from .disk import write_json
from .errors import RunError
from .run_files import TRACKER_DIRS, TRACKER_FILE

PROJECT = "loraplan"


@dataclass(frozen=True)
class Tracker:
    name: str  # options.TRACKERS; transformers' report_to name
    module: str  # what must import
    package: str  # what pip installs
    folder: Optional[str]  # where its logs go in the output folder
    env: Callable[[str, dict], dict]  # (absolute output dir, tracker.json) -> defaults for unset variables


TRACKERS: dict[str, Tracker] = {t.name: t for t in (
    Tracker("tensorboard", "tensorboard", "tensorboard", TRACKER_DIRS["tensorboard"],
            lambda out, ident: {"TENSORBOARD_LOGGING_DIR": os.path.join(out, TRACKER_DIRS["tensorboard"])}),
    # MLflow 3 keeps a local file store only when asked (MLFLOW_ALLOW_FILE_STORE); a server or sqlite:// URI of the
    # user's own is used as it is.
    Tracker("mlflow", "mlflow", "mlflow", TRACKER_DIRS["mlflow"],
            lambda out, ident: {"MLFLOW_TRACKING_URI": "file:" + os.path.join(out, TRACKER_DIRS["mlflow"]),
                                "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": PROJECT,
                                **({"MLFLOW_RUN_ID": ident["mlflow_run_id"]} if ident.get("mlflow_run_id") else {})}),
    Tracker("wandb", "wandb", "wandb", TRACKER_DIRS["wandb"],
            lambda out, ident: {"WANDB_MODE": "offline", "WANDB_DIR": out, "WANDB_PROJECT": PROJECT,
                                "WANDB_RUN_ID": ident["run_id"], "WANDB_RESUME": "allow"}),
    Tracker("trackio", "trackio", "trackio", TRACKER_DIRS["trackio"],
            lambda out, ident: {"TRACKIO_DIR": os.path.join(out, TRACKER_DIRS["trackio"])}),
)}
assert set(TRACKERS) == set(options.TRACKERS) - {"none"}, "options.TRACKERS and executor/trackers.py disagree"

assert set(TRACKER_DIRS) == set(TRACKERS), "run_files.TRACKER_DIRS names each tracker's log folder"


def check_installed(name: str) -> None:
    """One line when NAME is not a tracker, or its package cannot be imported (before anything is written)."""
    options.check_choice("--report-to", name, options.TRACKERS, RunError)
    t = TRACKERS.get(name)
    if t is not None and importlib.util.find_spec(t.module) is None:
        raise RunError(f"--report-to {name} needs the {t.package} package, which is not installed: "
                       f"pip install {t.package}")


def identity(output_dir: str) -> dict:
    """OUTPUT/tracker.json: the run's name and id, made by the first run into the folder and kept by --resume
    (--overwrite removes it with the run, so a new run gets a new one)."""
    path = os.path.join(output_dir, TRACKER_FILE)
    for _ in range(50):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            pass
        except ValueError:  # another rank is writing it this instant
            time.sleep(0.05)
            continue
        ident = {"run_name": f"{PROJECT}-{time.strftime('%Y%m%d-%H%M%S')}", "run_id": uuid.uuid4().hex[:12]}
        os.makedirs(output_dir, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as f:  # exclusive: one process makes it
                json.dump(ident, f)
            return ident
        except FileExistsError:
            continue
    raise RunError(f"{path} is unreadable; remove it (the tracker then starts a new run)")


def trainer_settings(plan) -> dict[str, Any]:
    """SFTConfig's tracker settings: the plan's report_to, the stable run name, and trackio kept local."""
    name = plan.training.report_to
    if name == "none":
        return {"report_to": "none"}
    return {"report_to": name, "run_name": identity(plan.output_dir)["run_name"], "project": PROJECT,
            "trackio_static_space_id": False}


def decisions(plan) -> dict[str, Any]:
    """The plan's decisions as a tracker's run configuration (flat, short values)."""
    t, hw = plan.training, plan.hardware
    return {
        "model": plan.model.name, "method": plan.method, "strategy": plan.strategy, "gpu": hw.gpu_name,
        "num_gpus": hw.num_gpus, "num_nodes": hw.num_nodes, "seq_len": t.seq_len,
        "micro_batch_size": t.micro_batch_size, "grad_accum_steps": t.grad_accum_steps,
        "global_batch_size": t.global_batch_size, "grad_checkpointing": t.grad_checkpointing,
        "optimizer": t.optimizer, "loss": t.loss, "learning_rate": t.learning_rate, "dtype": t.dtype,
        "lora_r": plan.lora.r, "lora_alpha": plan.lora.lora_alpha, "lora_dropout": plan.lora.lora_dropout,
        "target_modules": ",".join(plan.lora.target_modules), "savers": ",".join(plan.savers.names) or "none",
        "predicted_peak_gib": plan.prediction.per_gpu_gib, "predicted_tokens_per_s": plan.prediction.tokens_per_s,
        "card_memory_gib": hw.memory_gib, "safety_margin": plan.prediction.margin,
    }


class Tracking:
    """One run's tracker set-up in this process: the offline defaults (set now, restored by close), and the
    callbacks `attach` adds around the integration transformers built from SFTConfig(report_to=...)."""

    def __init__(self, plan, is_main: bool, meter, resumed_step: Optional[int]):
        self.plan, self.is_main, self.meter, self.resumed_step = plan, is_main, meter, resumed_step
        self.tracker = TRACKERS.get(plan.training.report_to)
        self._saved: dict[str, Optional[str]] = {}
        self._rebound: list[tuple[Any, str, Any]] = []  # trackio's module paths pointed at this run (close restores)
        if self.tracker is None:
            return
        out = os.path.abspath(plan.output_dir)
        for key, value in self.tracker.env(out, identity(out)).items():
            if key not in os.environ:
                self._saved[key] = None
                os.environ[key] = value
        if self.tracker.name == "trackio":
            self._rebind_trackio_dir()

    def _rebind_trackio_dir(self) -> None:
        """trackio reads TRACKIO_DIR once, when first imported (`trackio.utils.TRACKIO_DIR`, copied by name into its
        other modules, MEDIA_DIR below it): a second run in the same process (the Python API, a notebook) would log
        into the first run's folder. Point the modules already imported at this run's folder (restored by close)."""
        import sys
        from pathlib import Path

        where = Path(os.environ["TRACKIO_DIR"])
        for name, module in list(sys.modules.items()):
            if module is None or not (name == "trackio" or name.startswith("trackio.")):
                continue
            for attr, value in (("TRACKIO_DIR", where), ("MEDIA_DIR", where / "media")):
                if isinstance(getattr(module, attr, None), Path) and getattr(module, attr) != value:
                    self._rebound.append((module, attr, getattr(module, attr)))
                    setattr(module, attr, value)

    def attach(self, trainer) -> None:
        """TrackerFields ahead of the integration (so its on_log sees the added fields), PlanConfig after it."""
        if self.tracker is None:
            return
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        fields, config = _callbacks()
        integration = trainer.pop_callback(INTEGRATION_TO_CALLBACK[self.tracker.name])
        trainer.add_callback(fields(self.plan, self.meter, self._reattach))
        if integration is None:  # transformers did not build it (it should have: report_to names it)
            raise RunError(f"transformers built no {self.tracker.name} callback for report_to={self.tracker.name}")
        if self.tracker.name == "tensorboard" and self.is_main and self.resumed_step is not None:
            # the steps after the checkpoint are trained again: drop their old events instead of doubling them
            from torch.utils.tensorboard import SummaryWriter

            integration.tb_writer = SummaryWriter(log_dir=integration.logging_dir, purge_step=self.resumed_step + 1)
        trainer.add_callback(integration)
        trainer.add_callback(config(self.plan, integration))

    def _finish_wandb(self) -> None:
        """transformers' WandbCallback never finishes its run (it leaves that to the process's exit), and starts one
        only when none is active: a second run in the same process (the Python API, a notebook) would log into the
        first one's W&B run, and an offline run's log stays unwritten until the process ends. Finish it here."""
        import sys

        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            failed = sys.exc_info()[1] is not None  # close runs in train.py's finally: a run that raised failed
            wandb.finish(exit_code=1 if failed else 0)

    def _reattach(self) -> None:
        """MLflow ends its run at the end of training; the final evaluation's log would start another run: reopen
        the run instead (ended again by close)."""
        if self.tracker.name != "mlflow":
            return
        import mlflow

        run_id = identity(self.plan.output_dir).get("mlflow_run_id")
        if run_id and mlflow.active_run() is None:
            mlflow.start_run(run_id=run_id)
            self._reopened = True

    def close(self) -> None:
        if self.tracker is not None and self.tracker.name == "wandb":
            self._finish_wandb()
        if getattr(self, "_reopened", False):
            import mlflow

            mlflow.end_run()
            self._reopened = False
        if "MLFLOW_TRACKING_URI" in self._saved:  # MLflowCallback set our file store as mlflow's global URI
            import mlflow

            mlflow.set_tracking_uri(None)
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved.clear()
        for module, attr, value in reversed(self._rebound):
            setattr(module, attr, value)
        self._rebound = []


def _callbacks():
    """The two TrainerCallbacks, built on first use (transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class TrackerFields(TrainerCallback):
        """Adds to each training log what the trainer does not: tokens/s over the interval, the memory meter's
        readings and the plan's predicted peak (the same names as metrics.jsonl's)."""

        def __init__(self, plan, meter, reattach):
            self.plan, self.meter, self.reattach = plan, meter, reattach
            self.t_last, self.tokens_last = time.perf_counter(), 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_last, self.tokens_last = time.perf_counter(), state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            self.reattach()
            if "loss" not in logs:
                return
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            logs["tokens_per_s"] = (tokens - self.tokens_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.tokens_last = now, tokens
            peak = self.meter.peak_gib()
            if peak is not None:
                logs["peak_memory_gib"] = peak
            logs["cpu_rss_peak_gib"] = self.meter.rss_peak_gib()
            logs["predicted_peak_gib"] = self.plan.prediction.per_gpu_gib

    class PlanConfig(TrainerCallback):
        """After the integration has started its run: the plan's decisions as its configuration (and, for MLflow,
        the run id kept in tracker.json so that --resume reattaches)."""

        def __init__(self, plan, integration):
            self.plan, self.integration = plan, integration

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            name, cfg = self.plan.training.report_to, decisions(self.plan)
            if name == "tensorboard" and self.integration.tb_writer is not None:
                self.integration.tb_writer.add_text("loraplan/plan", "\n".join(
                    f"    {k}: {v}" for k, v in cfg.items()))  # indented: TensorBoard renders text as markdown
                self.integration.tb_writer.flush()
            elif name == "mlflow":
                import mlflow

                mlflow.log_params({f"loraplan.{k}": v for k, v in cfg.items()})
                run = mlflow.active_run()
                if run is not None:
                    _record(self.plan.output_dir, mlflow_run_id=run.info.run_id)
            elif name in ("wandb", "trackio"):
                module = __import__(name)
                module.config.update({"loraplan": cfg}, allow_val_change=True)

    return TrackerFields, PlanConfig


def _record(output_dir: str, **fields) -> None:

    ident = identity(output_dir)
    if any(ident.get(k) != v for k, v in fields.items()):
        write_json(os.path.join(output_dir, TRACKER_FILE), {**ident, **fields})
