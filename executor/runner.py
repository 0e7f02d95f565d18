"""`loraplan run` without the CLI: check inputs, prepare the output folder, train in-process or launch workers."""

from __future__ import annotations

import os
import time

from planner.plan import Plan

from . import outputs
from .errors import require_run_extra


def check_inputs(plan: Plan) -> None:
    """Fail fast, before anything is written, on a plan whose model or dataset cannot be used."""
    from .data import load_rows
    from .model import plan_model_dir

    plan_model_dir(plan)
    load_rows(plan.dataset.path, plan.dataset.format)
    if plan.dataset.eval_path:
        load_rows(plan.dataset.eval_path, plan.dataset.format, what="eval dataset")


def needs_bitsandbytes(plan: Plan) -> bool:
    return plan.quantization.enabled or plan.training.optimizer != "adamw"


def execute(plan: Plan, *, resume: bool = False, overwrite: bool = False, console=None, rendezvous=None) -> dict:
    """Run a plan end to end; returns the summary. Raises RunError (and subclasses) for one-line failures.

    rendezvous: this machine's place in a multi-node plan (launch.Rendezvous; machine 0 when None). Only machine 0
    checks and writes the output folder (plan copy, fingerprints, summary); another machine checks its inputs,
    launches its processes, and takes the checkpoint to resume from from machine 0 (executor/worker.py)."""
    from . import fsdp
    from .launch import Rendezvous

    t0 = time.perf_counter()
    rdzv = rendezvous or Rendezvous()
    require_run_extra(("bitsandbytes",) if needs_bitsandbytes(plan) else ())
    if fsdp.is_sharded(plan):
        fsdp.check_runnable(plan)
    check_inputs(plan)  # first: --overwrite must not delete a run for a plan that cannot start
    if fsdp.is_sharded(plan):
        from .model import plan_model_dir

        fsdp.wrap_class(plan, plan_model_dir(plan))  # a layer class the model lacks is refused before anything is written
    if not rdzv.is_main_machine:
        if console is not None:
            console.print(f"[bold]loraplan run[/bold]: {plan.method} on {plan.model.name}, strategy {plan.strategy}, "
                          f"machine {rdzv.machine_rank} of {plan.hardware.num_nodes}; machine 0 writes the outputs "
                          f"({plan.output_dir})", soft_wrap=True)
        return _launch(plan, None, console, rdzv, t0)
    resume_from = outputs.prepare_output_dir(plan, resume=resume, overwrite=overwrite)
    os.makedirs(plan.output_dir, exist_ok=True)
    outputs.check_and_record_datasets(plan, resuming=resume_from is not None)
    plan.save(os.path.join(plan.output_dir, outputs.PLAN_FILE))
    if console is not None:
        where = f" from checkpoint {resume_from[1]}" if resume_from else ""
        console.print(f"[bold]loraplan run[/bold]: {plan.method} on {plan.model.name}, strategy {plan.strategy}"
                      f", output {plan.output_dir}{where}")
        if resume:  # say which newer checkpoints were damaged (already verified, so this hashes nothing again)
            instead = f"resuming from {resume_from[1]} instead" if resume_from else "starting from step 0"
            for _, path, why in outputs.resumable_checkpoint(plan.output_dir)[1]:
                console.print(f"[yellow]skipping checkpoint {path}: {why}; {instead}[/yellow]", soft_wrap=True)
    if plan.hardware.gpu != "cpu" and console is not None:
        import torch

        if not torch.cuda.is_available():
            console.print(f"[yellow]no GPU visible: training this {plan.hardware.gpu_name} plan on the CPU "
                          f"(slowly; its memory prediction does not apply)[/yellow]")
    return _launch(plan, resume_from[1] if resume_from else None, console, rdzv, t0)


def launches_workers(plan: Plan) -> bool:
    """The strategy table's `launcher`: "accelerate" starts worker processes (a sharded plan always, so its FSDP
    config is accelerate's; ddp when there is more than one process), "in-process" trains here."""
    from planner.strategies import STRATEGIES

    s = STRATEGIES[plan.strategy]
    return s.launcher == "accelerate" and (s.sharded or plan.hardware.world_size > 1)


def _launch(plan: Plan, resume_from, console, rdzv, t0: float) -> dict:
    if launches_workers(plan):
        from .launch import launch_workers

        summary = launch_workers(plan, resume_from, console, rdzv)
    else:
        from .train import train_plan

        summary = train_plan(plan, resume_from, console=console, foreground=True)
    if not rdzv.is_main_machine:
        return summary  # machine 0 writes the summary
    # Wall time as the user lived it: imports, checks, process launch, loading, training, saving.
    summary["wall_s"] = time.perf_counter() - t0
    outputs.write_json(os.path.join(plan.output_dir, outputs.SUMMARY_FILE), summary)
    return summary
