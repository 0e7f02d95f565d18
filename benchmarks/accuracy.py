"""Predicted vs measured peak memory per GPU on every calibration row, beside today's static rules of thumb.

    python benchmarks/accuracy.py              # table + summary (the last two lines: median and max error)
    python benchmarks/accuracy.py --markdown   # the same table as Markdown, for docs/accuracy.md
    python benchmarks/accuracy.py --held-out   # leave one architecture out: refit on the others, predict it
    python benchmarks/accuracy.py --held-out --show-fits   # ... and each fold's fitted coefficients beside the full fit's

Predicted: `loraplan plan`'s peak per GPU for the row's shape and recipe (plain rows: --loss full; trl rows:
--loss fused). Measured: device_used_gib_end (total - free after the steps: what nvidia-smi shows).
--held-out: the coefficients of tables/memory.yaml were fitted on these same rows, so the default table shows the
fit. --held-out refits them (benchmarks/fit_memory.py's `fit`, in memory: tables/memory.yaml is not written) on the
rows of every architecture but one, predicts the left-out architecture's rows with that fit, and does so for each
architecture in turn: what to expect on an architecture the fit has not seen.
Static tables: the widely quoted "7B LoRA 16 GB / QLoRA 6 GB, 13B 32/10, 70B 160/48" (interpolated linearly
in parameter count between its rows) and "2 bytes per parameter" (bf16 weights, regardless of method).
"""

from __future__ import annotations

import argparse
import dataclasses
import contextlib
import copy
import statistics
import sys
from pathlib import Path
from typing import Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calibration import load_rows, row_inputs  # noqa: E402
from loraplan.planner.memory import terms as memory
from loraplan.planner.memory.coefficients import Coefficients

GIB = 2**30
# the widely quoted table: params (billions) -> (LoRA GB, QLoRA GB)
STATIC_TABLE = [(7, 16, 6), (13, 32, 10), (70, 160, 48)]


def static_table_gib(params_b: float, method: str) -> float:
    col = 1 if method == "lora" else 2
    pts = STATIC_TABLE
    if params_b <= pts[0][0]:
        return pts[0][col] * params_b / pts[0][0] * 1e9 / GIB
    for lo, hi in zip(pts, pts[1:]):
        if params_b <= hi[0]:
            f = (params_b - lo[0]) / (hi[0] - lo[0])
            return (lo[col] + f * (hi[col] - lo[col])) * 1e9 / GIB
    return pts[-1][col] * params_b / pts[-1][0] * 1e9 / GIB


def evaluate(rows: Optional[list[dict]] = None) -> list[dict]:
    """Predicted vs measured (and the static tables) on these calibration rows (default: all of them)."""
    out = []
    for row in load_rows() if rows is None else rows:
        arch, sel, shape = row_inputs(row)
        pred = memory.peak_bytes(arch, sel, shape) / GIB
        meas = row["device_used_gib_end"]
        params_b = arch.total_params / 1e9
        out.append(
            dict(
                recipe=row["recipe"], model=row["model"], method=row["method"], batch=row["batch"], seq=row["seq"],
                grad_ckpt=row["grad_ckpt"], measured=meas, predicted=pred, error=(pred - meas) / meas,
                static=static_table_gib(params_b, row["method"]), two_bytes=2 * arch.total_params / GIB,
            )
        )
    for r in out:
        r["static_error"] = (r["static"] - r["measured"]) / r["measured"]
        r["two_bytes_error"] = (r["two_bytes"] - r["measured"]) / r["measured"]
    return out


@contextlib.contextmanager
def coefficients_from(fitted: dict) -> Iterator[None]:
    """Predict with these `fitted` and `measured` sections instead of tables/memory.yaml's (the rest of the
    table, the derived coefficients, unchanged); the file is neither read again nor written."""
    data = dataclasses.asdict(memory.coefficients())
    data.update(copy.deepcopy(fitted))
    table = Coefficients.from_dict(data)
    original = memory.coefficients
    memory.coefficients = lambda: table  # memory.py looks the function up by name on every call
    try:
        yield
    finally:
        memory.coefficients = original


def fold_fits() -> dict[str, dict]:
    """The fitted coefficients of every leave-one-architecture-out fold (key: the model left out) and of all rows
    ("all"): how far each coefficient moves when an architecture is not seen."""
    from benchmarks.fit_memory import fit

    rows = load_rows()
    fits = {"all": fit(rows)}
    for model in sorted({r["model"] for r in rows}):
        fits[model] = fit([r for r in rows if r["model"] != model])
    return fits


def held_out() -> list[dict]:
    """Leave one architecture out: for each calibration architecture, refit the coefficients on the other
    architectures' rows and predict its rows with that fit. Each row dict gains `held_out` (the model left out)."""
    from benchmarks.fit_memory import fit

    rows = load_rows()
    out = []
    for model in sorted({r["model"] for r in rows}):
        with coefficients_from(fit([r for r in rows if r["model"] != model])):
            for r in evaluate([r for r in rows if r["model"] == model]):
                out.append(dict(r, held_out=model))
    return out


def summary(rows: list[dict], key: str) -> tuple[float, float]:
    errs = [abs(r[key]) for r in rows]
    return statistics.median(errs), max(errs)


