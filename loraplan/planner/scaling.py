"""More GPUs that are slower: when the plan's topology trains fewer tokens/s than one node (or one GPU) of the same
cards, say so, with what one node gives and what would help. Every figure comes from the same decision
(planner.placement.place) and the same estimate (planner.estimate.estimate) as the plan's own."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .catalog import parse_network_gbs
from .estimate import Estimate, estimate
from .placement import place
from .plan import Hardware
from .request import Resolved
from .strategies import STRATEGIES, strategy_for

FASTER_NETWORK = "ib-ndr-8x"  # tables/networks.yaml: the fastest fabric there, quoted as what a faster one gives


def _tokens_per_s(r: Resolved, hw: Hardware) -> Optional[tuple[float, str]]:
    """(tokens/s, strategy) of the same request on `hw`, decided and estimated as the plan is; None if it does not fit
    or the global batch does not divide."""
    strategy = r.strategy if r.strategy_choice != "auto" and not r.strategy.unusable_on(hw) else strategy_for(hw)
    ways = hw.world_size if strategy.data_parallel else 1
    if r.global_batch_size % ways:
        return None
    rs = dataclasses.replace(r, hardware=hw, strategy=strategy, per_gpu_batch=r.global_batch_size // ways)
    d = place(rs)
    if not d.feasible:
        return None
    rs = dataclasses.replace(rs, strategy=STRATEGIES[d.strategy])
    est = estimate(rs, d.choice)
    return (est.tokens_per_s, d.strategy) if est.tokens_per_s else None


def fewer_is_faster(r: Resolved, est: Estimate) -> list[str]:
    """A warning when one node (for several nodes) or one GPU (for several on one node) is estimated faster."""
    hw = r.hardware
    if hw.gpu == "cpu" or not est.tokens_per_s or hw.world_size == 1:
        return []
    if hw.num_nodes > 1:
        smaller, label = dataclasses.replace(hw, num_nodes=1), f"one node ({hw.num_gpus} x {hw.gpu_name})"
    else:
        smaller, label = dataclasses.replace(hw, num_gpus=1), f"one {hw.gpu_name}"
    one = _tokens_per_s(r, smaller)
    if one is None or one[0] <= est.tokens_per_s:
        return []
    where = f"{hw.num_nodes} nodes x {hw.num_gpus}" if hw.num_nodes > 1 else f"{hw.num_gpus} GPUs"
    s = r.strategy
    helps = []
    if s.collective == "all-reduce":
        helps.append("a larger global batch (--global-batch-size): the all-reduce runs once per optimizer step")
    else:
        helps.append("a larger micro-batch where memory allows: the sharded weights are gathered on every micro-step, "
                     "so a larger global batch does not amortize them")
    if hw.num_nodes > 1:
        fast_gbs = parse_network_gbs(FASTER_NETWORK)[0]
        if not hw.network_gbs or hw.network_gbs < fast_gbs:
            faster = _tokens_per_s(r, dataclasses.replace(hw, network_gbs=fast_gbs))
            helps.append(f"a faster network (--network {FASTER_NETWORK}"
                         + (f": {faster[0]:,.0f} tokens/s" if faster else "") + ")")
        if s.sharded:
            helps.append("sharding only within a node and replicating across nodes (HSDP; loraplan does not plan "
                         "it yet)")
    helps.append(f"training on {label}")
    return [f"{where} give {est.tokens_per_s:,.0f} tokens/s ({s.name}), fewer than {one[0]:,.0f} on {label} "
            f"({one[1]}): communication ({est.link}) outweighs the added compute. What would help: "
            + "; ".join(helps)]
