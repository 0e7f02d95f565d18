"""Train one plan: the run sequence, over one record of the run's state (RunState), through the plan's training
backend (executor/backends/; the standard one is transformers + peft + trl).

`train_plan` runs in the `loraplan run` process for the in-process strategies (single, cpu), and in every worker
process (one per GPU, started by accelerate's launcher) for ddp and fsdp. Rank 0 writes metrics.jsonl, the adapter
and summary.json; every rank measures its own peak memory.

The other jobs of a run live beside it: device.py (placement, memory meter), callbacks.py (signals, metrics,
progress, log cadence), trainer_settings.py (plan -> SFTConfig), plan_trainer.py (the trainer class).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from loraplan.planner.planfile import paths as plan_paths
from loraplan.planner.planfile.schema import Plan

from . import checkpoints, memory_snapshot, run_files, trackers
from .device import GIB, MemoryMeter, Placement, gather, is_out_of_memory, placement_for
from .disk import disk_full_message, is_disk_full, read_jsonl, replace_dir, write_json, write_jsonl
from .errors import Interrupted, RunError, TrainingFailed
from .evaluation import final_eval_loss
from .saver_settings import apply_model_patches
from .summary import RunSummary

if TYPE_CHECKING:
    from .callbacks import LogCadence, StopFlag, StopOnSignal


@dataclass
class RunState:
    """What one run carries from set-up to summary: where it trains, what it measures, what it resumes, the
    trainer and the callbacks the summary reads. Built by train_plan, read by every later step."""

    plan: Plan
    backend: Any  # executor/backends/<plan.training.backend>.py's BACKEND
    place: Placement
    meter: MemoryMeter
    sharded: bool  # the weights are sharded over the ranks (fsdp.is_sharded, asked once here)
    t0: float  # when train_plan started (perf_counter)
    metrics_path: str
    load_trace: Optional[object] = None  # fsdp_load.LoadTrace of a layer-streamed load: bytes held at each step
    resume_from: Optional[str] = None  # the checkpoint this session continues from
    start_step: int = 0  # its step (0 when not resuming)
    finished: bool = False  # the checkpoint is the run's last step: only its adapter is left to write
    train_report: Any = None  # data.DatasetReport of the training rows
    eval_report: Any = None  # ... and of the eval rows (None without eval)
    trainer: Any = None  # the backend's transformers Trainer
    stopper: Optional["StopOnSignal"] = None
    flag: Optional["StopFlag"] = None
    cadence: Optional["LogCadence"] = None

    @property
    def out(self) -> str:
        return self.plan.output_dir

    @property
    def has_eval(self) -> bool:
        return self.eval_report is not None


def _resume_point(resume_from: Optional[str]) -> tuple[int, bool]:
    """The step a checkpoint holds, and whether it is the run's last (a kill during the final save)."""
    if not resume_from:
        return 0, False
    import json

    with open(os.path.join(resume_from, "trainer_state.json"), encoding="utf-8") as f:
        saved_state = json.load(f)
    start_step = int(saved_state["global_step"])
    return start_step, 0 < int(saved_state.get("max_steps") or 0) <= start_step


