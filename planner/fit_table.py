"""The same request on every card of the catalog: what `plan` would decide there (the "Across the catalog's
cards" table and `fit_table` in --json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .catalog import gpus, hardware_from_entry
from .decide import choose, longest_seq_len
from .estimate import estimate
from .request import Resolved
from .strategies import strategy_for


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
    per_gpu = max(r.global_batch_size // r.hardware.num_gpus, 1)
    for key, entry in gpus().items():
        hw = hardware_from_entry(key, entry, r.hardware.num_gpus)
        on_card = dataclasses.replace(r, hardware=hw, strategy=strategy_for(hw), per_gpu_batch=per_gpu,
                                      dtype="bfloat16" if hw.bf16 else "float16")
        longest = None
        if r.seq_len_max:  # each card's own longest context
            longest = longest_seq_len(on_card) or 0
            on_card = dataclasses.replace(on_card, seq_len=longest or r.seq_len)
        choice, smallest = choose(on_card)
        c = choice or smallest
        rows.append(FitRow(
            gpu=key, name=entry["name"], memory_gib=hw.memory_gib, fits=choice is not None,
            method=c.method if choice else None, micro_batch_size=c.micro_batch_size if choice else None,
            grad_checkpointing=c.grad_checkpointing if choice else None, per_gpu_gib=c.peak_gib,
            headroom_gib=hw.memory_gib - c.peak_gib,
            tokens_per_s=estimate(on_card, c).tokens_per_s if choice else None,
            savers=list(c.savers.names) if r.uses_savers and choice else None,
            host_gib=c.host_gib if r.uses_savers and choice else None, longest_seq_len=longest,
        ))
    return rows
