"""How a plan reads in a notebook or a REPL: `PlanView`, the PlanResult that `make_plan` returns, with a one-line
`repr`, the report `loraplan plan` prints as HTML (rich's export, inline styles) for Jupyter's `_repr_html_`, and
`.plot(path)` (`plan --plot`). PlanResult itself holds the facts and their JSON; the views live here, above the
report's tables, so that the facts never import what displays them."""

from __future__ import annotations

from dataclasses import dataclass

from .plot import plot_memory
from .result import PlanResult
from .tables import render


@dataclass(repr=False)
class PlanView(PlanResult):
    """A PlanResult that shows itself: what `loraplan.plan()` and `make_plan` return."""

    def __repr__(self) -> str:
        return short_repr(self)

    def _repr_html_(self) -> str:
        """A notebook shows the report `loraplan plan` prints."""
        return report_html(self)

    def plot(self, path: str) -> str:
        """`plan --plot PATH`: peak memory against sequence length (report/plot.py; needs matplotlib)."""
        return plot_memory(self, path)


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


    console = Console(record=True, width=width, file=io.StringIO(), force_terminal=False)
    render(res, console)
    return console
