"""How a plan spreads over devices: a plug-in table, one entry per strategy (in the style of peft's `dispatch_*`).

Each entry says when it is the default, how the global batch divides, how it turns the single-GPU memory terms into
one rank's (planner.memory -> this rank), how `run` launches it and how the adapter is saved. Adding a strategy is
adding an entry here (and, when it launches differently, a launcher in `executor/runner.py`'s table keyed by
`launcher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from . import sharding
from .architecture import Architecture
from .memory import Shape, Term, ddp_buckets_bytes
from .plan import Hardware

Budget = Callable[[Sequence[Term], Architecture, int, Shape, Hardware], list[Term]]


@dataclass(frozen=True)
class Strategy:
    name: str
    default_for: Callable[[Hardware], bool]  # the first entry whose test passes is the default for that hardware
    data_parallel: bool  # True: each of the world's processes takes global_batch / world sequences per step
    multi_node: bool  # can span nodes (hardware.num_nodes > 1)
    sharded: bool  # the model's weights are sharded over the ranks (FSDP)
    launcher: str  # "in-process" (this process trains) | "accelerate" (accelerate's launcher starts workers)
    saves: str  # who writes checkpoints and the adapter
    budget: Budget  # the single-GPU terms -> one rank's terms, given trainable params P
    describe: Callable[[Hardware], str]  # the reason shown in the plan

    def batch_ways(self, hw: Hardware) -> int:
        """How many processes the global batch divides over: the world under data parallelism, else one."""
        return hw.world_size if self.data_parallel else 1

    def per_gpu_batch(self, global_batch: int, hw: Hardware) -> int:
        """Sequences one process takes per optimizer step (planner.request checks that the division is exact)."""
        return global_batch // self.batch_ways(hw)


def _as_is(terms, arch, p, shape, hw) -> list[Term]:
    return list(terms)


def _ddp(terms, arch, p, shape, hw) -> list[Term]:
    """DDP adds its gradient buckets (a second fp32 copy of the trainable gradients) after the adapter's terms."""
    out = []
    for t in terms:
        out.append(t)
        if t.name == "optimizer_states":
            out.append(Term("ddp_buckets", ddp_buckets_bytes(p, hw.world_size), "4 B x P", "adapter"))
    return out


def _fsdp(terms, arch, p, shape, hw) -> list[Term]:
    return sharding.fsdp_terms(terms, arch, p, shape, hw.world_size, offload=False)


def _fsdp_offload(terms, arch, p, shape, hw) -> list[Term]:
    return sharding.fsdp_terms(terms, arch, p, shape, hw.world_size, offload=True)


def _where(hw: Hardware) -> str:
    if hw.gpu == "cpu":
        return f"{hw.world_size} processes"
    return f"{hw.num_gpus} GPUs" if hw.num_nodes == 1 else f"{hw.num_nodes} nodes x {hw.num_gpus} GPUs"


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("cpu", lambda hw: hw.gpu == "cpu" and hw.world_size == 1, False, False, False, "in-process",
             "this process", _as_is, lambda hw: "no GPU: trains on the CPU (for small models and tests)"),
    Strategy("single", lambda hw: hw.world_size == 1, False, False, False, "in-process", "this process",
             _as_is, lambda hw: "one GPU, in-process"),
    Strategy("ddp", lambda hw: hw.world_size > 1, True, True, False, "accelerate",
             "rank 0, after the gradients' all-reduce", _ddp,
             lambda hw: f"data-parallel over {_where(hw)} through accelerate's launcher: each holds a whole copy of "
                        "the model"),
    Strategy("fsdp", lambda hw: False, True, True, True, "accelerate",
             "every rank its shard (sharded checkpoints); the adapter gathered whole by rank 0", _fsdp,
             lambda hw: f"fully sharded (torch FSDP2 through accelerate) over {_where(hw)}: each rank holds 1/"
                        f"{hw.world_size} of the weights and adapter states, and gathers two layers at a time"),
    Strategy("fsdp-offload", lambda hw: False, True, True, True, "accelerate",
             "every rank its shard (sharded checkpoints); the adapter gathered whole by rank 0", _fsdp_offload,
             lambda hw: f"fully sharded with CPU offload over {_where(hw)}: the weight and adapter shards live in "
                        "host memory and are copied in layer by layer"),
)}


def strategy_for(hw: Hardware) -> Strategy:
    """The default strategy for this hardware: the first entry of the table whose `default_for` passes. Sharded
    strategies are chosen by the decision (planner.placement) when a replica does not fit, or asked for."""
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


def broken_combination(strategy: Strategy, method: str, optimizer: str) -> Optional[str]:
    """Why the stack cannot run this combination, or None."""
    return BROKEN.get((strategy.sharded, method, optimizer))