def train_plan(plan: Plan, resume_from: Optional[str] = None, console=None, foreground: bool = True) -> RunSummary:
    """Train the plan; returns the summary (also written to summary.json by rank 0).

    Longer than the rest on purpose: the whole set-up of one run (tokenizer, data, model, adapter, trainer,
    callbacks, signals) reads top to bottom in one place, as torchtune's single-device recipe does."""
    from .backends import backend_for
    from .data import prepare_datasets
    from .fsdp import is_sharded
    from .model import plan_model_dir

    t0 = time.perf_counter()
    backend = backend_for(plan)
    backend.prepare_process()  # idempotent: `loraplan run` and the workers called it already
    quiet_libraries()
    place = placement_for(plan)
    state = RunState(plan=plan, backend=backend, place=place, meter=MemoryMeter(place.use_cuda),
                     sharded=is_sharded(plan), t0=t0, resume_from=resume_from,
                     metrics_path=os.path.join(plan.output_dir, run_files.METRICS_FILE))
    out = plan.output_dir
    t = plan.training

    model_dir = plan_model_dir(plan)
    tokenizer = backend.load_tokenizer(plan, model_dir)
    train_ds, eval_ds, state.train_report, state.eval_report = prepare_datasets(plan, tokenizer)

    backend.set_seed(t.seed)  # before wrapping: the adapter's initial weights are random
    device_map = place.device_map
    if state.sharded:  # LoRA: loaded on the host, fully_shard moves each rank's shards to its GPU; QLoRA: built on
        device_map = None  # meta and filled unit by unit (executor/fsdp_load.py): never the whole model on a GPU
    model = backend.load_model(plan, model_dir, device_map)
    # Record where the base came from so `merge` finds it: the hub id when it came from the cache.
    base_ref = os.path.abspath(model_dir) if plan.model.path else plan.model.hub_id
    model = backend.wrap_adapter(plan, model, base_ref)
    apply_model_patches(plan, model)  # the savers' model patches (mlp_tiling: Liger's tiled MLP)

    state.start_step, state.finished = _resume_point(resume_from)
    # Keep the metrics of the steps the resumed checkpoint already covers; later ones are trained again.
    metric_rows = ([r for r in read_jsonl(state.metrics_path) if r.get("step", 0) <= state.start_step]
                   if resume_from else [])
    if place.is_main:
        os.makedirs(out, exist_ok=True)
        write_jsonl(state.metrics_path, metric_rows)  # atomically: the resumed checkpoint's rows, or none

    from .callbacks import LogCadence, MetricsWriter, ProgressBar, StopFlag, StopOnSignal

    state.flag = StopFlag(second_signal_aborts=foreground)
    state.stopper = StopOnSignal(state.flag, distributed=place.world_size > 1)
    progress = ProgressBar(console) if (place.is_main and console is not None) else None
    state.cadence = LogCadence(t.logging_steps)
    callbacks = [state.cadence, state.stopper, MetricsWriter(state.metrics_path, state.meter, progress)]
    if progress is not None:
        callbacks.append(progress)
    snapshot_steps = memory_snapshot.requested_steps()  # `run --memory-snapshot` (executor/memory_snapshot.py)
    if snapshot_steps and place.use_cuda:
        callbacks.append(memory_snapshot.recorder(out, place.rank, snapshot_steps))

    # the tracker's environment (offline defaults, its log folder) before the trainer reads it (executor/trackers.py)
    tracking = trackers.Tracking(plan, place.is_main, state.meter, state.start_step if resume_from else None)
    state.trainer = backend.build_trainer(plan, state, model=model, tokenizer=tokenizer, train_dataset=train_ds,
                                          eval_dataset=eval_ds, callbacks=callbacks)
    tracking.attach(state.trainer)

    state.flag.install()  # until the adapter and summary are written: a signal after the last step is simply finished
    try:
        if state.finished and place.is_main and console is not None:
            console.print(f"checkpoint {resume_from} is the run's last step ({state.start_step}): writing its adapter, "
                          f"nothing left to train", soft_wrap=True)
        return _train_and_save(state)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped by a second signal; the last complete checkpoint in {out} is intact") from None
    except Exception as exc:  # a checkpoint or the adapter on a full disk: one line, the last good checkpoint kept
        if isinstance(exc, RunError) or not is_disk_full(exc):
            raise
        raise TrainingFailed(disk_full_message(out, state.trainer.state.global_step)) from None
    finally:
        state.flag.restore()
        tracking.close()
        if progress is not None:
            progress.close()  # a failed step skips on_train_end; leave the terminal clean for the error line


def _load_path(state: RunState) -> Optional[str]:
    if not (state.sharded and state.plan.quantization.enabled):
        return None
    from .fsdp_load import STREAMED, WHOLE

    return STREAMED if state.load_trace is not None else WHOLE


def _fsdp_settings(state: RunState) -> Optional[dict]:
    if not state.sharded:
        return None
    from .fsdp import plugin_summary

    return plugin_summary(state.trainer.accelerator)


def _save_sharded_adapter(state: RunState, folder: str) -> None:
    """The FSDP run's adapter as an ordinary PEFT adapter: gathered whole on rank 0 (every rank takes part), then
    written with peft's save_pretrained, with the tokenizer, as Trainer.save_model writes it for other strategies
    (which under FSDP with sharded state dicts writes nothing)."""
    from .fsdp import full_adapter_state_dict

    trainer = state.trainer
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = full_adapter_state_dict(model)  # None when not sharded (resumed at the last step): the model's own
    if state.place.is_main:
        model.save_pretrained(folder, state_dict=adapter)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)


