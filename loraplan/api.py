"""The Python API: `loraplan.plan`, `loraplan.run`, `loraplan.merge` (docs/python-api.md).

The CLI is a thin layer over these: `loraplan plan` builds its PlanRequest with `plan_request` (the one mapping
from options to a request), `loraplan run` calls `run`, `loraplan merge` calls the executor's merge. Errors are
`loraplan.LoraplanError` (loraplan/errors.py) with the CLI's one-line messages. Nothing here imports torch at
module level: `import loraplan` and `loraplan.plan(...)` stay arithmetic; torch loads when `run` or `merge` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:  # pragma: no cover - for readers and type checkers only
    from loraplan.executor.summary import RunSummary
    from loraplan.planner.planfile.schema import Plan
    from loraplan.planner.facts.request import PlanRequest
    from loraplan.planner.report.result import PlanResult


def plan_request(model: str, **options: Any) -> "PlanRequest":
    """A PlanRequest from options named as PlanRequest's fields (`gpu`, `num_gpus`, `rank`, `seq_len`, `method`,
    `report_to`, ... : the `plan` command's flags with underscores; `fit_table` is --no-fit-table's opposite).

    An option given as None takes its default, as an absent flag does. An unknown name is a one-line InputError."""
    from loraplan.planner.errors import InputError
    from loraplan.planner.facts.request import PlanRequest

    names = [f.name for f in dataclasses.fields(PlanRequest) if f.name != "model"]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise InputError(f"unknown option {unknown[0]!r} of loraplan.plan; known: {', '.join(names)}")
    return PlanRequest(model=model, **{k: v for k, v in options.items() if v is not None})


def plan(model: str, gpu: Optional[str] = None, *, output: Optional[str] = None, **options: Any) -> "PlanResult":
    """Plan LoRA / QLoRA fine-tuning of MODEL on GPU, as `loraplan plan MODEL --gpu GPU ...` does.

    Returns the PlanResult: `.feasible`, `.plan` (the plan file's content), `.terms`, `.to_json()` (the same
    object as `--json`, docs/plan-json.md), `.plot(path)` (`--plot`); in a notebook it shows the report.
    OUTPUT writes the plan file. Raises loraplan.LoraplanError (InputError) on bad input; an infeasible request
    is not an error: `.feasible` is False and `.suggestions` say what would fit."""
    from loraplan.planner.api import make_plan
    from loraplan.planner.errors import InputError

    res = make_plan(plan_request(model, gpu=gpu, **options))
    if output:
        try:
            res.plan.save(output)
        except OSError as exc:
            raise InputError(f"cannot write {output}: {exc.strerror or exc}") from None
    return res


def run(plan: Union[str, "Plan", None] = None, *, demo: bool = False, output_dir: Optional[str] = None,
        max_steps: Optional[int] = None, report_to: Optional[str] = None, resume: bool = False,
        overwrite: bool = False, use_existing_dir: bool = False, force: bool = False,
        machine_rank: Optional[int] = None, main_process_ip: Optional[str] = None,
        main_process_port: Optional[int] = None, rendezvous_timeout: int = 600, strategy: Optional[str] = None,
        num_processes: Optional[int] = None, console: Any = "auto", command: Optional[str] = None,
        backend: Optional[str] = None, memory_snapshot: int = 0) -> "RunSummary":
    """Train a plan (a plan file's path, a Plan, or a PlanResult from `plan`), or the demo (`demo=True`), as
    `loraplan run` does; returns the RunSummary (what summary.json holds).

    A plan file's relative paths are relative to its folder (docs/running.md). output_dir (relative to the working
    directory), max_steps and report_to override the plan's and are recorded in the run's plan.yaml.
    rendezvous_timeout: seconds a machine other than 0 of a multi-node plan waits for machine 0. backend: the
    demo's training backend (a plan file names its own). memory_snapshot: record the GPU allocator over the
    first N steps each process trains and write OUT/memory/ (what held the memory at the peak, by the code that
    allocated it; executor/memory_snapshot.py); 0: no snapshot; a GPU only. console:
    "auto" prints progress and messages with rich, None is silent, or a rich Console. Raises loraplan.LoraplanError:
    RunError (exit_code 2: bad input; TrainingFailed 1: e.g. out of memory; Interrupted 130) or PlanError."""
    from loraplan.executor.claim import check_claim, claim_output_dir
    from loraplan.executor.device import uses_cuda
    from loraplan.executor.errors import RunError, require_run_extra
    from loraplan.executor.folder_lock import lock_output_dir
    from loraplan.executor.memory_snapshot import DEFAULT_STEPS
    from loraplan.executor.trackers import check_installed
    from loraplan.planner.planfile import paths as plan_paths
    from loraplan.planner.planfile.schema import Plan

    if console == "auto":
        from rich.console import Console

        console = Console()
    if isinstance(plan, str):
        plan_file: Optional[str] = plan
    else:
        plan_file = None
        plan = getattr(plan, "plan", plan)  # a PlanResult holds its plan
    if command is None:
        command = " ".join(["loraplan run"] + ([plan_file] if plan_file else ["--demo"] if demo else [])
                           + [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on])
    if resume and overwrite:
        raise RunError("give --resume or --overwrite, not both")
    if (strategy or num_processes) and not demo:
        raise RunError("--strategy and --num-processes are for --demo; a plan file's strategy and processes come "
                       "from `loraplan plan`")
    if backend and not demo:
        raise RunError("--backend is for --demo; a plan file names its backend in training.backend (`loraplan plan "
                       "--backend`)")
    if report_to is not None:
        check_installed(report_to)  # before anything is written (the demo writes its model first)
    snapshot_steps = DEFAULT_STEPS if memory_snapshot is True else int(memory_snapshot or 0)
    if snapshot_steps < 0:
        raise RunError(f"--memory-snapshot takes a number of steps (1 or more), got {memory_snapshot}")
    if snapshot_steps and demo:  # the demo trains on CPU processes
        raise RunError("--memory-snapshot records the GPU's caching allocator (torch.cuda.memory); this run trains "
                       "on the CPU, which has none")
    if demo:
        if plan is not None:
            raise RunError("give either PLAN or --demo, not both")
        from loraplan.executor.backends import backend_named

        backend_named(backend or "hf").prepare_process()  # first: the demo's model is built with transformers
        require_run_extra()
        from loraplan.executor.demo import prepare_demo

        out = output_dir or "loraplan-demo"
        check_claim(out, use_existing=use_existing_dir, also_writes=("model",))
        with lock_output_dir(out, command):  # held from before the demo builds its model
            claim_output_dir(out, use_existing=use_existing_dir, also_writes=("model",))
            p = prepare_demo(out, max_steps=max_steps or 60, strategy=strategy, num_processes=num_processes or 1,
                             backend=backend)
            _override(p, None, None, report_to)
            # The demo replaces its own earlier run unless asked to resume it.
            return _execute(p, resume, overwrite or not resume, use_existing_dir, None, command, None, console)
    if plan is None:
        raise RunError("missing PLAN (a plan file from `loraplan plan`), or pass --demo")
    # a copy: the caller's stays as it was; a file's relative paths are relative to the file
    p = plan_paths.load(plan_file) if plan_file else Plan.from_dict(plan.to_dict())
    _override(p, output_dir, max_steps, report_to)
    p.validate()
    if not p.fits() and not force:
        raise RunError(
            f"this plan does not fit: it predicts {p.prediction.per_gpu_gib:.1f} GiB per GPU and "
            f"{p.hardware.gpu_name} allows {p.hardware.memory_gib * (1 - p.prediction.margin):.1f} GiB; "
            "plan again (`loraplan plan` says what would fit) or pass --force"
        )
    if snapshot_steps and not uses_cuda(p):
        raise RunError("--memory-snapshot records the GPU's caching allocator (torch.cuda.memory); this run trains "
                       "on the CPU, which has none")
    from loraplan.executor.launch import resolve_rendezvous

    rendezvous = dataclasses.replace(resolve_rendezvous(p, machine_rank, main_process_ip, main_process_port),
                                     timeout_s=rendezvous_timeout)
    return _execute(p, resume, overwrite, use_existing_dir, plan_file, command, rendezvous, console,
                    snapshot_steps)


@contextlib.contextmanager
def _memory_snapshot_env(steps: int):
    """LORAPLAN_MEMORY_SNAPSHOT=steps for this run: every process of it reads it (accelerate's workers inherit the
    environment), and it is restored after."""
    from loraplan.executor.memory_snapshot import ENV

    if not steps:
        yield
        return
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(int(steps))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


def _override(p: "Plan", output_dir: Optional[str], max_steps: Optional[int], report_to: Optional[str]) -> None:
    """`run`'s overrides of the plan, recorded in the run's plan.yaml."""
    from loraplan.planner.planfile import paths as plan_paths

    if output_dir:
        p.output_dir = output_dir
        plan_paths.forget(p, "output_dir")  # a flag's path is the working directory's, not the plan file's
    if max_steps:
        p.training.max_steps = max_steps
    if report_to is not None:
        p.training.report_to = report_to


def _execute(p: "Plan", resume: bool, overwrite: bool, use_existing_dir: bool, plan_file: Optional[str], command: str,
             rendezvous, console, snapshot_steps: int = 0) -> "RunSummary":
    from loraplan.executor.runner import execute

    with _memory_snapshot_env(snapshot_steps):
        return execute(p, resume=resume, overwrite=overwrite, console=console, use_existing_dir=use_existing_dir,
                       plan_file=plan_file, command=command, rendezvous=rendezvous)


def merge(adapter_dir: str, output: str, *, dtype: str = "bf16", trust_remote_code: bool = False) -> str:
    """Merge the LoRA adapter in ADAPTER_DIR into its base model, saved to OUTPUT (as `loraplan merge`); returns
    the merged model's folder. Raises loraplan.LoraplanError (RunError) with the CLI's one-line messages."""
    from loraplan.executor.merge import merge_adapter  # checks dtype against MERGE_DTYPES, as the CLI's choice

    return merge_adapter(adapter_dir, output, dtype=dtype, trust_remote_code=trust_remote_code)
