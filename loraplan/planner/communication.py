"""Time per optimizer step with communication: compute from the card's FLOP/s (planner.throughput.tokens_per_second),
collectives over the link between GPUs, and host-device copies under CPU offload.

Volumes per rank and optimizer step, for N ranks, `accum` micro-steps, weights W (as stored: NF4 under QLoRA) and
P trainable parameters (fp32 gradients), ring collectives moving (N-1)/N of the data:
- DDP: one all-reduce of the gradients per optimizer step (accelerate's `accumulate` skips the sync on the other
  micro-steps): 2 x 4P x (N-1)/N.
- FSDP (reshard after forward): every micro-step all-gathers the weights in the forward and again in the backward,
  and reduce-scatters the gradients: accum x (2 W + 4P) x (N-1)/N.
- FSDP with CPU offload, in addition: each micro-step copies the weight shards to the GPU for both gathers and the
  gradient shards back: accum x (2 W + 4P) / N over the card's host link (tables/gpus.yaml host_link_gbs).

Collectives overlap with compute (DDP's bucketed all-reduce, FSDP's prefetching), so a step takes
max(compute, collectives); offload copies are added on top (they sit on the critical path of each layer's gather).
The link is the slower of the GPU interconnect (tables/gpus.yaml interconnect_gbs) and, across nodes, the network's
share per GPU (--network, GB/s per node / GPUs per node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from . import memory as M
from .architecture import Architecture
from .loading import weights_bytes
from .plan import Hardware

GB = 1e9


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    collective_s: float
    offload_s: float
    link: str  # what the collectives run over, and at how many GB/s

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.collective_s) + self.offload_s


def link_gbs(hw: Hardware) -> tuple[Optional[float], str]:
    """(GB/s per GPU and direction the collectives move at, a description); None when the card's link is unknown."""
    intra = hw.interconnect_gbs
    if hw.num_nodes > 1 and hw.network_gbs:
        share = hw.network_gbs / hw.num_gpus
        if intra is None or share < intra:
            return share, f"network {hw.network_gbs * 8:,.0f} Gbit/s per node = {share:.1f} GB/s per GPU"
    if intra is None:
        return None, "unknown interconnect"
    return intra, f"GPU interconnect {intra:g} GB/s per GPU"


class Collectives(Protocol):
    """What a strategy moves (planner.strategies.Strategy's fields): its collective and whether it offloads."""

    collective: str  # "none" | "all-reduce" | "all-gather+reduce-scatter"
    offload_params: bool


def step_time(arch: Architecture, p: int, shape: M.Shape, hw: Hardware, strategy: Collectives, accum: int,
              tokens_per_s_compute: float) -> StepTime:
    """One optimizer step of one rank under `strategy` (an entry of planner.strategies.STRATEGIES)."""
    n = hw.world_size
    compute = accum * shape.tokens / tokens_per_s_compute
    if n == 1 or strategy.collective == "none":
        return StepTime(compute, 0.0, 0.0, "none (one process)")
    bw, link = link_gbs(hw)
    ring = (n - 1) / n
    w = weights_bytes(arch, shape)
    if strategy.collective == "all-reduce":  # the trainable gradients, fp32, reduce-scatter + all-gather
        volume = 2 * 4.0 * p * ring
    else:
        volume = accum * (2 * w + 4.0 * p) * ring
    collective = volume / (bw * GB) if bw else 0.0
    offload = 0.0
    if strategy.offload_params:
        host = hw.host_link_gbs or 0
        offload = accum * (2 * w + 4.0 * p) / n / (host * GB) if host else 0.0
    return StepTime(compute, collective, offload, link)
