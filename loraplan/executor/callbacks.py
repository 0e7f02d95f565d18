"""The run's TrainerCallbacks and its signal flag: ordinary classes, in a module imported only when a run starts
(it imports transformers). train_plan hands them to the trainer; each does one thing."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from .device import MemoryMeter
from .disk import append_jsonl
from .trainer_settings import effective_logging_steps


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


class StopOnSignal(TrainerCallback):
    """Stops training after the step in which the flag was set, with a checkpoint (on every rank at once)."""

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
        append_jsonl(self.path, row)
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
