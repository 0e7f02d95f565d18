"""Sharded plans beside published per-GPU measurements of FSDP LoRA / QLoRA fine-tuning (tables/published_fsdp.yaml).

    python benchmarks/published.py                 # planned beside published, one line a row
    python benchmarks/published.py --markdown      # the table and the differences, for docs/accuracy.md
    python benchmarks/published.py --plan ROW_ID   # the whole `loraplan plan` report for one row

Each row is planned through planner.api.make_plan with the source's strategy and method forced, its LoRA shape,
sequence, micro-batch, checkpointing and loss recipe. The plan's figure is put in the published figure's terms:
  nvidia-smi  the predicted peak (every GPU term, the CUDA context included)
  reserved    the peak less cuda_context (memory-model.md: the context is device used - reserved)
  allocated   the peak less cuda_context and allocator_reserve (the allocator's share of reserved - allocated)
A figure whose measure the source does not state is compared as its row's `compare_as`. GB as written is 10^9 B.
Host: the host memory the plan needs on the node (the ranks' offloaded shards, plus rank 0's copy while loading).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from loraplan.planner.api import PlanRequest, make_plan  # noqa: E402
from loraplan.tables import models as catalog_models  # noqa: E402
from loraplan.tables import TABLES_DIR  # noqa: E402

GIB = 2**30
TABLE = TABLES_DIR / "published_fsdp.yaml"
MEASURES = ("nvidia-smi", "reserved", "allocated")
UNITS = {"GiB": 1.0, "GB": 1e9 / GIB}
PLAN_FIELDS = {f.name for f in dataclasses.fields(PlanRequest)}


def load_table(path: Path = TABLE) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def to_gib(value: float, unit: str) -> float:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return value * UNITS[unit]


def measure_of(published: dict) -> str:
    """What the published figure is, in loraplan's terms (a stated measure, else the row's compare_as)."""
    m = published["measures"]
    if m == "unstated":
        m = published.get("compare_as")
    if m not in MEASURES:
        raise ValueError(f"measures / compare_as must be one of {', '.join(MEASURES)}, got {m!r}")
    return m


def planned_as(terms: dict[str, float], measure: str) -> float:
    """The plan's per-GPU GiB (GPU terms by name) in the terms of `measure`."""
    total = sum(terms.values())
    if measure == "nvidia-smi":
        return total
    total -= terms.get("cuda_context", 0.0)
    if measure == "reserved":
        return total
    return total - terms.get("allocator_reserve", 0.0)


@contextlib.contextmanager
def model_files(models: dict) -> Iterator[dict[str, str]]:
    """Each `models` entry written as <tmp>/<name>/config.json; yields name -> that directory."""
    with tempfile.TemporaryDirectory(prefix="loraplan-published-") as tmp:
        paths = {}
        for name, entry in (models or {}).items():
            folder = Path(tmp) / name
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(entry["config"]), encoding="utf-8")
            paths[name] = str(folder)
        yield paths


def request(row: dict, paths: dict[str, str]) -> PlanRequest:
    args = {k: v for k, v in row["plan"].items() if v is not None}
    unknown = set(args) - PLAN_FIELDS
    if unknown:
        raise ValueError(f"{row['id']}: unknown plan arguments {sorted(unknown)}")
    if args.get("gpu_memory") and "gpu" not in args:
        args["gpu"] = None  # as the CLI passes it: a custom card of that size (PlanRequest's default "auto" detects)
    name = args["model"]
    if name in paths:
        args["model"] = paths[name]
    elif name not in catalog_models():
        raise ValueError(f"{row['id']}: model {name!r} is neither in the catalog nor under `models`")
    return PlanRequest(**args, fit_table=False)


