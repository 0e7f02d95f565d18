"""The same request under each training backend (planner/plugins/backends.py), side by side: the planned peak, the
longest context (`--seq-len max`), the expected tokens/s and what each needs installed. It answers "should I use
Unsloth on this card?", and is shown only where it helps: a plan on one GPU.

The speed of a backend with a published speed-up (tables/backends.yaml) is the standard estimate times that
factor: the backend's own claim, not a measurement of loraplan's, and labelled so wherever it is shown.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import InputError
from ..facts.request import SEQ_LEN_MAX, PlanRequest
from ..plugins.backends import BACKENDS
from ..plugins.strategies import STRATEGIES
from .context_length import at_planned_length, longest_seq_len
from .estimate import estimate
from .placement import place
from .resolve import Resolved, resolve

ESTIMATE = "loraplan's estimate"


@dataclass(frozen=True)
class BackendRow:
    backend: str
    needs: str  # what it needs installed
    refused: Optional[str] = None  # why this request cannot be planned under it (one line), else None
    peak_gib: Optional[float] = None  # at the request's length (or its longest, under --seq-len max)
    feasible: Optional[bool] = None
    seq_len: Optional[int] = None  # the length the peak is for
    longest_context: Optional[int] = None  # --seq-len max under this backend; None when not even 256 fits
    tokens_per_s: Optional[float] = None
    speedup: Optional[float] = None  # the published factor applied to the standard estimate, when there is one
    speed_basis: str = ESTIMATE
    speed_source: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def shows_backends(r: Resolved) -> bool:
    """The side-by-side helps where a backend choice is a card's question: a plan on one GPU."""
    return r.hardware.gpu != "cpu" and r.hardware.world_size == 1


def _row(req: PlanRequest, asked: Resolved, name: str) -> BackendRow:
    b = BACKENDS[name]
    base = dict(backend=name, needs=b.needs)
    try:
        r, _ = at_planned_length(resolve(dataclasses.replace(req, backend=name, fit_table=False), known=asked))
        longest_r = resolve(dataclasses.replace(req, backend=name, fit_table=False, seq_len=SEQ_LEN_MAX), known=asked)
    except InputError as exc:
        return BackendRow(refused=str(exc), **base)
    d = place(r)
    r = dataclasses.replace(r, strategy=STRATEGIES[d.strategy])
    est = estimate(r, d.choice, None)
    tps = est.tokens_per_s
    factor = b.published.get("speedup")
    if tps is not None and factor:
        tps *= float(factor)
    return BackendRow(
        peak_gib=d.choice.peak_gib, feasible=d.feasible, seq_len=r.seq_len, longest_context=longest_seq_len(longest_r),
        tokens_per_s=tps, speedup=float(factor) if factor else None,
        speed_basis=b.published.get("speedup_label", ESTIMATE) if factor else ESTIMATE,
        speed_source=b.published.get("speedup_source"), **base)


def compare_backends(req: PlanRequest, asked: Resolved) -> list[BackendRow]:
    """One row per backend of the table for the same request, in the table's order; [] where it does not help."""
    if not shows_backends(asked):
        return []
    return [_row(req, asked, name) for name in BACKENDS]