def _out_of_memory(state: RunState) -> TrainingFailed:
    """The one-line error of an out-of-memory step, with summary.json saying so (scripts and gpu_check read it)."""
    plan, trainer, meter = state.plan, state.trainer, state.meter
    out = plan.output_dir
    peak = meter.peak_gib()
    latest = checkpoints.latest_complete_checkpoint(out)
    where = f"at step {trainer.state.global_step}"
    seen = (f"observed peak {peak:.2f} GiB of {meter.total_bytes / GIB:.1f} GiB, predicted "
            f"{plan.prediction.per_gpu_gib:.2f} GiB" if peak is not None
            else f"observed peak process memory {meter.rss_peak_gib():.2f} GiB")
    kept = f"last checkpoint {latest[1]}" if latest else "no checkpoint yet"
    message = f"out of memory {where} ({seen}); {kept}; {_oom_advice(plan)}"
    if state.place.is_main:  # scripts (and gpu_check) read the outcome here too
        write_json(os.path.join(out, run_files.SUMMARY_FILE), RunSummary(
            status="out_of_memory", message=message, method=plan.method, strategy=plan.strategy,
            steps=trainer.state.global_step, max_steps=trainer.state.max_steps,
            predicted_peak_gib=plan.prediction.per_gpu_gib, observed_peak_gib=peak,
            last_checkpoint=os.path.abspath(latest[1]) if latest else None, output_dir=os.path.abspath(out),
        ).to_dict())
    return TrainingFailed(message)


def _save_adapter(state: RunState, adapter_dir: str) -> None:
    """The final adapter, written to adapter.tmp and swapped in whole (a sharded run gathers it on rank 0 first)."""
    tmp = os.path.join(os.path.dirname(adapter_dir), run_files.ADAPTER_TMP)
    if state.place.is_main and os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    if state.sharded:
        _save_sharded_adapter(state, tmp)
    else:
        state.trainer.save_model(tmp)
    state.trainer.accelerator.wait_for_everyone()
    if state.place.is_main:
        replace_dir(tmp, adapter_dir)


