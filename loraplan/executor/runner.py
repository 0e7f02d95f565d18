"""`loraplan run` without the CLI: check inputs, prepare the output folder, train in-process or launch workers."""

from __future__ import annotations

import os
import time
from typing import Optional

from loraplan.planner.planfile import paths as plan_paths
from loraplan.planner.planfile.schema import Plan
from loraplan.planner.plugins.strategies import STRATEGIES

from . import checkpoints, library_log, run_files
from .claim import check_claim, claim_output_dir, save_plan
from .disk import disk_full_message, is_disk_full, write_json
from .errors import RunError, TrainingFailed
from .folder_lock import lock_output_dir
from .model import stay_offline
from .plots import write_run_plots
from .resume import check_and_record_datasets, prepare_output_dir
from .summary import RunSummary
from .trackers import check_installed


def check_inputs(plan: Plan) -> None:
    """Fail fast, before anything is written, on a plan whose model or dataset cannot be used."""
    from .data import load_rows
    from .model import plan_model_dir

    plan_model_dir(plan)
    check_savers(plan)
    check_installed(plan.training.report_to)
    load_rows(plan.dataset.path, plan.dataset.format)
    if plan.dataset.eval_path:
        load_rows(plan.dataset.eval_path, plan.dataset.format, what="eval dataset")


def check_savers(plan: Plan) -> None:
    """Refuse, in one line, a plan whose memory savers this machine cannot apply (planner.plugins.savers)."""
    import importlib.util

    from loraplan.planner.plugins.savers import unmet_requirements

    from .device import uses_cuda

    names = plan.savers.names
    if not names:
        return
    why = unmet_requirements(names, uses_cuda(plan), lambda module: importlib.util.find_spec(module) is not None)
    if why:
        raise RunError(why)


def execute(plan: Plan, *, resume: bool = False, overwrite: bool = False, console=None,
            use_existing_dir: bool = False, plan_file: Optional[str] = None, command: str = "loraplan run",
            rendezvous=None) -> RunSummary:
    """Run a plan end to end; returns the summary. Raises RunError (and subclasses) for one-line failures.

    The output folder is held (lock_output_dir) from before anything is written there until the summary is: a
    second run, --overwrite or --resume into it is refused meanwhile. PLAN_FILE, the file the plan came from, is
    never rewritten when it is the folder's own plan.yaml and already says what will run.

    rendezvous: this machine's place in a multi-node plan (launch.Rendezvous; machine 0 when None). Only machine 0
    checks, locks and writes the output folder (plan copy, fingerprints, summary); another machine checks its
    inputs, launches its processes, and takes the checkpoint to resume from from machine 0 (executor/worker.py)."""
    from . import fsdp
    from .backends import backend_for
    from .launch import Rendezvous

    t0 = time.perf_counter()
    rdzv = rendezvous or Rendezvous()
    library_log.quiet_library_logs()  # before the training stack is imported: bitsandbytes speaks at import
    stay_offline()
    backend = backend_for(plan)
    backend.prepare_process()  # first in this process, before the training stack is imported
    backend.check_installed(plan)
    sharded = fsdp.is_sharded(plan)
    if sharded:
        fsdp.check_runnable(plan)
    check_inputs(plan)  # first: --overwrite must not delete a run for a plan that cannot start
    if sharded:
        from .model import plan_model_dir

        fsdp.wrap_class(plan, plan_model_dir(plan))  # a layer class the model lacks is refused before anything is written
    if not rdzv.is_main_machine:
        if console is not None:
            console.print(f"[bold]loraplan run[/bold]: {plan.method} on {plan.model.name}, strategy {plan.strategy}, "
                          f"machine {rdzv.machine_rank} of {plan.hardware.num_nodes}; machine 0 writes the outputs "
                          f"({plan.output_dir})", soft_wrap=True)
        return _launch(plan, None, console, rdzv)
    out = plan.output_dir
    claim = dict(use_existing=use_existing_dir, plan_file=plan_file,
                 plan_text=plan_paths.text_for(plan, os.path.join(out, run_files.PLAN_FILE)))
    check_claim(out, **claim)  # a folder that is not loraplan's is refused before the lock file is made
    with lock_output_dir(out, command):
        claim_output_dir(out, **claim)
        resume_from = prepare_output_dir(plan, resume=resume, overwrite=overwrite)
        try:
            check_and_record_datasets(plan, resuming=resume_from is not None)
            save_plan(plan, os.path.join(out, run_files.PLAN_FILE))
            with library_log.library_log_file(os.path.join(out, run_files.RUN_LOG)):
                _announce(plan, resume_from, console, resume)
                summary = _launch(plan, resume_from[1] if resume_from else None, console, rdzv)
            # Wall time as the user lived it: imports, checks, process launch, loading, training, saving.
            summary.wall_s = time.perf_counter() - t0
            write_run_plots(plan, summary)  # loss.png (and memory.png on a GPU) beside metrics.jsonl
            write_json(os.path.join(out, run_files.SUMMARY_FILE), summary.to_dict())
        except OSError as exc:  # plan.yaml or summary.json on a full disk (training's own saves say so in train.py)
            if not is_disk_full(exc):
                raise
            raise TrainingFailed(disk_full_message(out, step=-1)) from None
    return summary


