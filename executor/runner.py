"""`loraplan run` without the CLI: check inputs, prepare the output folder, train in-process or launch workers."""

from __future__ import annotations

import os
import time

from planner.plan import Plan

from . import outputs
from .errors import RunError, require_run_extra


def check_inputs(plan: Plan) -> None:
    """Fail fast, before anything is written, on a plan whose model or dataset cannot be used."""
    from .data import load_rows
    from .model import plan_model_dir

    plan_model_dir(plan)
    check_savers(plan)
    load_rows(plan.dataset.path, plan.dataset.format)
    if plan.dataset.eval_path:
        load_rows(plan.dataset.eval_path, plan.dataset.format, what="eval dataset")


def check_savers(plan: Plan) -> None:
    """Refuse, in one line, a plan whose memory savers this machine cannot apply (planner.savers)."""
    import importlib.util

    from planner.savers import unmet_requirements

    names = plan.savers.names
    if not names:
        return
    import torch

    cuda = plan.strategy != "cpu" and torch.cuda.is_available()
    why = unmet_requirements(names, cuda, lambda module: importlib.util.find_spec(module) is not None)
    if why:
        raise RunError(why)


def needs_bitsandbytes(plan: Plan) -> bool:
    return plan.quantization.enabled or plan.training.optimizer != "adamw"


def execute(plan: Plan, *, resume: bool = False, overwrite: bool = False, console=None) -> dict:
    """Run a plan end to end; returns the summary. Raises RunError (and subclasses) for one-line failures."""
    t0 = time.perf_counter()
    require_run_extra(("bitsandbytes",) if needs_bitsandbytes(plan) else ())
    check_inputs(plan)  # first: --overwrite must not delete a run for a plan that cannot start
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
    if plan.strategy != "cpu" and console is not None:
        import torch

        if not torch.cuda.is_available():
            console.print(f"[yellow]no GPU visible: training this {plan.hardware.gpu_name} plan on the CPU "
                          f"(slowly; its memory prediction does not apply)[/yellow]")
    if plan.strategy == "ddp" and plan.hardware.num_gpus > 1:
        from .launch import launch_ddp

        summary = launch_ddp(plan, resume_from[1] if resume_from else None, console)
    else:
        from .train import train_plan

        summary = train_plan(plan, resume_from[1] if resume_from else None, console=console, foreground=True)
    # Wall time as the user lived it: imports, checks, process launch, loading, training, saving.
    summary["wall_s"] = time.perf_counter() - t0
    outputs.write_json(os.path.join(plan.output_dir, outputs.SUMMARY_FILE), summary)
    return summary
