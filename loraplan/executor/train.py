"""Train one plan with trl's SFTTrainer: the one place where plan fields become trainer settings.

`train_plan` runs in the `loraplan run` process for strategies single and cpu, and in every worker process
(one per GPU, started by accelerate's launcher) for ddp. Rank 0 writes metrics.jsonl, the adapter and
summary.json; every rank measures its own peak memory.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from loraplan.planner.options import OPTIMIZERS
from loraplan.planner.plan import Plan

from . import outputs

from . import checkpoints
from .errors import Interrupted, RunError, TrainingFailed
from .saver_settings import apply_model_patches, checkpointing_settings, sft_config_settings
from .summary import RunSummary

GIB = 2**30

# plan.training.optimizer -> transformers' `optim` name


@dataclass
class Placement:
    """Where this process trains: its rank in the data-parallel group and its device."""

    world_size: int
    rank: int
    local_rank: int
    use_cuda: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_map(self) -> Optional[dict]:
        # The whole model on this process's GPU: what QLoRA needs under DDP (no "auto" sharding across cards).
        return {"": self.local_rank} if self.use_cuda else None


def placement_for(plan: Plan) -> Placement:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = plan.strategy != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"process {rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible")
        if plan.training.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise RunError(f"the plan computes in bfloat16 but {torch.cuda.get_device_name(local_rank)} has no bf16; "
                           f"plan again for this card (it will pick float16)")
        torch.cuda.set_device(local_rank)
    return Placement(world, rank, local_rank, use_cuda)


class MemoryMeter:
    """Peak device memory as an out-of-memory error sees it: the caching allocator's peak reservation plus what
    the CUDA context (and anything else on the card) held before the model loaded, measured as total - free."""

    def __init__(self, use_cuda: bool):
        import torch

        self.use_cuda = use_cuda
        self.context_bytes = 0
        self.total_bytes = 0
        if use_cuda:
            free, total = torch.cuda.mem_get_info()  # creates the CUDA context first
            self.total_bytes = total
            self.context_bytes = total - free - torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        import torch

        if not self.use_cuda:
            return None
        return (torch.cuda.max_memory_reserved() + self.context_bytes) / GIB

    def device_used_gib(self) -> Optional[float]:
        """Total minus free device memory now (what nvidia-smi shows): also counts memory outside the caching
        allocator, e.g. NCCL's buffers under DDP, created after the context was measured."""
        import torch

        if not self.use_cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / GIB

    def pinned_peak_gib(self) -> Optional[float]:
        """Peak pinned host memory held by torch's caching host allocator (what the offload savers pin, rounded to
        the blocks torch asked CUDA for); None without CUDA."""
        import torch

        if not self.use_cuda:
            return None
        stats = torch.cuda.host_memory_stats()
        peak = stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak"))
        return None if peak is None else peak / GIB

    @staticmethod
    def rss_peak_gib() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


