"""Click commands `run` and `merge`. Only click, rich, the stdlib and planner are imported at module level: the
training stack is imported inside the commands, so `loraplan plan` never pays for torch."""

from __future__ import annotations

import os
import sys
from typing import Optional

import click

from loraplan.planner.errors import PlanError
from loraplan.planner.facts import options
from loraplan.planner.plugins.strategies import STRATEGIES
from loraplan.planner.plugins.backends import BACKENDS

from .errors import RunError


def _fail(message: str, code: int) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _console():
    from rich.console import Console

    return Console()


@click.command("run")
@click.argument("plan_file", metavar="[PLAN]", required=False, type=click.Path(dir_okay=True))
@click.option("--resume", is_flag=True, help="Continue from the newest complete checkpoint in the plan's output dir "
              "(the plan must match the one the checkpoints came from).")
@click.option("--overwrite", is_flag=True, help="Replace a run already in the output dir (only the files a run "
              "writes are removed).")
@click.option("--use-existing-dir", is_flag=True, help="Write the run into a non-empty folder loraplan did not make, "
              "beside the files already there (refused if one of them has a name the run writes, e.g. plan.yaml).")
@click.option("--demo", is_flag=True, help="Train a tiny random-weight model on a shipped dataset (no PLAN needed).")
@click.option("--output-dir", type=click.Path(), default=None,
              help="Write the run here instead of the plan's output_dir (the demo's default: ./loraplan-demo).")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop after this many optimizer steps (recorded in the run's plan.yaml).")
@click.option("--force", is_flag=True, help="Run a plan even though its prediction does not fit its card.")
@click.option("--report-to", type=click.Choice(options.TRACKERS), default=None,
              help="Log to this experiment tracker instead of the plan's training.report_to (recorded in the run's "
              "plan.yaml); offline, into the output dir, unless your environment says otherwise.")
@click.option("--machine-rank", type=click.IntRange(min=0), default=None,
              help="Multi-node plans: this machine's rank, 0 to hardware.num_nodes - 1 (default: NODE_RANK or "
              "SLURM_NODEID from the environment).")
@click.option("--main-process-ip", default=None, metavar="HOST",
              help="Multi-node plans: machine 0's address, the same on every machine (default: MASTER_ADDR, or the "
              "first host of SLURM_JOB_NODELIST).")
@click.option("--main-process-port", type=click.IntRange(1, 65535), default=None, metavar="PORT",
              help="The rendezvous port on machine 0 (default: MASTER_PORT, else 29500 on several nodes and a free "
              "port on one).")
@click.option("--rendezvous-timeout", type=click.IntRange(min=1), default=600, show_default=True, metavar="SECONDS",
              help="Multi-node plans: how long a machine other than 0 waits for machine 0 to answer at "
              "--main-process-ip:--main-process-port (and the launcher's rendezvous timeout).")
@click.option("--strategy", "demo_strategy", default=None,
              # the CPU's own strategy, and those that take several (CPU) processes
              type=click.Choice([n for n, s in STRATEGIES.items() if s.device == "cpu" or s.max_world_size is None]),
              help="--demo only: how the demo spreads over --num-processes CPU processes (default: cpu for one, ddp "
              "for more).")
@click.option("--num-processes", type=click.IntRange(min=1), default=None,
              help="--demo only: train the demo over this many CPU processes (default 1).")
@click.option("--memory-snapshot", "memory_snapshot", type=click.IntRange(min=1), default=None, metavar="STEPS",
              is_flag=False, flag_value=3,
              help="Record the GPU allocator over the first STEPS steps (3 when given alone) and write OUT/memory/: "
              "what held the memory at the peak, by the code that allocated it, and torch's snapshot for "
              "pytorch.org/memory_viz. GPU only.")
@click.option("--backend", "demo_backend", type=click.Choice(tuple(BACKENDS)), default=None,
              help="--demo only: the training backend the demo is planned and trained with (default hf; a plan file "
              "names its own in training.backend).")
def run_command(plan_file: Optional[str], resume: bool, overwrite: bool, use_existing_dir: bool, demo: bool,
                output_dir: Optional[str], max_steps: Optional[int], force: bool, report_to: Optional[str],
                machine_rank: Optional[int], main_process_ip: Optional[str], main_process_port: Optional[int],
                rendezvous_timeout: int, demo_strategy: Optional[str], num_processes: Optional[int],
                memory_snapshot: Optional[int], demo_backend: Optional[str]) -> None:
    """Execute PLAN (a plan file written by `loraplan plan`) exactly as written.

    Loads the model (4-bit for QLoRA), wraps it with the plan's LoRA adapter, trains with trl's SFTTrainer on the
    plan's dataset and writes, under the plan's output_dir: adapter/, checkpoint-N/, plan.yaml, metrics.jsonl and
    summary.json. A ddp plan starts one process per GPU through accelerate's launcher; an fsdp or fsdp-offload plan
    too, with the FSDP2 config it writes to accelerate_config.yaml. A plan over several nodes runs the same
    command on every node with --machine-rank and --main-process-ip (or SLURM's / torchrun's environment); only
    machine 0 writes the plan copy, summary and adapter. SIGINT/SIGTERM save a checkpoint and stop; `--resume`
    continues it. One run at a time holds an output dir; a non-empty folder loraplan did not make is refused
    unless --use-existing-dir. Exit status: 0 done, 1 failed (e.g. out of memory, disk full), 2 bad input,
    130 interrupted.
    """  # long: click's command, its checks of the flags and its one-line errors read best in one place
    from loraplan import api

    from . import library_log

    library_log.quiet_library_logs()  # before anything imports bitsandbytes, which speaks at import
    command = " ".join(["loraplan run"] + ([plan_file] if plan_file else ["--demo"] if demo else [])
                       + [f for f, on in (("--resume", resume), ("--overwrite", overwrite)) if on])
    try:
        summary = api.run(plan_file, demo=demo, output_dir=output_dir, max_steps=max_steps, report_to=report_to,
                          resume=resume, overwrite=overwrite, use_existing_dir=use_existing_dir, force=force,
                          machine_rank=machine_rank, main_process_ip=main_process_ip,
                          main_process_port=main_process_port, rendezvous_timeout=rendezvous_timeout,
                          strategy=demo_strategy, num_processes=num_processes,
                          console=_console(), command=command, backend=demo_backend,
                          memory_snapshot=memory_snapshot or 0)
        if summary.machine_rank and summary.steps is None:  # another machine of a multi-node plan: machine 0 reports
            _console().print(f"machine {summary.machine_rank}: its processes finished; machine 0 holds the "
                             "report and the adapter", soft_wrap=True)
            return
        from .report import print_report

        print_report(summary, _console())
    except PlanError as exc:
        _fail(str(exc), 2)
    except RunError as exc:
        _fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:  # outside training (imports, checks, loading): nothing new was saved
        _fail("interrupted; nothing new was saved (a run's last complete checkpoint, if any, is intact)", 130)


@click.command("merge")
@click.argument("adapter_dir", type=click.Path())
@click.option("--output", "output", required=True, type=click.Path(),
              help="Folder for the merged model (must not exist or be empty).")
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
              help="dtype the base model is loaded and saved in (default: the run's training.dtype, from the plan.yaml "
              "beside the adapter; bf16 without one).")
