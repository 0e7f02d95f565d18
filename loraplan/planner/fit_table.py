"""The same request on every card of the catalog: what `plan` would decide there (the "Across the catalog's
cards" table and `fit_table` in --json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from loraplan.tables import gpus

from .catalog import hardware_from_entry, host_memory_rule
from .context_length import longest_seq_len
from .estimate import estimate
from .placement import best_option
from .request import Resolved
from .strategies import STRATEGIES, strategy_for


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


def fit_table(r: Resolved) -> list[FitRow]:
    rows = []
    per_gpu = max(r.global_batch_size // r.hardware.world_size, 1)
    for key, entry in gpus().items():
        hw = hardware_from_entry(key, entry, r.hardware.num_gpus)
        hw.num_nodes, hw.network_gbs = r.hardware.num_nodes, r.hardware.network_gbs
        hw.host_memory_gib = (host_memory_rule(hw) if r.host_memory_assumed else r.hardware.host_memory_gib)
        on_card = dataclasses.replace(r, hardware=hw, strategy=strategy_for(hw), per_gpu_batch=per_gpu,
                                      dtype="bfloat16" if hw.bf16 else "float16")
        longest = None
        if r.seq_len_max:  # each card's own longest context
            longest = longest_seq_len(on_card) or 0
            on_card = dataclasses.replace(on_card, seq_len=longest or r.seq_len)
        best, options = best_option(on_card)
        ok = best.fits
        c = best.choice  # the fitting choice, or the closest (planner.placement.best_option)
        on_card = dataclasses.replace(on_card, strategy=STRATEGIES[best.strategy])
        rows.append(FitRow(
            gpu=key, name=entry["name"], memory_gib=hw.memory_gib, fits=ok,
            method=c.method if ok else None, micro_batch_size=c.micro_batch_size if ok else None,
            grad_checkpointing=c.grad_checkpointing if ok else None, per_gpu_gib=c.peak_gib,
            headroom_gib=hw.memory_gib - c.peak_gib,
            tokens_per_s=estimate(on_card, c).tokens_per_s if ok else None, strategy=best.strategy if ok else None,
            binds=None if ok else best.binds,
            savers=list(c.savers.names) if r.uses_savers and ok else None,
            host_gib=c.host_gib if r.uses_savers and ok else None, longest_seq_len=longest,
        ))
    return rows

