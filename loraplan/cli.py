"""The `loraplan` command line: plan (arithmetic, no torch), run and merge (the executor, loaded on use)."""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click

from loraplan.planner.facts import options
from loraplan.planner.plugins.strategies import STRATEGY_CHOICES
from loraplan.planner.plugins.backends import BACKENDS, DEFAULT_BACKEND

EXIT_FEASIBLE, EXIT_INFEASIBLE, EXIT_BAD_INPUT = 0, 1, 2


class SeqLen(click.ParamType):
    """A number of tokens, or `max`: the longest the card fits."""

    name = "TOKENS|max"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or str(value).strip().lower() == "max":
            return value if isinstance(value, int) else "max"
        try:
            return int(str(value).replace(",", "").replace("_", ""))
        except ValueError:
            self.fail(f"{value!r} is neither a number of tokens nor max", param, ctx)


class LazyGroup(click.Group):
    """Sub-commands that live in the executor are imported only when invoked, so `loraplan plan` never
    imports torch (or anything else the executor needs)."""

    lazy = {"run": ("loraplan.executor.cli", "run_command"), "merge": ("loraplan.executor.cli", "merge_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:  # a missing [run] extra surfaces when the command runs
                missing = exc.name or str(exc)

                @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
                def unavailable() -> None:
                    click.echo(f"Error: `loraplan {name}` needs the training stack ({missing} is missing): "
                               "pip install -e '.[run]'", err=True)
                    sys.exit(EXIT_BAD_INPUT)

                return unavailable
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="loraplan")
def main() -> None:
    """Plan and run LoRA / QLoRA fine-tuning.

    \b
    loraplan plan MODEL --gpu CARD     what fits: adapter size, memory per GPU term by term, the decision
    loraplan plan --from CONFIG.yaml   the same for an Axolotl, LLaMA-Factory or TRL config
    loraplan export PLAN --to TOOL     a plan as an Axolotl, LLaMA-Factory or TRL config
    loraplan run PLAN.yaml             train what the plan says, then compare observed with predicted memory
    loraplan merge ADAPTER --output D  merge an adapter into its base model
    loraplan run --demo                the whole loop on a tiny model, on any machine

    Nothing is ever downloaded: models come from the catalog (`loraplan models`), a config.json or model
    directory, or the local Hugging Face cache.
    """


@main.command("plan")
@click.argument("model", required=False)
@click.option("--from", "from_config", default=None, metavar="CONFIG.yaml",
              help="Plan an Axolotl, LLaMA-Factory or TRL (`trl sft --config`) config as written; flags given here "
                   "override its keys (docs/other-tools.md).")
@click.option("--from-format", type=click.Choice(("axolotl", "llamafactory", "trl")), default=None,
              help="The tool --from is written for (default: detected from its keys).")
@click.option("--gpu", default=None, metavar="NAME|auto|cpu",
              help="Card from the catalog (`loraplan gpus`), `auto` to read the detected GPUs through torch, or `cpu`. "
                   "Default: auto, or custom when --gpu-memory is given.")
@click.option("--gpu-memory", metavar="SIZE", help="Memory per GPU for a card not in the catalog (e.g. 24GiB, 80GB); "
                                                   "with --gpu it overrides the catalog's figure.")
@click.option("--num-gpus", type=int, default=None,
              help="GPUs per node to train on (default: 1, or all detected).")
@click.option("--num-nodes", type=int, default=None, help="Machines, each with --num-gpus GPUs (default 1).")
@click.option("--network", default=None, metavar="NAME|GBIT",
              help="The network between nodes: a name from tables/networks.yaml (ib-ndr-8x, ib-hdr-8x, efa-3200, "
                   "eth-400, eth-100, eth-25) or Gbit/s per node. Default eth-100 when --num-nodes > 1.")
@click.option("--host-memory", default=None, metavar="SIZE",
              help="RAM per node (e.g. 512GiB): what loading, CPU offload and the savers' pinned memory may use. "
                   "Default: this machine's with --gpu auto or cpu, else 2 x the node's GPU memory.")
@click.option("--strategy", type=click.Choice(STRATEGY_CHOICES), default="auto", show_default=True,
              help="auto: DDP when a replica fits, else FSDP, else FSDP with CPU offload, the fastest that fits.")
@click.option("--method", type=click.Choice(options.METHOD_CHOICES), default=options.default("method"), show_default=True,
              help="auto: LoRA when it fits with headroom, else QLoRA.")
@click.option("--rank", "-r", type=int, default=None, help=f"LoRA rank r (default {options.default('rank')}).")
@click.option("--alpha", type=int, default=None, help=f"LoRA alpha (default {options.setting('alpha', 'per_rank')} x rank).")
@click.option("--dropout", type=float, default=None,
              help=f"LoRA dropout (default {options.default('dropout')}; 0 for MoE experts).")
@click.option("--targets", default=None, metavar="LIST",
              help="Comma list of q,k,v,o,gate,up,down (or module names), or all-linear. "
                   "Default: q,k,v,o,gate,up,down or the architecture's equivalents (fused qkv_proj, experts).")
@click.option("--seq-len", type=SeqLen(), default=None,
              help=f"Tokens per sequence (default {options.default('seq_len')}, or the model's max_position_embeddings "
                   f"when shorter), or max: the longest multiple of {options.SEQ_LEN_STEP} that fits (with the "
                   "savers --savers allows; by default the offloads and MLP tiling), shown for every card.")
@click.option("--batch-size", type=int, default=None, help="Fixed micro-batch per GPU (default: the largest that fits).")
@click.option("--global-batch-size", type=int, default=None,
              help=f"Sequences per optimizer step over all GPUs (default {options.default('global_batch_size')}, "
                   "rounded up to a multiple of the GPUs); accumulation is derived.")
@click.option("--grad-checkpointing", type=click.Choice(options.CHECKPOINTING_CHOICES),
              default=options.default("gradient_checkpointing"), show_default=True, help="auto: only when needed to fit.")
@click.option("--optimizer", type=click.Choice(tuple(options.OPTIMIZERS)), default=options.default("optimizer"),
              show_default=True)
@click.option("--savers", default=None, metavar="LIST",
              help="Memory savers the plan may use, a comma list applied left to right: NAME (on), NAME=auto|on|off, "
                   "no-NAME (off), or auto (all auto) / none. Names: "
                   + ", ".join(n.replace("_", "-") for n in options.SAVERS)
                   + ". Default: none for a fixed --seq-len; for --seq-len max "
                   + ", ".join(n.replace("_", "-") for n, m in options.saver_defaults(True).items() if m == "auto")
                   + " (docs/memory-model.md, Savers).")
@click.option("--loss", type=click.Choice(options.LOSSES), default=options.default("loss"), show_default=True,
              help="fused: LM head + cross-entropy in chunks, as trl's SFTTrainer (what `run` does); "
                   "full: the model's own loss over materialized fp32 logits, as a plain training loop.")
@click.option("--dataset", type=str, default=None, metavar="FILE",
              help="Training data (.jsonl/.json/.csv/.parquet): token statistics for the time estimate and the plan.")
@click.option("--eval-path", type=str, default=None, metavar="FILE",
              help="A held-out eval file in the training data's format: `run` evaluates on it at each save.")
@click.option("--eval-fraction", type=float, default=None, metavar="SHARE",
              help="Or hold out this share of --dataset for eval, in [0, 1) (seeded; default 0: no eval).")
@click.option("--output", "-o", type=str, default=None, metavar="PLAN.yaml", help="Write the plan file here.")
@click.option("--output-dir", type=str, default=None, help="Where `run` will write adapters and checkpoints (default out).")
@click.option("--learning-rate", "--lr", type=float, default=None, help=f"Default {options.default('learning_rate'):g}.")
@click.option("--epochs", type=float, default=None,
              help=f"Default {options.default('num_epochs')}, or {options.setting('num_epochs', 'small_dataset_value')} for a "
                   f"dataset under {options.setting('num_epochs', 'small_dataset_rows'):,} rows.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (overrides epochs).")
@click.option("--train-tokens", type=int, default=None, help="Training tokens for the time estimate (without --dataset).")
@click.option("--trust-remote-code", is_flag=True, help="Let `run` execute the model repository's own code.")
@click.option("--report-to", type=click.Choice(options.TRACKERS), default=options.default("report_to"), show_default=True,
              help="The experiment tracker `run` logs to, offline into the output dir unless your environment says "
                   "otherwise (docs/running.md, Trackers); needs that tracker's package.")
@click.option("--backend", type=click.Choice(tuple(BACKENDS)), default=DEFAULT_BACKEND, show_default=True,
              help="The training backend `run` uses: " + "; ".join(f"{b.name}: {b.description}" for b in BACKENDS.values())
                   + ". Its memory terms, defaults and refusals apply; a one-GPU plan shows both side by side.")
@click.option("--plot", type=str, default=None, metavar="FILE.png|FILE.svg",
              help="Draw the plan's peak memory against sequence length, stacked by term, with the card's usable "
                   "memory (matplotlib: pip install 'loraplan[plot]').")
@click.option("--no-fit-table", is_flag=True, help="Skip the table across catalog cards.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with every fact (docs/plan-json.md).")
@click.pass_context
def plan_command(ctx: click.Context, model: Optional[str], from_config, from_format, gpu, gpu_memory, num_gpus,
                 num_nodes, network, host_memory, strategy, method, rank, alpha, dropout, targets, seq_len, batch_size,
                 global_batch_size, grad_checkpointing, optimizer, savers, loss, dataset, eval_path, eval_fraction, output, output_dir, learning_rate, epochs, max_steps,
                 train_tokens, trust_remote_code, report_to, backend, plot, no_fit_table, as_json) -> None:
    """Plan LoRA / QLoRA fine-tuning of MODEL: a catalog name, a config.json or model directory, or a hub id
    in the local Hugging Face cache; or the Axolotl, LLaMA-Factory or TRL config --from names.

    Exit status: 0 when it fits, 1 when it does not (the output says what would), 2 on bad input.
    """
    from loraplan.api import plan_request
    from loraplan.planner.api import make_plan
    from loraplan.planner.errors import InputError

    kwargs = dict(
        model=model, gpu=gpu, gpu_memory=gpu_memory, num_gpus=num_gpus, num_nodes=num_nodes, network=network,
        host_memory=host_memory, strategy=strategy, method=method, rank=rank, alpha=alpha,
        dropout=dropout, targets=targets, seq_len=seq_len, batch_size=batch_size, global_batch_size=global_batch_size,
        grad_checkpointing=grad_checkpointing, optimizer=optimizer, loss=loss, dataset=dataset, eval_path=eval_path,
        eval_fraction=eval_fraction, output_dir=output_dir,
        learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, train_tokens=train_tokens,
        trust_remote_code=trust_remote_code, fit_table=not no_fit_table, savers=savers, report_to=report_to,
        backend=backend,
    )
    imported = None
    try:
        if plot:
            from loraplan.planner.report.plot import check_plot_path

            check_plot_path(plot)  # before any work: a wrong extension or no matplotlib is one line
        if from_config:  # the config's keys, then every flag typed on the command line over them
            from click.core import ParameterSource

            from loraplan.planner import formats

            given = {n for n in kwargs if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE}
            imported = formats.load(from_config, from_format)
            kwargs = formats.request(imported[1], kwargs, given | ({"model"} if model else set()))
        elif not model:
            raise InputError("name a MODEL, or a tool config with --from CONFIG.yaml")
        res = make_plan(plan_request(kwargs.pop("model"), **kwargs))
        if imported:
            res.from_config = formats.from_config_json(*imported, res.suggestions)
        if output:
            from loraplan.planner.planfile import paths as plan_paths

            plan_paths.save(res.plan, output)  # relative paths in the file are relative to the file
        if plot:
            res.plot(plot)
    except InputError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {exc.filename or output}: {exc.strerror or exc}")
    if as_json:
        data = res.to_json()
        data["plan_file"] = output
        data["plot_file"] = plot
        click.echo(json.dumps(data, indent=2))
    else:
        from loraplan.planner.planfile.paths import shell_command
        from loraplan.planner.report.tables import render

        console = _console()
        render(res, console)
        if imported:
            formats.render(*imported, res.suggestions, console)
        if output:
            console.print(f"Plan written to {output}" + ("" if res.feasible else " (infeasible: `run` refuses it unless --force)")
                          + (f"; run it with: {shell_command('loraplan', 'run', output)}" if res.feasible else ""))
        if plot:
            console.print(f"Memory plot written to {plot}")
    sys.exit(EXIT_FEASIBLE if res.feasible else EXIT_INFEASIBLE)


@main.command("export")
@click.argument("plan_file", metavar="PLAN.yaml")
@click.option("--to", "tool", type=click.Choice(("axolotl", "llamafactory", "trl")), required=True,
              help="The tool whose config to write.")
@click.option("--output", "-o", default=None, metavar="FILE", help="Write it here (default: print it).")
def export_command(plan_file: str, tool: str, output: Optional[str]) -> None:
    """Write a config for Axolotl, LLaMA-Factory or TRL that reproduces PLAN.yaml's decisions: model, method,
    adapter, sequence length, micro-batch and accumulation, checkpointing, optimizer, the savers the tool has,
    and FSDP. Its header says what the tool cannot express. `loraplan plan --from FILE` plans it again."""
    from loraplan.planner import formats
    from loraplan.planner.errors import InputError, PlanError
    from loraplan.planner.planfile.schema import Plan

    try:
        plan = Plan.load(plan_file)
        text = formats.export_text(plan, tool, plan_file, output or f"{tool}.yaml")
        if output:
            from loraplan.planner.planfile.io import atomic_write_text

            atomic_write_text(output, text)
    except (InputError, PlanError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {output}: {exc.strerror or exc}")
    if output:
        click.echo(f"{tool} config written to {output}")
    else:
        click.echo(text, nl=False)


@main.command("models")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list instead: each model's name, display name, hub id, family, params, layers, "
                   "hidden size and vocabulary.")
def models_command(as_json: bool) -> None:
    """List the model catalog."""
    from loraplan.planner.architecture.families import from_config
    from loraplan.tables import models

    rows = []
    for key, e in models().items():
        a = from_config(e["config"])
        rows.append({"name": key, "display_name": e.get("display_name"), "hub_id": e.get("hub_id"), "family": a.family,
                     "params": a.total_params, "layers": a.num_layers, "hidden": a.hidden_size, "vocab": a.vocab_size})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from loraplan.planner.report.tables import key_column, min_width, new_table, print_table, text_column

    console = _console()

    def table(narrow: bool):
        t = new_table("Model catalog (tables/models.yaml)")
        key_column(t, "name")
        text_column(t, "hub id")  # folds (never cut) only on a console too narrow for even the narrow layout
        key_column(t, "family")
        for c in ("params",) if narrow else ("params", "layers", "hidden", "vocab"):
            key_column(t, c, justify="right")
        for r in rows:
            cells = [f"{r['params'] / 1e9:.2f} B"] + ([] if narrow else [str(r["layers"]), str(r["hidden"]),
                                                                         f"{r['vocab']:,}"])
            t.add_row(r["name"], r["hub_id"] or "", r["family"], *cells)
        return t

    t = table(narrow=False)
    if min_width(console, t) > console.width:  # fewer columns rather than cut names (80 columns: this one)
        t = table(narrow=True)
        t.caption, t.caption_justify = ("layers, hidden size and vocabulary: loraplan models --json, or a wider "
                                        "terminal"), "left"
    print_table(console, t)


@main.command("gpus")
@click.option("--json", "as_json", is_flag=True,
              help="Print the catalog as JSON instead: every field of tables/gpus.yaml per card (memory, bf16, peak "
                   "FLOP/s, bandwidth, links, sources).")
def gpus_command(as_json: bool) -> None:
    """List the GPU catalog."""
    from loraplan.tables import gpus

    if as_json:
        click.echo(json.dumps(gpus(), indent=2))
        return
    from loraplan.planner.report.tables import key_column, new_table, print_table, text_column

    t = new_table("GPU catalog (tables/gpus.yaml)")
    key_column(t, "name")
    text_column(t, "card")  # the vendor's name wraps between words; the key in `name` is what --gpu takes
    for c in ("memory\nGiB", "bf16", "bf16\nTFLOP/s", "GB/s"):
        key_column(t, c, justify="left" if c == "bf16" else "right")
    for k, e in gpus().items():
        t.add_row(k, e["name"], f"{e['memory_gib']:.2f}", "yes" if e["bf16"] else "no",
                  str(e.get("peak_bf16_tflops") or "-"), str(e.get("bandwidth_gbs") or "-"))
    print_table(_console(), t)


def _console():
    """The console for people. In a terminal: its width. Piped into a file or a log: $COLUMNS when set, else 120
    columns, not rich's 80, so that a log keeps the tables as wide as a terminal shows them."""
    from rich.console import Console

    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit():
        return Console()  # rich reads $COLUMNS itself
    return Console(width=120)


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":
    main()
