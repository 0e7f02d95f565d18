"""The end-of-run report: predicted vs observed, speed, time, and where everything was saved."""

from __future__ import annotations

import os
from typing import Optional

from .summary import RunSummary


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} GiB"


def _memory_rows(s: RunSummary, table) -> None:
    if s.observed_peak_gib_per_gpu:
        for i, peak in enumerate(s.observed_peak_gib_per_gpu):
            label = "peak memory" + (f" (GPU {i})" if len(s.observed_peak_gib_per_gpu) > 1 else " (GPU)")
            table.add_row(label, _gib(s.predicted_peak_gib), _gib(peak))
    else:
        table.add_row("peak memory (per GPU)", _gib(s.predicted_peak_gib) if s.predicted_peak_gib else "-",
                      "- (no GPU)")
        table.add_row("peak process memory (CPU RSS)", "", _gib(s.cpu_rss_peak_gib))
    if s.host_peak_gib is not None:
        table.add_row("host memory (processes' RSS peak)", "", _gib(s.host_peak_gib))
    if s.predicted_host_pinned_gib or s.observed_host_pinned_gib:
        table.add_row("pinned host memory (savers)", _gib(s.predicted_host_pinned_gib), _gib(s.observed_host_pinned_gib))


def print_report(s: RunSummary, console) -> None:
    from rich.table import Table

    table = Table(title=f"loraplan run: {s.status}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("predicted", justify="right")
    table.add_column("observed", justify="right")
    _memory_rows(s, table)
    table.add_row("tokens/s", "-" if s.predicted_tokens_per_s is None else f"{s.predicted_tokens_per_s:,.0f}",
                  "-" if s.tokens_per_s is None else f"{s.tokens_per_s:,.0f}")
    table.add_row("steps", "", f"{s.steps} / {s.max_steps}"
                  + (f" (resumed at {s.resumed_from_step})" if s.resumed_from_step else ""))
    if s.first_loss is not None:
        table.add_row("loss (first -> last logged)", "", f"{s.first_loss:.4f} -> {s.final_loss:.4f}")
    if s.eval_loss is not None:
        table.add_row("eval loss", "", f"{s.eval_loss:.4f}")
    table.add_row("truncated sequences", "", f"{s.truncated_sequences} (dropped rows: {s.dropped_rows})")
    table.add_row("training time / wall time", "", f"{s.train_s or 0:.1f} s / {s.wall_s or 0:.1f} s")
    console.print(table)
    if s.over_prediction:
        console.print(
            f"[bold red]Observed peak {s.observed_peak_gib:.2f} GiB exceeds the predicted "
            f"{s.predicted_peak_gib:.2f} GiB by more than the plan's margin ({s.margin_gib:.2f} GiB): "
            f"the prediction was wrong for this run; leave more headroom or report it.[/bold red]"
        )
    saved = [("adapter", s.adapter_dir), ("last checkpoint", s.last_checkpoint), ("plan", s.plan_file),
             ("metrics", s.metrics_file), ("loss plot", s.loss_plot), ("memory plot", s.memory_plot),
             ("memory snapshot", s.memory_snapshot), ("summary", os.path.join(s.output_dir, "summary.json") if s.output_dir else None)]
    for label, path in saved:
        if path:
            console.print(f"{label:>16}: {path}")
