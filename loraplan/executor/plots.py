"""The run's pictures, beside its metrics: loss.png (train loss per logged step from metrics.jsonl, and eval loss
where the run has an eval set) and, on a GPU, memory.png (the plan's predicted peak, stacked by term, against the
observed peak of each GPU). matplotlib is an optional extra (`pip install 'loraplan[plot]'`), imported here only
when a picture is drawn, with the Agg backend (no display); without it the run simply writes no picture.

Hook: runner.execute calls `write_run_plots(plan, summary)` after training, before summary.json is written.
"""

from __future__ import annotations

import os
from typing import Optional

from .disk import read_jsonl
from .run_files import LOSS_PLOT, MEMORY_PLOT

PLOT_EXTRA_HINT = "pip install 'loraplan[plot]'"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_run_plots(plan, summary) -> None:
    """Draw loss.png (and memory.png with a GPU's readings) into the run's folder; set the summary's paths."""
    if summary.output_dir is None or summary.metrics_file is None:
        return
    plt = pyplot()
    if plt is None:
        return

    rows = read_jsonl(summary.metrics_file)
    if any(r.get("kind") == "train" for r in rows):
        summary.loss_plot = plot_loss(rows, os.path.join(summary.output_dir, LOSS_PLOT), title=plan.model.name)
    if summary.observed_peak_gib_per_gpu:
        summary.memory_plot = plot_memory_check(plan.prediction.terms, summary.observed_peak_gib_per_gpu,
                                                plan.hardware.memory_gib, plan.prediction.margin,
                                                os.path.join(summary.output_dir, MEMORY_PLOT),
                                                title=f"{plan.model.name} on {plan.hardware.gpu_name}")


def plot_loss(rows: list[dict], path: str, title: str = "") -> Optional[str]:
    """Train loss per logged step (and eval loss, where logged) against the optimizer step."""
    plt = pyplot()
    if plt is None:
        return None
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("kind") == "eval" and r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        if train:
            ax.plot(*zip(*train), marker="o", markersize=3, linewidth=1.5, label="train loss")
        if evals:
            ax.plot(*zip(*evals), marker="s", markersize=5, linewidth=1.5, label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (cross-entropy, nats per token)")
        ax.set_title(f"Loss: {title}" if title else "Loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return os.path.abspath(path)


def plot_memory_check(terms: dict[str, float], observed: list[float], card_gib: float, margin: float, path: str,
                      title: str = "") -> Optional[str]:
    """The predicted peak, stacked by term, beside each GPU's observed peak, against the card and its usable line."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    try:
        bottom = 0.0
        colors = plt.get_cmap("tab20").colors
        for i, (name, gib) in enumerate(terms.items()):
            ax.bar(0, gib, bottom=bottom, color=colors[i % len(colors)], label=name.replace("_", " "), width=0.6)
            bottom += gib
        xs = list(range(1, len(observed) + 1))
        ax.bar(xs, observed, color="0.35", width=0.6, label="observed peak")
        for x, v in zip([0, *xs], [bottom, *observed]):  # each bar's total above it
            ax.text(x, v, f"{v:.2f} GiB", ha="center", va="bottom", fontsize=8)
        ax.axhline(card_gib, color="black", linewidth=1, label=f"card {card_gib:.1f} GiB")
        ax.axhline(card_gib * (1 - margin), color="red", linestyle="--", linewidth=1,
                   label=f"usable {card_gib * (1 - margin):.1f} GiB")
        ax.set_xticks([0, *xs], ["predicted", *[f"GPU {i}" for i in range(len(observed))]])
        ax.set_ylabel("peak memory per GPU (GiB)")
        ax.set_title(f"Predicted vs observed memory: {title}" if title else "Predicted vs observed memory")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(path, bbox_inches="tight")
    finally:
        plt.close(fig)
    return os.path.abspath(path)