class StopFlag:
    """Set by SIGINT/SIGTERM; the trainer checks it after each step, saves a checkpoint and stops.
    In the foreground process a second signal stops at once (the last complete checkpoint stays intact)."""

    def __init__(self, second_signal_aborts: bool):
        self.signum: Optional[int] = None
        self.second_signal_aborts = second_signal_aborts
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and self.second_signal_aborts:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _callbacks():
    """TrainerCallback subclasses, built on first use so that importing this module stays cheap (transformers is
    imported only when a run starts). Long because it holds the classes themselves, each a few short methods."""
    import torch
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self, flag: StopFlag, distributed: bool):
            self.flag, self.distributed = flag, distributed
            self.stopped_at: Optional[int] = None

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.flag.signum is not None
            if self.distributed:  # every rank must stop at the same step, or the next collective hangs
                import torch.distributed as dist

                t = torch.tensor([int(stop)], device=args.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                stop = bool(t.item())
            if stop and state.global_step < state.max_steps:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step
            return control

    class MetricsWriter(TrainerCallback):
        """One JSON object per logged step in metrics.jsonl, appended and flushed line by line (a rewrite per log
        would cost O(steps^2) on long runs; a line torn by a crash is skipped when the file is read back)."""

        def __init__(self, path: str, meter: MemoryMeter, progress):
            self.path, self.meter, self.progress = path, meter, progress
            self.t_last = time.perf_counter()
            self.tokens_last = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t_last = time.perf_counter()
            self.tokens_last = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            now = time.perf_counter()
            if "loss" in logs:
                tokens = state.num_input_tokens_seen
                dt = max(now - self.t_last, 1e-9)
                row = {
                    "kind": "train",
                    "step": state.global_step,
                    "epoch": logs.get("epoch"),
                    "loss": logs["loss"],
                    "learning_rate": logs.get("learning_rate"),
                    "grad_norm": logs.get("grad_norm"),
                    "tokens_per_s": (tokens - self.tokens_last) / dt,
                    "tokens_seen": tokens,
                    "peak_memory_gib": self.meter.peak_gib(),
                    "cpu_rss_peak_gib": self.meter.rss_peak_gib(),
                }
                self.t_last, self.tokens_last = now, tokens
            elif "eval_loss" in logs:
                row = {"kind": "eval", "step": state.global_step, "eval_loss": logs["eval_loss"]}
            else:
                return
            row = {k: (float(v) if hasattr(v, "item") else v) for k, v in row.items()}
            outputs.append_jsonl(self.path, row)
            if self.progress is not None:
                self.progress.update_metrics(row)

    class ProgressBar(TrainerCallback):
        """Progress on rank 0: step, loss, learning rate, tokens/s, peak memory. A live rich bar on a terminal;
        one line per logged step otherwise (logs, CI), so a long run is never silent."""

        def __init__(self, console):
            self.console = console
            self.progress = None
            self.task = None
            self.max_steps = 0
            self.fields = {"loss": "-", "lr": "-", "tps": "-", "mem": "-"}

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            self.max_steps = state.max_steps
            if not self.console.is_terminal:
                return
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s  "
                           "mem {task.fields[mem]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                               **self.fields)

        def update_metrics(self, row: dict) -> None:
            if row.get("kind") != "train":
                return
            mem = row.get("peak_memory_gib")
            self.fields = {
                "loss": f"{row['loss']:.4f}",
                "lr": f"{row['learning_rate']:.2e}" if row.get("learning_rate") is not None else "-",
                "tps": f"{row['tokens_per_s']:,.0f}",
                "mem": f"{mem:.2f} GiB" if mem is not None else f"{row['cpu_rss_peak_gib']:.2f} GiB RSS",
            }
            if self.progress is not None:
                self.progress.update(self.task, **self.fields)
            else:
                f = self.fields
                self.console.print(f"step {row['step']}/{self.max_steps}  loss {f['loss']}  lr {f['lr']}  "
                                   f"{f['tps']} tok/s  mem {f['mem']}", highlight=False)

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)
            self.close()

        def close(self) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    class LogCadence(TrainerCallback):
        """Log often enough to see a short run learn: every min(plan's logging_steps, steps // 10) steps (at
        least 1), once the real number of optimizer steps is known, and always the last step."""

        def __init__(self, logging_steps: int):
            self.plan_steps = logging_steps
            self.interval = logging_steps

        def on_train_begin(self, args, state, control, **kwargs):
            self.interval = effective_logging_steps(self.plan_steps, state.max_steps)
            state.logging_steps = self.interval  # what DefaultFlowCallback counts against (a resumed state too)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True
            return control

    return StopOnSignal, MetricsWriter, ProgressBar, LogCadence