def _announce(plan: Plan, resume_from, console, resume: bool) -> None:
    if console is None:
        return
    where = f" from checkpoint {resume_from[1]}" if resume_from else ""
    console.print(f"[bold]loraplan run[/bold]: {plan.method} on {plan.model.name}, strategy {plan.strategy}"
                  f", output {plan.output_dir}{where}")
    if resume:  # say which newer checkpoints were damaged (already verified, so this hashes nothing again)
        instead = f"resuming from {resume_from[1]} instead" if resume_from else "starting from step 0"
        for _, path, why in checkpoints.resumable_checkpoint(plan.output_dir)[1]:
            console.print(f"[yellow]skipping checkpoint {path}: {why}; {instead}[/yellow]", soft_wrap=True)
    from .fsdp_load import sharded_qlora, whole_load_note

    if sharded_qlora(plan):
        from .model import plan_model_dir

        note = whole_load_note(plan, plan_model_dir(plan))
        if note:
            console.print(f"[yellow]loading: {note}[/yellow]", soft_wrap=True)
    if plan.hardware.gpu != "cpu":
        import torch

        if not torch.cuda.is_available():
            console.print(f"[yellow]no GPU visible: training this {plan.hardware.gpu_name} plan on the CPU "
                          f"(slowly; its memory prediction does not apply)[/yellow]")


def _train_here(plan: Plan, resume_from: Optional[str], console, rdzv) -> RunSummary:
    """This process trains (strategies whose launcher is "in-process")."""
    from .train import train_plan

    return train_plan(plan, resume_from, console=console, foreground=True)


def _accelerate(plan: Plan, resume_from: Optional[str], console, rdzv) -> RunSummary:
    """accelerate's launcher starts this machine's worker processes: a sharded plan always (its FSDP config is
    accelerate's), a data-parallel one when it has more than one process (one process trains here)."""
    from .fsdp import is_sharded

    if not is_sharded(plan) and plan.hardware.world_size == 1:
        return _train_here(plan, resume_from, console, rdzv)
    from .launch import launch_workers

    return launch_workers(plan, resume_from, console, rdzv)


# The strategy table's `launcher` (planner/plugins/strategies.py) -> how this machine starts training.
LAUNCHERS = {"in-process": _train_here, "accelerate": _accelerate}


def _launch(plan: Plan, resume_from: Optional[str], console, rdzv) -> RunSummary:
    return LAUNCHERS[STRATEGIES[plan.strategy].launcher](plan, resume_from, console, rdzv)
