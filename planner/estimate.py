"""Expected throughput and training time of a decision: tokens/s from the card's peak FLOP/s and the MFU measured
on the H200 calibration rows, and hours from the training tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from . import memory as M
from . import savers as S
from .decide import Choice, shape
from .request import Resolved

BASIS = "MFU measured on the H200 calibration rows x the card's peak bf16 FLOP/s"


@dataclass
class Estimate:
    tokens_per_s_per_gpu: Optional[float]  # None on the CPU or a card without a known peak
    tokens_per_s: Optional[float]  # over all GPUs
    flops_per_token: float
    mfu: float
    train_tokens: Optional[int]  # --train-tokens, or the dataset's tokens x epochs
    hours: Optional[float]
    basis: str = BASIS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate(r: Resolved, c: Choice, tokens_per_epoch: Optional[int] = None) -> Estimate:
    hw = r.hardware
    s = shape(r, c.method, c.micro_batch_size, c.grad_checkpointing, savers=c.savers)  # the savers' FLOPs and copies
    tps = S.tokens_per_second(r.arch, s, c.savers, hw.peak_bf16_tflops) if hw.gpu != "cpu" else None
    total_tps = tps * hw.num_gpus if tps else None
    tokens = r.train_tokens if r.train_tokens else (int(tokens_per_epoch * r.epochs) if tokens_per_epoch else None)
    have = bool(tokens and total_tps)
    return Estimate(
        tokens_per_s_per_gpu=tps, tokens_per_s=total_tps, flops_per_token=M.flops_per_token(r.arch, s),
        mfu=M.coefficients().throughput.mfu(c.method), train_tokens=tokens if have else None,
        hours=tokens / total_tps / 3600 if have else None,
    )