def effective_logging_steps(plan_logging_steps: int, max_steps: int) -> int:
    """At least ~10 logs over a short run, the plan's interval on a long one."""
    return max(1, min(plan_logging_steps, max_steps // 10))


def _trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class PlanTrainer(SFTTrainer):
        """SFTTrainer with the plan's loss, checkpoints marked complete, and rotation after the mark.

        loss "fused": trl's own compute_loss, which projects through the LM head in tiles and never builds the
        full (batch, seq, vocab) logits. loss "full": Trainer's compute_loss, the model's forward with labels,
        which materializes the logits (and the model's loss upcasts them to fp32), as the plan budgeted.
        """

        def __init__(self, *args, plan_loss: str, keep_checkpoints: int, sharded: bool = False, **kwargs):
            self.plan_loss = plan_loss
            self.keep_checkpoints = keep_checkpoints
            self.sharded = sharded
            super().__init__(*args, **kwargs)

        def create_model_card(self, *args, **kwargs):
            """trl writes a README.md model card into output_dir before every checkpoint: the run's folder may
            hold the user's own README.md, and a run writes only its own files (peft's adapter/README.md stays)."""

        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            # Sharded plans on a machine without a GPU: accelerate would fall back to multi-CPU DDP (executor/fsdp.py)
            if self.sharded:
                from .fsdp import enable_fsdp_on_cpu

                if enable_fsdp_on_cpu(self.accelerator):
                    self.is_fsdp_enabled = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.plan_loss == "full":
                inputs = {**inputs, "use_cache": False}
                return Trainer.compute_loss(
                    self, model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        def _save_checkpoint(self, model, trial):
            # A step saved again (after resuming past a damaged checkpoint) is incomplete until re-marked.
            stale = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}", checkpoints.COMPLETE_MARKER)
            if self.args.should_save and os.path.exists(stale):
                os.unlink(stale)
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank has written its part (RNG state is per rank)
            if self.args.should_save:
                step = self.state.global_step
                folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
                checkpoints.mark_complete(folder, step)
                checkpoints.rotate_checkpoints(self.args.output_dir, self.keep_checkpoints)

    return PlanTrainer


def checkpointing_kwargs(plan: Plan) -> Optional[dict]:
    """What transformers' activation_checkpointing_enable gets (through TrainingArguments): non-reentrant, and the
    plan's savers' settings (executor/saver_settings.py: every_n_layers, offload)."""
    if not plan.training.grad_checkpointing:
        return None
    return {"use_reentrant": False, **checkpointing_settings(plan)}


def sft_config(plan: Plan, place: Placement, has_eval: bool):
    """SFTConfig from the plan: every training setting comes from here."""
    from trl import SFTConfig

    t = plan.training
    return SFTConfig(
        output_dir=plan.output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        warmup_steps=t.warmup_ratio if 0 < t.warmup_ratio < 1 else 0,  # a float in (0, 1) is a ratio of all steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=OPTIMIZERS[t.optimizer].hf_name,  # transformers' name for it (planner.options)
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        gradient_checkpointing=t.grad_checkpointing,
        gradient_checkpointing_kwargs=checkpointing_kwargs(plan),
        max_length=t.seq_len,
        packing=t.packing,
        **sft_config_settings(plan),  # the savers': activation_offloading, padding_free (tables/savers.yaml `run`)
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotated by PlanTrainer only after the newest checkpoint is marked complete
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps if has_eval else None,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not place.use_cuda,
        ddp_find_unused_parameters=False if place.world_size > 1 else None,
        dataloader_num_workers=0,
    )


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


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def _gather(value: Any, place: Placement) -> list:
    if place.world_size == 1:
        return [value]
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out: list = [None] * place.world_size
    dist.all_gather_object(out, value)
    return out


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


def train_plan(plan: Plan, resume_from: Optional[str] = None, console=None, foreground: bool = True) -> RunSummary:
    """Train the plan; returns the summary (also written to summary.json by rank 0).

    Longer than the rest on purpose: the whole set-up of one run (tokenizer, data, model, adapter, trainer,
    callbacks, signals) reads top to bottom in one place, as torchtune's single-device recipe does."""
    import transformers
    from transformers import PrinterCallback

    from .data import prepare_datasets
    from .fsdp import is_sharded
    from .model import load_base_model, load_tokenizer, plan_model_dir, wrap_lora

    t0 = time.perf_counter()
    quiet_libraries()
    place = placement_for(plan)
    meter = MemoryMeter(place.use_cuda)
    out = plan.output_dir
    t = plan.training

    model_dir = plan_model_dir(plan)
    tokenizer = load_tokenizer(model_dir, plan.model.trust_remote_code)
    train_ds, eval_ds, train_report, eval_report = prepare_datasets(plan, tokenizer)

    transformers.set_seed(t.seed)  # before wrapping: the adapter's initial weights are random
    device_map = place.device_map
    if is_sharded(plan) and not plan.quantization.enabled:
        device_map = None  # loaded on the host; fully_shard moves each rank's shards to its GPU, never the whole model
    model = load_base_model(plan, model_dir, device_map)
    model = wrap_lora(plan, model)
    apply_model_patches(plan, model)  # the savers' model patches (mlp_tiling: Liger's tiled MLP)
    # Record where the base came from so `merge` finds it: the hub id when it came from the cache.
    base_ref = os.path.abspath(model_dir) if plan.model.path else plan.model.hub_id
    for cfg in model.peft_config.values():
        cfg.base_model_name_or_path = base_ref

    metrics_path = os.path.join(out, outputs.METRICS_FILE)
    start_step = 0
    finished = False  # the checkpoint is the run's last step: only its adapter is left to write
    if resume_from:
        import json

        with open(os.path.join(resume_from, "trainer_state.json"), encoding="utf-8") as f:
            saved_state = json.load(f)
        start_step = int(saved_state["global_step"])
        finished = 0 < int(saved_state.get("max_steps") or 0) <= start_step
    # Keep the metrics of the steps the resumed checkpoint already covers; later ones are trained again.
    metric_rows = [r for r in outputs.read_jsonl(metrics_path) if r.get("step", 0) <= start_step] if resume_from else []
    if place.is_main:
        os.makedirs(out, exist_ok=True)
        outputs.write_jsonl(metrics_path, metric_rows)  # atomically: the resumed checkpoint's rows, or none

    StopOnSignal, MetricsWriter, ProgressBar, LogCadence = _callbacks()
    flag = StopFlag(second_signal_aborts=foreground)
    stopper = StopOnSignal(flag, distributed=place.world_size > 1)
    progress = ProgressBar(console) if (place.is_main and console is not None) else None
    cadence = LogCadence(t.logging_steps)
    callbacks = [cadence, stopper, MetricsWriter(metrics_path, meter, progress)]
    if progress is not None:
        callbacks.append(progress)

    args = sft_config(plan, place, has_eval=eval_ds is not None)
    PlanTrainer = _trainer_class()
    trainer = PlanTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
        plan_loss=t.loss,
        keep_checkpoints=t.save_total_limit,
        sharded=is_sharded(plan),
    )
    trainer.remove_callback(PrinterCallback)
    if plan.quantization.enabled and t.dtype != "bfloat16":
        # trl casts a quantized model's adapters to bf16 (QLoRA paper); on fp16/fp32 plans keep them fp32 so
        # the fp16 grad scaler and cards without bf16 work.
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()

    flag.install()  # until the adapter and summary are written: a signal after the last step is simply finished
    try:
        if finished and place.is_main and console is not None:
            console.print(f"checkpoint {resume_from} is the run's last step ({start_step}): writing its adapter, "
                          f"nothing left to train", soft_wrap=True)
        return _train_and_save(plan, trainer, place, meter, stopper, flag, train_report, eval_report,
                               has_eval=eval_ds is not None, resume_from=resume_from, start_step=start_step,
                               metrics_path=metrics_path, t0=t0, finished=finished, cadence=cadence)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped by a second signal; the last complete checkpoint in {out} is intact") from None
    except Exception as exc:  # a checkpoint or the adapter on a full disk: one line, the last good checkpoint kept
        if isinstance(exc, RunError) or not outputs.is_disk_full(exc):
            raise
        raise TrainingFailed(outputs.disk_full_message(out, trainer.state.global_step)) from None
    finally:
        flag.restore()
        if progress is not None:
            progress.close()  # a failed step skips on_train_end; leave the terminal clean for the error line


def _restore_finished_checkpoint(trainer, checkpoint: str, cadence) -> None:
    """Load a last-step checkpoint's adapter weights and trainer state, as trainer.train() would, without a step."""
    from transformers import TrainerState

    model = trainer.model
    if getattr(trainer, "sharded", False):  # FSDP checkpoint: the adapter is in torch.distributed.checkpoint shards
        from .fsdp import load_sharded_adapter

        load_sharded_adapter(model, checkpoint)
    else:
        model.load_adapter(checkpoint, model.active_adapter, is_trainable=True)
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    if cadence is not None:
        cadence.interval = effective_logging_steps(cadence.plan_steps, trainer.state.max_steps)


def _fsdp_settings(trainer) -> Optional[dict]:
    if not getattr(trainer, "sharded", False):
        return None
    from .fsdp import plugin_summary

    return plugin_summary(trainer.accelerator)


def _save_sharded_adapter(trainer, folder: str, place: Placement) -> None:
    """The FSDP run's adapter as an ordinary PEFT adapter: gathered whole on rank 0 (every rank takes part), then
    written with peft's save_pretrained, with the tokenizer, as Trainer.save_model writes it for other strategies
    (which under FSDP with sharded state dicts writes nothing)."""
    from .fsdp import full_adapter_state_dict

    model = trainer.accelerator.unwrap_model(trainer.model)
    state = full_adapter_state_dict(model)  # None when not sharded (resumed at the last step): the model's own
    if place.is_main:
        model.save_pretrained(folder, state_dict=state)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(folder)


def _out_of_memory(plan: Plan, trainer, meter: MemoryMeter, place: Placement) -> TrainingFailed:
    """The one-line error of an out-of-memory step, with summary.json saying so (scripts and gpu_check read it)."""
    out = plan.output_dir
    peak = meter.peak_gib()
    latest = checkpoints.latest_complete_checkpoint(out)
    where = f"at step {trainer.state.global_step}"
    seen = (f"observed peak {peak:.2f} GiB of {meter.total_bytes / GIB:.1f} GiB, predicted "
            f"{plan.prediction.per_gpu_gib:.2f} GiB" if peak is not None
            else f"observed peak process memory {meter.rss_peak_gib():.2f} GiB")
    kept = f"last checkpoint {latest[1]}" if latest else "no checkpoint yet"
    message = f"out of memory {where} ({seen}); {kept}; {_oom_advice(plan)}"
    if place.is_main:  # scripts (and gpu_check) read the outcome here too
        outputs.write_json(os.path.join(out, outputs.SUMMARY_FILE), RunSummary(
            status="out_of_memory", message=message, method=plan.method, strategy=plan.strategy,
            steps=trainer.state.global_step, max_steps=trainer.state.max_steps,
            predicted_peak_gib=plan.prediction.per_gpu_gib, observed_peak_gib=peak,
            last_checkpoint=os.path.abspath(latest[1]) if latest else None, output_dir=os.path.abspath(out),
        ).to_dict())
    return TrainingFailed(message)


def _save_adapter(trainer, adapter_dir: str, place: Placement) -> None:
    """The final adapter, written to adapter.tmp and swapped in whole (a sharded run gathers it on rank 0 first)."""
    tmp = adapter_dir + ".tmp"
    if place.is_main and os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    if getattr(trainer, "sharded", False):
        _save_sharded_adapter(trainer, tmp, place)
    else:
        trainer.save_model(tmp)
    trainer.accelerator.wait_for_everyone()
    if place.is_main:
        outputs.replace_dir(tmp, adapter_dir)


def _train_and_save(plan: Plan, trainer, place: Placement, meter: MemoryMeter, stopper, flag: StopFlag, train_report,
                    eval_report, *, has_eval: bool, resume_from: Optional[str], start_step: int, metrics_path: str,
                    t0: float, finished: bool = False, cadence=None) -> RunSummary:
    """trainer.train(), then the adapter (swapped in whole) and summary.json. Raises Interrupted after a signal.
    Long because the summary gathers every figure of the run in one visible place (executor/summary.py lists them).

    finished: resume_from is the run's last step (a kill during the final save); its weights and state are loaded
    and nothing is trained (Trainer would run one step past max_steps when max_steps ends mid-epoch)."""
    import torch

    out = plan.output_dir
    resumed_from_step = start_step if resume_from else None
    train_output = None
    try:
        if finished:
            _restore_finished_checkpoint(trainer, resume_from, cadence)
        else:
            train_output = trainer.train(resume_from_checkpoint=resume_from)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        raise _out_of_memory(plan, trainer, meter, place) from None

    state = trainer.state
    interrupted = stopper.stopped_at is not None
    adapter_dir = os.path.join(out, outputs.ADAPTER_DIR)
    if not interrupted:
        _save_adapter(trainer, adapter_dir, place)

    eval_loss = None
    if has_eval and not interrupted:
        from .evaluation import final_eval_loss

        eval_loss = final_eval_loss(trainer)

    if getattr(trainer, "sharded", False):
        from .fsdp import local_parameter_bytes

        local_weights = _gather(local_parameter_bytes(trainer.model) / GIB, place)
    peaks = _gather(meter.peak_gib(), place)
    rss = _gather(meter.rss_peak_gib(), place)
    pinned = _gather(meter.pinned_peak_gib(), place)
    used_end = _gather(meter.device_used_gib(), place)
    train_rows = [h for h in state.log_history if "loss" in h]
    # The whole run's tokens (trainer_state.json carries the count across a resume); speed from this session's.
    tokens = state.num_input_tokens_seen
    session_tokens = 0 if finished else tokens - getattr(trainer, "_initial_num_input_tokens_seen", 0)
    train_s = 0.0 if finished else (
        (train_output.metrics.get("train_runtime") if train_output else None) or (time.perf_counter() - t0))
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
        local_parameters_gib_per_process=local_weights if getattr(trainer, "sharded", False) else None,
        fsdp=_fsdp_settings(trainer),
        steps=state.global_step,
        max_steps=state.max_steps,
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
        wall_s=time.perf_counter() - t0,
        truncated_sequences=train_report.truncated + (eval_report.truncated if eval_report else 0),
        dropped_rows=train_report.dropped + (eval_report.dropped if eval_report else 0),
        dataset=train_report.to_dict(),
        eval_dataset=eval_report.to_dict() if eval_report else None,
        output_dir=os.path.abspath(out),
        adapter_dir=None if interrupted else os.path.abspath(adapter_dir),
        last_checkpoint=os.path.abspath(latest[1]) if latest else None,
        plan_file=os.path.abspath(os.path.join(out, outputs.PLAN_FILE)),
        metrics_file=os.path.abspath(metrics_path),
    )
    if place.is_main:
        outputs.write_json(os.path.join(out, outputs.SUMMARY_FILE), summary.to_dict())
    if interrupted:
        saved = f"checkpoint saved at step {stopper.stopped_at} ({latest[1]})" if latest else "no checkpoint saved"
        cause = f"signal {flag.signum}" if flag.signum else "a signal to another process"
        from loraplan.planner.plan_paths import resume_command

        raise Interrupted(f"interrupted by {cause}: {saved}; continue with `{resume_command(out)}`")
    return summary
