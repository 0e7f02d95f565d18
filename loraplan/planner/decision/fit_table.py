"""The same request on every card of the catalog: what `plan` would decide there (the "Across the catalog's
cards" table and `fit_table` in --json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from loraplan.tables import gpus

from ..facts.request import PlanRequest
from ..plugins.strategies import STRATEGIES
from .context_length import at_planned_length
from .estimate import estimate
from .placement import best_option
from .resolve import Resolved, resolve


@dataclass
class FitRow:
    gpu: str  # catalog key
    name: str
    memory_gib: float
    fits: bool
    method: Optional[str]  # None when nothing fits
    micro_batch_size: Optional[int]
    grad_checkpointing: Optional[bool]
    per_gpu_gib: float  # the choice's peak, or the smallest configuration's when nothing fits
    headroom_gib: float  # memory_gib - per_gpu_gib (negative: over the card; fitting also keeps the safety margin)
    tokens_per_s: Optional[float]
    strategy: Optional[str] = None  # the strategy that fits there (None when nothing does)
    binds: Optional[str] = None  # when nothing fits: "training", "loading" or "host memory" (of the closest)
    # only when the request involves savers / asks --seq-len max (left out of to_dict otherwise)
    savers: Optional[list[str]] = None  # the savers the choice uses
    host_gib: Optional[float] = None  # their pinned host memory
    longest_seq_len: Optional[int] = None  # --seq-len max: the longest context on this card (0: none fits)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("savers", "host_gib", "longest_seq_len"):
            if d[key] is None:
                del d[key]
        return d


def on_card(req: PlanRequest, key: str) -> PlanRequest:
    """The same request with catalog card `key` in place of the card asked for (`--gpu key`). `--strategy cpu`
    names the CPU's own strategy, not a choice a GPU could make: on a card it is the card's default (auto)."""
    return dataclasses.replace(req, gpu=key, gpu_memory=None, fit_table=False,
                               strategy="auto" if req.strategy == "cpu" else req.strategy)


def fit_table(req: PlanRequest, asked: Resolved) -> list[FitRow]:
    """One row per catalog card, each what `plan --gpu <card>` decides: the request resolved on that card (its own
    host memory, dtype, strategy and batch split: planner.decision.resolve.resolve), at its planned length
    (planner.decision.context_length.at_planned_length), under the strategy the decision picks (planner.decision.placement.best_option,
    the choice planner.decision.placement.place makes), with the estimate's tokens/s. `asked`: the request resolved on the
    card asked for, whose model and dataset statistics are reused."""
    rows = []
    for key, entry in gpus().items():
        r, longest = at_planned_length(resolve(on_card(req, key), known=asked), recount=False)
        best, _ = best_option(r)
        ok, c = best.fits, best.choice  # the fitting choice, or the closest (planner.decision.placement.best_option)
        r = dataclasses.replace(r, strategy=STRATEGIES[best.strategy])
        hw = r.hardware
        rows.append(FitRow(
            gpu=key, name=entry["name"], memory_gib=hw.memory_gib, fits=ok,
            method=c.method if ok else None, micro_batch_size=c.micro_batch_size if ok else None,
            grad_checkpointing=c.grad_checkpointing if ok else None, per_gpu_gib=c.peak_gib,
            headroom_gib=hw.memory_gib - c.peak_gib,
            tokens_per_s=estimate(r, c).tokens_per_s if ok else None, strategy=best.strategy if ok else None,
            binds=None if ok else best.binds,
            savers=list(c.savers.names) if r.uses_savers and ok else None,
            host_gib=c.host_gib if r.uses_savers and ok else None,
            longest_seq_len=(longest or 0) if r.seq_len_max else None,
        ))
    return rows
