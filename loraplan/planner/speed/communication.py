"""Time per optimizer step with communication: compute from the card's FLOP/s (planner.speed.throughput.tokens_per_second),
collectives over the link between GPUs, and host-device copies under CPU offload.

Volumes per rank and optimizer step, for N ranks, `accum` micro-steps, weights W (as stored: NF4 under QLoRA) and
P trainable parameters, ring collectives moving (N-1)/N of the data:
- DDP: one all-reduce of the gradients per optimizer step (accelerate's `accumulate` skips the sync on the other
  micro-steps), in the gradients' dtype, a = the adapters' bytes per parameter (4 for peft's fp32, 2 where trl
  casts a 4-bit model's adapters to bf16; planner.memory.terms.adapter_bytes_per_param): 2 x a P x (N-1)/N.
- FSDP (reshard after forward): every micro-step all-gathers each unit's parameters in the forward and again in
  the backward (the frozen weights as stored, the adapters cast to FSDP2's param dtype) and reduce-scatters the
  gradients in its reduce dtype, g bytes per adapter parameter (planner.memory.sharding.gradient_bytes_per_param:
  the training dtype on a GPU): accum x (2 (W + g P) + g P) x (N-1)/N.
- FSDP with CPU offload, in addition: each micro-step copies the shards, as stored (the adapters in their own
  dtype), to the GPU for both gathers and the gradient shards back: accum x (2 (W + a P) + a P) / N over the
  card's host link (tables/gpus.yaml host_link_gbs).

What overlaps with compute (tables/communication.yaml, each with its source in torch's and accelerate's code):
- DDP: the all-reduce runs on the last micro-step only, bucket by bucket during its backward, so only that
  backward (backward_share x compute / accum) can hide it; the rest is exposed.
- FSDP: each layer's all-gather is prefetched one layer ahead, so the first layer of each pass (1/L of the traffic)
  is exposed, and the rest hides behind compute as far as compute lasts. Under CPU offload each shard's host copy
  is made just before its all-gather (FSDP2's all_gather_inputs), on the same x16 link on PCIe cards: copies and
  collectives add up, and only their sum overlaps.
A step takes compute + the exposed time.
The link is the slower of the GPU interconnect (tables/gpus.yaml interconnect_gbs) and, across nodes, the network's
share per GPU (--network, GB/s per node / GPUs per node).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

from loraplan.tables import load_table

from ..architecture.types import Architecture
from ..facts.hardware import Hardware
from ..memory import terms as memory
from ..memory.loading import weights_bytes
from ..memory.sharding import gradient_bytes_per_param

GB = 1e9


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    collective_s: float
    offload_s: float
    link: str  # what the collectives run over, and at how many GB/s
    exposed_s: float = 0.0  # the communication that does not hide behind compute
    moved_bytes: float = 0.0  # per rank and step over the links: collectives plus host copies

    @property
    def step_s(self) -> float:
        return self.compute_s + self.exposed_s


def overlap(name: str):
    """An entry of tables/communication.yaml (its value)."""
    return load_table("communication.yaml")[name]["value"]


def _exposed(arch: Architecture, strategy: "Collectives", compute: float, collective: float, offload: float,
             accum: int) -> float:
    """Seconds of communication per step that compute does not hide (the rules in the module docstring)."""
    if strategy.collective == "all-reduce":
        window = overlap("backward_share") * compute / accum  # the last micro-step's backward
        return max(0.0, collective - window) + offload
    chain = collective + offload  # host copy, then the all-gather, per layer (offload_copy_in_chain)
    first = chain * overlap("fsdp_prefetch_layers") / max(arch.num_layers, 1)  # nothing to prefetch behind
    return first + max(0.0, chain - first - compute)


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
    """What a strategy moves (planner.plugins.strategies.Strategy's fields): its collective and whether it offloads."""

    collective: str  # "none" | "all-reduce" | "all-gather+reduce-scatter"
    offload_params: bool


def step_bytes(arch: Architecture, p: int, shape: memory.MicroStep, hw: Hardware, strategy: Collectives,
               accum: int) -> tuple[float, float]:
    """(collective bytes, host-copy bytes) one rank moves per optimizer step under `strategy` (the volumes above)."""
    n = hw.world_size
    if n == 1 or strategy.collective == "none":
        return 0.0, 0.0
    ring = (n - 1) / n
    w = weights_bytes(arch, shape)
    a = memory.adapter_bytes_per_param(shape)
    if strategy.collective == "all-reduce":  # the trainable gradients, in their dtype: reduce-scatter + all-gather
        volume = 2 * a * p * ring
    else:
        g = gradient_bytes_per_param(shape)
        volume = accum * (2 * (w + g * p) + g * p) * ring
    return volume, (accum * (2 * (w + a * p) + a * p) / n if strategy.offload_params else 0.0)


def step_time(arch: Architecture, p: int, shape: memory.MicroStep, hw: Hardware, strategy: Collectives, accum: int,
              tokens_per_s_compute: float) -> StepTime:
    """One optimizer step of one rank under `strategy` (an entry of planner.plugins.strategies.STRATEGIES)."""
    compute = accum * shape.tokens / tokens_per_s_compute
    if hw.world_size == 1 or strategy.collective == "none":
        return StepTime(compute, 0.0, 0.0, "none (one process)")
    bw, link = link_gbs(hw)
    volume, offload_bytes = step_bytes(arch, p, shape, hw, strategy, accum)
    collective = volume / (bw * GB) if bw else 0.0
    host = hw.host_link_gbs or 0
    offload = offload_bytes / (host * GB) if host else 0.0
    return StepTime(compute, collective, offload, link, _exposed(arch, strategy, compute, collective, offload, accum),
                    volume + offload_bytes)
