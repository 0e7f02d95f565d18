"""The end-of-run report: predicted vs observed, speed, time, and where everything was saved."""

from __future__ import annotations

from typing import Optional


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f} GiB"


def print_report(summary: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"loraplan run: {summary['status']}", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("predicted", justify="right")
    table.add_column("observed", justify="right")
    per_gpu = summary.get("observed_peak_gib_per_gpu")
    if per_gpu:
        for i, peak in enumerate(per_gpu):
            label = "peak memory" + (f" (GPU {i})" if len(per_gpu) > 1 else " (GPU)")
            table.add_row(label, _gib(summary["predicted_peak_gib"]), _gib(peak))
    else:
        predicted = summary["predicted_peak_gib"]
        table.add_row("peak memory (per GPU)", _gib(predicted) if predicted else "-", "- (no GPU)")
        table.add_row("peak process memory (CPU RSS)", "", _gib(summary.get("cpu_rss_peak_gib")))
    if summary.get("host_peak_gib") is not None:
        table.add_row("host memory (processes' RSS peak)", "", _gib(summary["host_peak_gib"]))
    if summary.get("predicted_host_pinned_gib") or summary.get("observed_host_pinned_gib"):
        table.add_row("pinned host memory (savers)", _gib(summary.get("predicted_host_pinned_gib")),
                      _gib(summary.get("observed_host_pinned_gib")))
    pred_tps = summary.get("predicted_tokens_per_s")
    tps = summary.get("tokens_per_s")
    table.add_row("tokens/s", "-" if pred_tps is None else f"{pred_tps:,.0f}", "-" if tps is None else f"{tps:,.0f}")
    table.add_row("steps", "", f"{summary['steps']} / {summary['max_steps']}"
                  + (f" (resumed at {summary['resumed_from_step']})" if summary.get("resumed_from_step") else ""))
    if summary.get("first_loss") is not None:
        table.add_row("loss (first -> last logged)", "", f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    if summary.get("eval_loss") is not None:
        table.add_row("eval loss", "", f"{summary['eval_loss']:.4f}")
    table.add_row("truncated sequences", "", f"{summary['truncated_sequences']} (dropped rows: {summary['dropped_rows']})")
    table.add_row("training time / wall time", "", f"{summary['train_s']:.1f} s / {summary['wall_s']:.1f} s")
    console.print(table)
    if summary.get("over_prediction"):
        console.print(
            f"[bold red]Observed peak {summary['observed_peak_gib']:.2f} GiB exceeds the predicted "
            f"{summary['predicted_peak_gib']:.2f} GiB by more than the plan's margin ({summary['margin_gib']:.2f} GiB): "
            f"the prediction was wrong for this run; leave more headroom or report it.[/bold red]"
        )
    saved = [("adapter", summary.get("adapter_dir")), ("last checkpoint", summary.get("last_checkpoint")),
             ("plan", summary.get("plan_file")), ("metrics", summary.get("metrics_file")),
             ("summary", summary["output_dir"] + "/summary.json")]
    for label, path in saved:
        if path:
            console.print(f"{label:>16}: {path}")
