"""How a plan spreads over devices: a plug-in table, one entry per strategy (in the style of peft's `dispatch_*`).

Each entry says when it is the default, how the global batch divides, how it turns the single-GPU memory terms into
one rank's (planner.memory.terms -> this rank), how `run` launches it and how the adapter is saved. Adding a strategy is
adding an entry here (and, when it launches differently, a launcher in the executor's table keyed by `launcher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..architecture.types import Architecture
from ..facts.hardware import Hardware
from ..memory import sharding
from ..memory.terms import MicroStep, Term, adapter_bytes_per_param, ddp_buckets_bytes

Budget = Callable[[Sequence[Term], Architecture, int, MicroStep, Hardware], list[Term]]


@dataclass(frozen=True)
class Strategy:
    """One way to spread a plan over devices. Every condition on a strategy lives in its entry: nothing outside this
    table compares strategy names."""

    name: str
    default_for: Callable[[Hardware], bool]  # the first entry whose test passes is the default for that hardware
    data_parallel: bool  # True: each of the world's processes takes global_batch / world sequences per step
    multi_node: bool  # can span nodes (hardware.num_nodes > 1)
    sharded: bool  # the model's weights are sharded over the ranks (FSDP)
    offload_params: bool  # the weight and adapter shards live in host memory between uses (FSDP's CPU offload)
    collective: str  # what a step moves between ranks: "none" | "all-reduce" | "all-gather+reduce-scatter"
    min_world_size: int  # fewer processes than this: the strategy cannot run (ddp and fsdp need 2)
    max_world_size: Optional[int]  # more processes than this: it cannot run (in-process strategies take 1)
    device: str  # "cpu": only on --gpu cpu; "any": on a GPU, or on the CPU with processes
    auto: bool  # tried by the decision across strategies (--strategy auto) when the world has several processes
    launcher: str  # "in-process" (this process trains) | "accelerate" (accelerate's launcher starts workers)
    saves: str  # who writes checkpoints and the adapter: the plan's strategy reason says it
    budget: Budget  # the single-GPU terms -> one rank's terms, given trainable params P
    describe: Callable[[Hardware], str]  # the reason shown in the plan

    def unusable_on(self, hw: Hardware) -> Optional[str]:
        """Why this strategy cannot run on the hardware, in one line; None when it can."""
        if self.device == "cpu" and hw.gpu != "cpu":
            return f"--strategy {self.name} is for --gpu cpu"
        if self.max_world_size is not None and hw.world_size > self.max_world_size:
            return f"--strategy {self.name} trains in one process; this plan has {hw.world_size} GPUs"
        if hw.world_size < self.min_world_size:
            return f"--strategy {self.name} needs --num-gpus {self.min_world_size} or more"
        if self.sharded and hw.gpu == "cpu" and hw.world_size == 1:  # FSDP's process group on the CPU: gloo, 2+ ranks
            return f"--strategy {self.name} on the CPU needs --num-gpus 2 or more (processes)"
        if hw.num_nodes > 1 and not self.multi_node:
            return f"--strategy {self.name} runs on one machine; this plan has {hw.num_nodes} nodes"
        return None

    def refuses(self, method: str, optimizer: str) -> Optional[str]:
        """Why the stack cannot run this method and optimizer under this strategy (a known break), or None."""
        return BROKEN.get((self.sharded, method, optimizer))
    def batch_ways(self, hw: Hardware) -> int:
        """How many processes the global batch divides over: the world under data parallelism, else one."""
        return hw.world_size if self.data_parallel else 1

    def per_gpu_batch(self, global_batch: int, hw: Hardware) -> int:
        """Sequences one process takes per optimizer step (planner.decision.resolve checks that the division is exact)."""
        return global_batch // self.batch_ways(hw)


def _as_is(terms, arch, p, shape, hw) -> list[Term]:
    return list(terms)


def _ddp(terms, arch, p, shape, hw) -> list[Term]:
    """DDP adds its gradient buckets (a second copy of the trainable gradients, in their dtype) after the adapter's terms."""
    out = []
    for t in terms:
        out.append(t)
        if t.name == "optimizer_states":
            a = adapter_bytes_per_param(shape)  # the buckets hold the gradients in their dtype
            out.append(Term("ddp_buckets", ddp_buckets_bytes(p, hw.world_size, a), f"{a:g} B x P", "adapter"))
    return out


def _fsdp(terms, arch, p, shape, hw) -> list[Term]:
    return sharding.fsdp_terms(terms, arch, p, shape, hw.world_size, offload=False)


def _fsdp_offload(terms, arch, p, shape, hw) -> list[Term]:
    return sharding.fsdp_terms(terms, arch, p, shape, hw.world_size, offload=True)


def _where(hw: Hardware) -> str:
    if hw.gpu == "cpu":
        return f"{hw.world_size} processes"
    return f"{hw.num_gpus} GPUs" if hw.num_nodes == 1 else f"{hw.num_nodes} nodes x {hw.num_gpus} GPUs"