def cli_args(row: dict) -> str:
    """The row's plan as `loraplan plan` arguments (a `models` entry shown as its config.json)."""
    flags = {"num_gpus": "--num-gpus", "gpu_memory": "--gpu-memory", "host_memory": "--host-memory",
             "strategy": "--strategy", "method": "--method", "rank": "-r", "alpha": "--alpha", "dropout": "--dropout",
             "targets": "--targets", "seq_len": "--seq-len", "batch_size": "--batch-size",
             "global_batch_size": "--global-batch-size", "grad_checkpointing": "--grad-checkpointing",
             "optimizer": "--optimizer", "loss": "--loss", "gpu": "--gpu"}
    plan = {k: v for k, v in row["plan"].items() if v is not None}
    model = plan.pop("model")
    parts = [model if model in catalog_models() else f"{model}/config.json"]
    for key, value in plan.items():
        parts += [flags[key], str(value)]
    return " ".join(parts)


@dataclasses.dataclass
class Compared:
    row: dict
    measure: str  # the published figure's terms the plan is put in
    published_gib: float
    planned_gib: float  # the plan's per-GPU figure, as `measure`
    peak_gib: float  # the plan's predicted peak (nvidia-smi terms)
    terms: dict[str, float]
    published_host_gib: Optional[float]
    planned_host_gib: float
    load_gpu_gib: float
    usable_gib: float
    feasible: bool
    why_not: Optional[str]

    @property
    def error(self) -> float:
        return (self.planned_gib - self.published_gib) / self.published_gib

    @property
    def tolerance(self) -> Optional[float]:
        return self.row.get("tolerance")

    @property
    def within(self) -> Optional[bool]:
        return None if self.tolerance is None else abs(self.error) <= self.tolerance


def compare(row: dict, paths: dict[str, str]) -> Compared:
    res = make_plan(request(row, paths))
    pub = row["published"]
    measure = measure_of(pub)
    terms = {t.name: t.gib for t in res.terms if t.device == "gpu"}
    option = next(o for o in res.strategies if o.strategy == res.plan.strategy)
    host = pub.get("host")
    return Compared(
        row=row, measure=measure, published_gib=to_gib(pub["per_gpu"], pub["unit"]),
        planned_gib=planned_as(terms, measure), peak_gib=res.per_gpu_gib, terms=terms,
        published_host_gib=None if host is None else to_gib(host, pub.get("host_unit", pub["unit"])),
        planned_host_gib=option.host_gib, load_gpu_gib=option.load.gpu_gib, usable_gib=res.usable_gib,
        feasible=res.feasible, why_not=option.why_not,
    )


def evaluate(path: Path = TABLE) -> list[Compared]:
    table = load_table(path)
    with model_files(table.get("models")) as paths:
        return [compare(row, paths) for row in table["rows"]]


def verdict(c: Compared) -> str:
    """fits | does not fit (training is over the usable memory) | loading binds (training fits, the load does not) |
    host memory binds (both fit the GPU, the host's memory does not)."""
    if c.feasible:
        return "fits"
    if c.load_gpu_gib > c.usable_gib and c.peak_gib <= c.usable_gib:
        return "loading binds"
    if c.peak_gib <= c.usable_gib:  # training and the load fit the GPU: the host's memory binds
        return "host memory binds"
    return "does not fit"


def verdict_text(c: Compared) -> str:
    v = verdict(c)
    if v == "loading binds":
        return f"{v} ({c.load_gpu_gib:.1f} GiB per GPU at load)"
    if v == "host memory binds":
        return f"{v} ({c.planned_host_gib:.0f} GiB needed on rank 0's node)"
    if v == "does not fit":
        return f"{v} ({c.peak_gib:.1f} GiB peak, {c.usable_gib:.1f} usable)"
    return v


def print_text(rows: list[Compared]) -> None:
    print(f"{'row':44} {'measure':10} {'published':>9} {'planned':>8} {'error':>7} {'tol':>5}  {'host pub/plan':>14}  plan says")
    for c in rows:
        tol = "-" if c.tolerance is None else f"{c.tolerance:.0%}"
        host = "" if c.published_host_gib is None else f"{c.published_host_gib:.0f} / {c.planned_host_gib:.0f}"
        print(f"{c.row['id']:44} {c.measure:10} {c.published_gib:9.2f} {c.planned_gib:8.2f} {c.error:+7.1%} {tol:>5}  "
              f"{host:>14}  {verdict_text(c)}")
    held = [c for c in rows if c.tolerance is not None]
    inside = sum(bool(c.within) for c in held)
    print(f"{len(rows)} rows; {len(held)} held to a tolerance, {inside} within it. GiB per GPU; planned in the "
          "published figure's terms.")


