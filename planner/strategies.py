"""How a plan spreads over devices: a plug-in table, one entry per strategy (in the style of peft's `dispatch_*`).

Each entry says when it applies, how the global batch divides, which memory terms it adds to each GPU's budget,
how `run` launches it and how the adapter is saved. Adding a strategy is adding an entry here (and, when it
launches differently, a launcher in `executor/runner.py`'s table keyed by `launcher`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .memory import Shape, Term, ddp_buckets_bytes
from .plan import Hardware


@dataclass(frozen=True)
class Strategy:
    name: str
    applies: Callable[[Hardware], bool]  # the first entry whose test passes is the default for that hardware
    data_parallel: bool  # True: each of num_gpus processes takes global_batch / num_gpus sequences per step
    launcher: str  # "in-process" (this process trains) | "accelerate" (accelerate's launcher starts workers)
    saves: str  # who writes checkpoints and the adapter
    memory_terms: Callable[[int, Shape], list[Term]]  # extra per-GPU terms, given trainable params P
    describe: Callable[[Hardware], str]  # the reason shown in the plan


def _no_terms(p: int, shape: Shape) -> list[Term]:
    return []


def _ddp_terms(p: int, shape: Shape) -> list[Term]:
    return [Term("ddp_buckets", ddp_buckets_bytes(p, shape.num_gpus), "4 B x P", "adapter")]


def _ddp_reason(hw: Hardware) -> str:
    where = "processes" if hw.gpu == "cpu" else "GPUs"
    return (f"data-parallel over {hw.num_gpus} {where} through accelerate's launcher: each holds a whole copy of "
            "the model")


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("cpu", lambda hw: hw.gpu == "cpu" and hw.num_gpus == 1, False, "in-process", "this process",
             _no_terms, lambda hw: "no GPU: trains on the CPU (for small models and tests)"),
    Strategy("single", lambda hw: hw.num_gpus == 1, False, "in-process", "this process",
             _no_terms, lambda hw: "one GPU, in-process"),
    Strategy("ddp", lambda hw: hw.num_gpus > 1, True, "accelerate", "rank 0, after the gradients' all-reduce",
             _ddp_terms, _ddp_reason),
)}


def strategy_for(hw: Hardware) -> Strategy:
    """The strategy a plan on this hardware uses: the first entry of the table that applies."""
    for s in STRATEGIES.values():
        if s.applies(hw):
            return s
    raise ValueError(f"no strategy applies to {hw.num_gpus} x {hw.gpu}")  # unreachable: ddp takes num_gpus > 1
