"""The memory model's coefficients (tables/memory.yaml), typed: derived, fitted, measured, throughput, decision.

A missing or unknown key fails when the table is first read, not in the middle of a plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import yaml

from loraplan.tables import TABLES_DIR


@dataclass(frozen=True)
class Derived:
    """Bytes per token per layer per unit of width, derived from the modeling code (not fitted)."""

    norm_bytes_per_hidden: float
    attention_bytes_per_hidden: float
    attention_bytes_per_kv: float
    mlp_bytes_per_intermediate: float
    lora_copy_bytes_per_input: float
    lora_dropout_bytes_per_input: float
    lora_bytes_per_rank: float
    fused_loss_bytes_per_token_hidden: float
    fused_loss_tile_tokens: int
    fused_loss_tile_vocab: int
    softcap_bytes_per_logit: float
    eager_attention_bytes_per_score: float


@dataclass(frozen=True)
class Fitted:
    """Fitted on the H200 calibration rows by benchmarks/fit_memory.py."""

    misc_bytes: float
    activation_scale: float
    fused_activation_scale: float
    recompute_scale: float
    checkpoint_extra_bytes: float
    full_loss_bytes_per_logit: float
    full_loss_tied_extra_bytes_per_logit: float
    reserve_share_of_loss: float
    reserve_share_of_activations: float


@dataclass(frozen=True)
class Measured:
    cuda_context_gib: float
    card: str
    loaded_weights_max_error_gib: float


@dataclass(frozen=True)
class Throughput:
    mfu_lora: float
    mfu_qlora: float
    lora_speedup_over_qlora: float
    pairs: int
    source: str

    def mfu(self, method: str) -> float:
        return {"lora": self.mfu_lora, "qlora": self.mfu_qlora}[method]


@dataclass(frozen=True)
class Decision:
    safety_margin: float  # the share of the card's memory a plan keeps free


@dataclass(frozen=True)
class Coefficients:
    """tables/memory.yaml, typed: a missing or unknown key fails when the table is read, not mid-plan."""

    derived: Derived
    fitted: Fitted
    measured: Measured
    throughput: Throughput
    decision: Decision

    @classmethod
    def from_dict(cls, data: dict) -> "Coefficients":
        import typing

        hints = typing.get_type_hints(cls)
        return cls(**{name: hints[name](**data[name]) for name in hints})


@functools.lru_cache(maxsize=1)
def coefficients() -> Coefficients:
    with open(TABLES_DIR / "memory.yaml", encoding="utf-8") as f:
        return Coefficients.from_dict(yaml.safe_load(f))