_RANK0_SAVES = "rank 0, after the gradients' all-reduce"
_SHARDS_SAVE = "every rank its shard (sharded checkpoints); the adapter gathered whole by rank 0"

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("cpu", lambda hw: hw.gpu == "cpu" and hw.world_size == 1, data_parallel=False, multi_node=False,
             sharded=False, offload_params=False, collective="none", min_world_size=1, max_world_size=1,
             device="cpu", auto=False, launcher="in-process", saves="this process", budget=_as_is,
             describe=lambda hw: "no GPU: trains on the CPU (for small models and tests)"),
    Strategy("single", lambda hw: hw.world_size == 1, data_parallel=False, multi_node=False, sharded=False,
             offload_params=False, collective="none", min_world_size=1, max_world_size=1, device="any", auto=False,
             launcher="in-process", saves="this process", budget=_as_is,
             describe=lambda hw: "one GPU, in-process"),
    Strategy("ddp", lambda hw: hw.world_size > 1, data_parallel=True, multi_node=True, sharded=False,
             offload_params=False, collective="all-reduce", min_world_size=2, max_world_size=None, device="any",
             auto=True, launcher="accelerate", saves=_RANK0_SAVES, budget=_ddp,
             describe=lambda hw: f"data-parallel over {_where(hw)} through accelerate's launcher: each holds a whole "
                                 "copy of the model"),
    Strategy("fsdp", lambda hw: False, data_parallel=True, multi_node=True, sharded=True, offload_params=False,
             collective="all-gather+reduce-scatter", min_world_size=1, max_world_size=None, device="any", auto=True,
             launcher="accelerate", saves=_SHARDS_SAVE, budget=_fsdp,
             describe=lambda hw: f"fully sharded (torch FSDP2 through accelerate) over {_where(hw)}: each rank holds "
                                 f"1/{hw.world_size} of the weights and adapter states, and gathers two layers at a "
                                 "time"),
    Strategy("fsdp-offload", lambda hw: False, data_parallel=True, multi_node=True, sharded=True, offload_params=True,
             collective="all-gather+reduce-scatter", min_world_size=1, max_world_size=None, device="any", auto=True,
             launcher="accelerate", saves=_SHARDS_SAVE, budget=_fsdp_offload,
             describe=lambda hw: f"fully sharded with CPU offload over {_where(hw)}: the weight and adapter shards "
                                 "live in host memory and are copied in layer by layer"),
)}


def strategy_for(hw: Hardware) -> Strategy:
    """The default strategy for this hardware: the first entry of the table whose `default_for` passes. Sharded
    strategies are chosen by the decision (planner.decision.placement) when a replica does not fit, or asked for."""
    for s in STRATEGIES.values():
        if s.default_for(hw):
            return s
    raise ValueError(f"no strategy applies to {hw.world_size} x {hw.gpu}")  # unreachable: ddp takes world > 1


# What --strategy accepts: auto (the decision picks), or one entry of the table.
STRATEGY_CHOICES: tuple[str, ...] = ("auto", *STRATEGIES)

# Combinations the stack is known to break, refused with the source that says so: (sharded?, method, optimizer).
# `plan` does not choose them and `run` refuses a hand-edited plan with them (executor/fsdp.py).
# bitsandbytes' optimizers under FSDP2. Measured here (bitsandbytes 0.50.2, torch 2.13, CPU, LoRA and QLoRA alike):
# the first optimizer step fails with "NotImplementedError: Operator bitsandbytes.optimizer_update_32bit.default
# does not have a sharding strategy registered" (bitsandbytes' kernels take plain tensors, FSDP2's parameters are
# DTensors; bitsandbytes/optim has no DTensor handling). Beyond that, peft's FSDP docs (Caveats 4): "When using
# FSDP+QLoRA, paged_adamw_8bit currently results in an error when saving a checkpoint", and bitsandbytes #1732 (an
# assertion saving 8-bit AdamW state under FSDP2).
_BNB_UNDER_FSDP = ("bitsandbytes' 8-bit optimizers cannot update FSDP2's sharded (DTensor) parameters (seen on "
                   "bitsandbytes 0.50: 'optimizer_update_32bit ... does not have a sharding strategy registered'); "
                   "use --optimizer adamw: FSDP shards its states over the ranks already")
BROKEN = {
    (True, "qlora", "paged-adamw-8bit"):
        "FSDP + QLoRA + paged 8-bit AdamW fails when saving a checkpoint (peft's FSDP + QLoRA guide), and "
        + _BNB_UNDER_FSDP,
    (True, "lora", "paged-adamw-8bit"): _BNB_UNDER_FSDP,
    (True, "lora", "adamw-8bit"): _BNB_UNDER_FSDP,
    (True, "qlora", "adamw-8bit"): _BNB_UNDER_FSDP,
}


def auto_candidates() -> list[Strategy]:
    """What --strategy auto tries over several processes, in the table's order (ties go to the earlier entry)."""
    return [s for s in STRATEGIES.values() if s.auto]


def sharded_strategies() -> list[Strategy]:
    return [s for s in STRATEGIES.values() if s.sharded]