@click.option("--trust-remote-code", is_flag=True, help="Allow the base model's own modelling code to run.")
def merge_command(adapter_dir: str, output: str, dtype: Optional[str], trust_remote_code: bool) -> None:
    """Merge the LoRA adapter in ADAPTER_DIR into its base model and save a model directory that
    `AutoModelForCausalLM.from_pretrained` loads. The base (adapter_config.json's base_model_name_or_path) must be a
    local folder or in the local Hugging Face cache; a QLoRA adapter merges into the unquantized base."""
    from . import library_log

    library_log.quiet_library_logs()  # bitsandbytes speaks when peft imports it
    try:
        from . import merge_facts
        from .merge import merge_adapter

        if dtype is None:
            dtype, why = merge_facts.default_dtype(adapter_dir)
            click.echo(f"dtype {dtype} ({why}; --dtype sets another)")
        if merge_facts.trained_on_4bit(adapter_dir):
            click.echo(merge_facts.QLORA_NOTE)
        path = merge_adapter(adapter_dir, output, dtype=dtype, trust_remote_code=trust_remote_code)
    except RunError as exc:
        _fail(exc.message, exc.exit_code)
    except KeyboardInterrupt:  # before the merged model was swapped in (the swap itself ignores SIGINT)
        _fail(f"interrupted; nothing was saved ({output} is as it was)", 130)
    click.echo(f"merged model saved to {os.path.abspath(path)}")


@click.group()
def main() -> None:
    """The executor's commands on their own (loraplan registers the same ones)."""


main.add_command(run_command)
main.add_command(merge_command)

if __name__ == "__main__":
    main()