def _train_and_save(state: RunState) -> RunSummary:
    """trainer.train(), then the adapter (swapped in whole) and summary.json. Raises Interrupted after a signal.
    Long because the summary gathers every figure of the run in one visible place (executor/summary.py lists them).

    state.finished: resume_from is the run's last step (a kill during the final save); its weights and state are
    loaded and nothing is trained (Trainer would run one step past max_steps when max_steps ends mid-epoch)."""
    import torch

    from .trainer_settings import effective_logging_steps

    plan, trainer, place, meter, stopper, cadence = (state.plan, state.trainer, state.place, state.meter,
                                                      state.stopper, state.cadence)
    out = plan.output_dir
    resumed_from_step = state.start_step if state.resume_from else None
    train_output = None
    try:
        if state.finished:
            state.backend.load_last_step(trainer, state.resume_from, state.sharded)
            if cadence is not None:
                cadence.interval = effective_logging_steps(cadence.plan_steps, trainer.state.max_steps)
        else:
            train_output = trainer.train(resume_from_checkpoint=state.resume_from)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        raise _out_of_memory(state) from None

    tstate = trainer.state
    interrupted = stopper.stopped_at is not None
    adapter_dir = os.path.join(out, run_files.ADAPTER_DIR)
    if not interrupted:
        _save_adapter(state, adapter_dir)

    eval_loss = None
    if state.has_eval and not interrupted:
        eval_loss = final_eval_loss(trainer)

    local_weights = None
    if state.sharded:
        from .fsdp import local_parameter_bytes

        local_weights = gather(local_parameter_bytes(trainer.model) / GIB, place)
    trace = state.load_trace
    load_peaks = gather(trace.peak_bytes / GIB, place) if trace is not None else None
    load_device = (gather(trace.device_peak_bytes / GIB, place)
                   if trace is not None and trace.device_peak_bytes is not None else None)
    peaks = gather(meter.peak_gib(), place)
    rss = gather(meter.rss_peak_gib(), place)
    pinned = gather(meter.pinned_peak_gib(), place)
    used_end = gather(meter.device_used_gib(), place)
    train_rows = [h for h in tstate.log_history if "loss" in h]
    # The whole run's tokens (trainer_state.json carries the count across a resume); speed from this session's.
    tokens = tstate.num_input_tokens_seen
    session_tokens = 0 if state.finished else tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    train_s = 0.0 if state.finished else (
        (train_output.metrics.get("train_runtime") if train_output else None) or (time.perf_counter() - state.t0))
    observed = max(peaks) if place.use_cuda else None
    margin_gib = plan.prediction.margin * plan.hardware.memory_gib
    latest = checkpoints.latest_complete_checkpoint(out)
    summary = RunSummary(
        status="interrupted" if interrupted else "completed",
        method=plan.method,
        strategy=plan.strategy,
        device=torch.cuda.get_device_name(place.local_rank) if place.use_cuda else "cpu",
        num_processes=place.world_size,
        predicted_peak_gib=plan.prediction.per_gpu_gib,
        observed_peak_gib=observed,
        observed_peak_gib_per_gpu=peaks if place.use_cuda else None,
        cuda_context_gib=meter.context_bytes / GIB if place.use_cuda else None,
        device_used_gib_end_per_gpu=used_end if place.use_cuda else None,
        margin_gib=margin_gib,
        over_prediction=exceeds_prediction(plan, observed),
        cpu_rss_peak_gib=max(rss),
        # the host's side: every process's RSS peak added up (pinned memory included), and the pinned peak
        host_peak_gib=sum(rss),
        predicted_host_pinned_gib=plan.savers.pinned_host_gib,
        observed_host_pinned_gib=sum(pinned) if place.use_cuda and None not in pinned else None,
        savers=plan.savers.names,
        cpu_rss_peak_gib_per_process=rss,
        num_nodes=plan.hardware.num_nodes,
        local_parameters_gib_per_process=local_weights,
        fsdp=_fsdp_settings(state),
        load_path=_load_path(state),
        load_peak_gib_per_process=load_peaks,
        load_device_peak_gib_per_gpu=load_device,
        steps=tstate.global_step,
        max_steps=tstate.max_steps,
        resumed_from_step=resumed_from_step,
        logging_steps=cadence.interval if cadence is not None else plan.training.logging_steps,
        train_loss=train_output.training_loss if train_output else None,
        first_loss=train_rows[0]["loss"] if train_rows else None,
        final_loss=train_rows[-1]["loss"] if train_rows else None,
        eval_loss=eval_loss,
        tokens=tokens,
        tokens_per_s=session_tokens / train_s if train_s and session_tokens else None,
        predicted_tokens_per_s=plan.prediction.tokens_per_s,
        train_s=train_s,
        wall_s=time.perf_counter() - state.t0,
        truncated_sequences=state.train_report.truncated + (state.eval_report.truncated if state.eval_report else 0),
        dropped_rows=state.train_report.dropped + (state.eval_report.dropped if state.eval_report else 0),
        dataset=state.train_report.to_dict(),
        eval_dataset=state.eval_report.to_dict() if state.eval_report else None,
        output_dir=os.path.abspath(out),
        adapter_dir=None if interrupted else os.path.abspath(adapter_dir),
        last_checkpoint=os.path.abspath(latest[1]) if latest else None,
        plan_file=os.path.abspath(os.path.join(out, run_files.PLAN_FILE)),
        metrics_file=os.path.abspath(state.metrics_path),
        memory_snapshot=_memory_snapshot_file(state),
    )
    if place.is_main:
        write_json(os.path.join(out, run_files.SUMMARY_FILE), summary.to_dict())
    if interrupted:
        saved = f"checkpoint saved at step {stopper.stopped_at} ({latest[1]})" if latest else "no checkpoint saved"
        cause = f"signal {state.flag.signum}" if state.flag.signum else "a signal to another process"
        raise Interrupted(f"interrupted by {cause}: {saved}; continue with `{plan_paths.resume_command(out)}`")
    return summary


def _memory_snapshot_file(state: RunState) -> Optional[str]:
    """OUT/memory/peak-rank0.json when this run recorded one (`run --memory-snapshot`)."""
    _, path = memory_snapshot.output_paths(state.out, 0)
    return os.path.abspath(path) if memory_snapshot.requested_steps() and os.path.exists(path) else None


def exceeds_prediction(plan: Plan, observed_gib: Optional[float]) -> bool:
    """Observed peak above the prediction by more than the plan's margin (a fraction of the card's memory)."""
    if observed_gib is None:
        return False
    return observed_gib > plan.prediction.per_gpu_gib + plan.prediction.margin * plan.hardware.memory_gib


def _oom_advice(plan: Plan) -> str:
    t = plan.training
    tips = []
    if t.micro_batch_size > 1:
        tips.append(f"micro_batch_size {t.micro_batch_size // 2} with grad_accum_steps {t.grad_accum_steps * 2}")
    if not t.grad_checkpointing:
        tips.append("gradient checkpointing")
    if t.loss == "full":
        tips.append("the fused loss")
    if plan.method == "lora":
        tips.append("qlora")
    tips.append(f"a shorter seq_len than {t.seq_len}")
    return "plan again with " + ", or ".join(tips)


def quiet_libraries() -> None:
    """Our own progress bar and report replace the libraries' bars and deprecation chatter."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    for module in ("transformers", "trl", "peft", "accelerate", "torch.utils.checkpoint"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
