"""The same request on every card of the catalog: what `plan` would decide there (the "Across the catalog's
cards" table and `fit_table` in --json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .catalog import gpus, hardware_from_entry
from .decide import choose
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def fit_table(r: Resolved) -> list[FitRow]:
    rows = []
    per_gpu = max(r.global_batch_size // r.hardware.num_gpus, 1)
    for key, entry in gpus().items():
        hw = hardware_from_entry(key, entry, r.hardware.num_gpus)
        on_card = dataclasses.replace(r, hardware=hw, strategy=strategy_for(hw), per_gpu_batch=per_gpu,
                                      dtype="bfloat16" if hw.bf16 else "float16")
        choice, smallest = choose(on_card)
        c = choice or smallest
        rows.append(FitRow(
            gpu=key, name=entry["name"], memory_gib=hw.memory_gib, fits=choice is not None,
            method=c.method if choice else None, micro_batch_size=c.micro_batch_size if choice else None,
            grad_checkpointing=c.grad_checkpointing if choice else None, per_gpu_gib=c.peak_gib,
            headroom_gib=hw.memory_gib - c.peak_gib,
            tokens_per_s=estimate(on_card, c).tokens_per_s if choice else None,
        ))
    return rows
