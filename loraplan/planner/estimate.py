"""Expected throughput and training time of a decision: tokens/s from the card's peak FLOP/s and the MFU measured
on the H200 calibration rows, slowed where communication does not hide behind compute (planner.communication),
and hours from the training tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from . import memory as M
from . import savers as S
from . import throughput as TP
from .communication import step_time
from .decide import Choice, shape
from .request import Resolved
from .targets import trainable_params

BASIS = "MFU measured on the H200 calibration rows x the card's peak {dtype} FLOP/s"


@dataclass
class Estimate:
    tokens_per_s_per_gpu: Optional[float]  # None on the CPU or a card without a known peak
    tokens_per_s: Optional[float]  # over all GPUs
    flops_per_token: float
    mfu: float
    train_tokens: Optional[int]  # --train-tokens, or the dataset's tokens x epochs
    hours: Optional[float]
    basis: str = BASIS.format(dtype="bf16")
    compute_s_per_step: Optional[float] = None  # one optimizer step of one rank
    collective_s_per_step: Optional[float] = None  # all-reduce / all-gather / reduce-scatter, overlapped with compute
    offload_s_per_step: Optional[float] = None  # host <-> GPU copies under CPU offload, chained with the gathers
    exposed_s_per_step: Optional[float] = None  # the communication compute does not hide (planner.communication)
    link: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate(r: Resolved, c: Choice, tokens_per_epoch: Optional[int] = None) -> Estimate:
    hw = r.hardware
    s = shape(r, c.method, c.micro_batch_size, c.grad_checkpointing, savers=c.savers)  # the savers' FLOPs and copies
    compute_tps = S.tokens_per_second(r.arch, s, c.savers, hw.peak_bf16_tflops) if hw.gpu != "cpu" else None
    tps = st = None
    if compute_tps:
        accum = max(r.per_gpu_batch // c.micro_batch_size, 1)
        st = step_time(r.arch, trainable_params(r.selection, r.rank), s, hw, r.strategy, accum, compute_tps)
        tps = compute_tps * st.compute_s / st.step_s
    total_tps = tps * hw.world_size if tps else None
    tokens = r.train_tokens if r.train_tokens else (int(tokens_per_epoch * r.epochs) if tokens_per_epoch else None)
    have = bool(tokens and total_tps)
    return Estimate(
        tokens_per_s_per_gpu=tps, tokens_per_s=total_tps, flops_per_token=TP.flops_per_token(r.arch, s),
        mfu=M.coefficients().throughput.mfu(c.method), train_tokens=tokens if have else None,
        hours=tokens / total_tps / 3600 if have else None,
        compute_s_per_step=st.compute_s if st else None, collective_s_per_step=st.collective_s if st else None,
        offload_s_per_step=st.offload_s if st else None,
        exposed_s_per_step=st.exposed_s if st else None, link=st.link if st else None,
        basis=BASIS.format(dtype="fp16" if r.dtype == "float16" else "bf16"),
    )