def _card(plan: dict) -> str:
    if plan.get("gpu"):
        return plan["gpu"]
    return f"{plan['gpu_memory']} card"


def print_markdown(rows: list[Compared]) -> None:
    print("| row | model, cards | strategy, method, r | batch x seq | published | its measure | planned, same measure "
          "| error | tolerance | host GiB: published / planned | the plan says |")
    print("|---|---|---|---|---:|---|---:|---:|---:|---:|---|")
    for c in rows:
        r, pub, plan = c.row, c.row["published"], c.row["plan"]
        model = r["setup"]["model"].split("/")[-1].split(" ")[0]
        figure = f"{pub['per_gpu']:g} {pub['unit']}"
        if pub.get("range"):
            figure += f" ({pub['range'][0]:g}-{pub['range'][1]:g})"
        if pub["unit"] != "GiB":
            figure += f" = {c.published_gib:.2f} GiB"
        meas = pub["measures"] + (f", compared as {c.measure}" if pub["measures"] == "unstated" else "")
        host = "" if c.published_host_gib is None else f"{c.published_host_gib:.0f} / {c.planned_host_gib:.0f}"
        tol = "-" if c.tolerance is None else f"{c.tolerance:.0%}"
        print(f"| [{r['id']}]({r['url']}) | {model}, {plan['num_gpus']} x {_card(plan)} | {plan['strategy']}, "
              f"{plan['method']}, r={plan['rank']} | {plan['batch_size']} x {plan['seq_len']} | {figure} | {meas} | "
              f"{c.planned_gib:.2f} GiB | {c.error:+.0%} | {tol} | {host} | {verdict_text(c)} |")
    held = [c for c in rows if c.tolerance is not None]
    print()
    print(f"{len(rows)} rows; {len(held)} held to a tolerance (tests/test_published.py), "
          f"{sum(bool(c.within) for c in held)} within it.")
    print()
    print("Each row as `loraplan plan` arguments (`NAME/config.json`: the fields under `models:` in the table; "
          "`python benchmarks/published.py --plan ROW` prints the whole report):")
    print()
    print("```")
    for c in rows:
        print(f"{c.row['id']}: {cli_args(c.row)}")
    print("```")
    print()
    print("What differs between each source's run and the plan, largest first:")
    print()
    for c in rows:
        print(f"- **{c.row['id']}** ({c.row['source']}; {c.error:+.0%}):")
        for d in c.row["differences"]:
            print(f"  - {d}")


def print_plan(row_id: str) -> int:
    """The full `loraplan plan` report of one row (through the CLI, as a user would run it)."""
    from click.testing import CliRunner

    from loraplan.cli import main as cli

    table = load_table()
    row = next((r for r in table["rows"] if r["id"] == row_id), None)
    if row is None:
        print(f"no row {row_id!r}; rows: {', '.join(r['id'] for r in table['rows'])}", file=sys.stderr)
        return 2
    with model_files(table.get("models")) as paths:
        args = cli_args(row).split()
        name = row["plan"]["model"]
        if name in paths:
            args[0] = paths[name]
        out = CliRunner().invoke(cli, ["plan", *args, "--no-fit-table"], terminal_width=120)
        print(out.output, end="")
        return out.exit_code


def main() -> None:
    ap = argparse.ArgumentParser(description="sharded plans beside published FSDP LoRA/QLoRA measurements")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table and commands for docs/accuracy.md")
    ap.add_argument("--plan", metavar="ROW_ID", help="print the whole `loraplan plan` report for one row")
    args = ap.parse_args()
    if args.plan:
        sys.exit(print_plan(args.plan))
    rows = evaluate()
    if args.markdown:
        print_markdown(rows)
    else:
        print_text(rows)


if __name__ == "__main__":
    main()
