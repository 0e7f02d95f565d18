"""How a PlanResult reads in a notebook or a REPL: a one-line `repr`, and the report `loraplan plan` prints as
HTML (rich's export, inline styles) for Jupyter's `_repr_html_`."""

from __future__ import annotations


def short_repr(res) -> str:
    p, t = res.plan, res.plan.training
    verdict = "fits" if res.feasible else "does not fit"
    gpus = f"{p.hardware.world_size} x " if p.hardware.world_size > 1 else ""
    return (f"<PlanResult {p.model.name} on {gpus}{p.hardware.gpu_name}: {verdict}; {p.method}, {p.strategy}, "
            f"micro-batch {t.micro_batch_size} x {t.grad_accum_steps} accumulation, seq_len {t.seq_len:,}, "
            f"checkpointing {'on' if t.grad_checkpointing else 'off'}; {res.per_gpu_gib:.2f} GiB per GPU of "
            f"{res.usable_gib:.2f} GiB usable>")


def report_text(res, width: int = 110) -> str:
    """The plan report as plain text (what `loraplan plan` prints)."""
    return _render(res, width).export_text()


def report_html(res, width: int = 110) -> str:
    return _render(res, width).export_html(inline_styles=True)


def _render(res, width: int):
    import io

    from rich.console import Console

    from .report import render

    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False)
    render(res, console)
    return console