def worst_under(rows: list[dict]) -> str:
    """The most negative error (planned too low: the dangerous direction), with its row."""
    w = min(rows, key=lambda r: r["error"])
    return (f"{min(w['error'], 0.0):+.1%} ({w['recipe']} {w['model']} {w['method']} {w['batch']} x {w['seq']} "
            f"ckpt {'on' if w['grad_ckpt'] else 'off'})")


def main() -> None:
    ap = argparse.ArgumentParser(description="predicted vs measured peak memory on the calibration rows")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--held-out", action="store_true",
                    help="leave one architecture out: refit on the others, predict it (tables/memory.yaml untouched)")
    ap.add_argument("--show-fits", action="store_true",
                    help="with --held-out: each fold's fitted coefficients beside the fit on all rows")
    args = ap.parse_args()
    if args.show_fits and not args.held_out:
        ap.error("--show-fits goes with --held-out")
    if args.held_out:
        print_held_out(held_out(), args.markdown)
        if args.show_fits:
            print_fits(fold_fits())
        return
    rows = evaluate()
    if args.markdown:
        print("| recipe | model | method | batch x seq | ckpt | measured GiB | loraplan GiB | error | static table GiB | error | 2 B/param GiB | error |")
        print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['recipe']} | {r['model']} | {r['method']} | {r['batch']} x {r['seq']} | {'on' if r['grad_ckpt'] else 'off'} "
                  f"| {r['measured']:.2f} | {r['predicted']:.2f} | {r['error']:+.1%} | {r['static']:.1f} | {r['static_error']:+.0%} "
                  f"| {r['two_bytes']:.1f} | {r['two_bytes_error']:+.0%} |")
        print()
    else:
        print(f"{'recipe':8} {'model':14} {'method':6} {'batch x seq':>12} {'ckpt':>4} {'measured':>9} {'predicted':>9} {'error':>7} {'static':>7} {'2B/p':>7}")
        for r in rows:
            print(f"{r['recipe']:8} {r['model']:14} {r['method']:6} {r['batch']:>4} x {r['seq']:<6} {'on' if r['grad_ckpt'] else 'off':>4} "
                  f"{r['measured']:9.2f} {r['predicted']:9.2f} {r['error']:+7.1%} {r['static_error']:+7.0%} {r['two_bytes_error']:+7.0%}")
    for recipe in ("plain", "trl-sft"):
        sub = [r for r in rows if r["recipe"] == recipe]
        med, mx = summary(sub, "error")
        print(f"{recipe}: {len(sub)} rows, loraplan median |error| {med:.1%}, max {mx:.1%}, "
              f"worst under-prediction {worst_under(sub)}; static table median {summary(sub, 'static_error')[0]:.0%}; 2 B/param median {summary(sub, 'two_bytes_error')[0]:.0%}")
    med, mx = summary(rows, "error")
    print(f"static table: median |error| {summary(rows, 'static_error')[0]:.0%}, max {summary(rows, 'static_error')[1]:.0%}; "
          f"2 bytes/param: median {summary(rows, 'two_bytes_error')[0]:.0%}, max {summary(rows, 'two_bytes_error')[1]:.0%}")
    print(f"loraplan worst under-prediction: {worst_under(rows)}")
    print(f"loraplan on all {len(rows)} rows: median |error| {med:.1%}, max |error| {mx:.1%}")


def print_fits(fits: dict[str, dict]) -> None:
    """One line per fitted coefficient: its value on all rows, then with each architecture left out."""
    folds = [k for k in fits if k != "all"]
    print(f"{'coefficient':38} {'all rows':>12} " + " ".join(f"{'w/o ' + k:>18}" for k in folds))
    for name, value in fits["all"]["fitted"].items():
        print(f"{name:38} {value:12.4g} " + " ".join(f"{fits[k]['fitted'][name]:18.4g}" for k in folds))


def print_held_out(rows: list[dict], markdown: bool) -> None:
    if markdown:
        print("| held out | rows | median abs. error | worst row | its error |")
        print("|---|---:|---:|---|---:|")
    for model in sorted({r["held_out"] for r in rows}):
        sub = [r for r in rows if r["held_out"] == model]
        med, mx = summary(sub, "error")
        w = max(sub, key=lambda r: abs(r["error"]))
        where = f"{w['recipe']} {w['method']} {w['batch']} x {w['seq']} ckpt {'on' if w['grad_ckpt'] else 'off'}"
        if markdown:
            print(f"| {model} | {len(sub)} | {med:.1%} | {where} | {w['error']:+.1%} |")
        else:
            print(f"held out {model:14} {len(sub):3} rows: median |error| {med:.1%}, max {mx:.1%} ({where}: {w['error']:+.1%})")
    if markdown:
        print()
    for recipe in ("plain", "trl-sft"):
        sub = [r for r in rows if r["recipe"] == recipe]
        med, mx = summary(sub, "error")
        print(f"{recipe}: {len(sub)} rows, held-out median |error| {med:.1%}, max {mx:.1%}, "
              f"worst under-prediction {worst_under(sub)}")
    med, mx = summary(rows, "error")
    print(f"loraplan held out, worst under-prediction: {worst_under(rows)}")
    print(f"loraplan held out (each architecture predicted by a fit on the others) on all {len(rows)} rows: "
          f"median |error| {med:.1%}, max |error| {mx:.1%}")


if __name__ == "__main__":
    main()
