"""What each saver of a plan buys: the GPU memory it saves, the pinned host memory it takes and its slowdown,
each against the same plan without that saver (the report's "What each saver buys" table, `savers.effects` in
--json). The savers themselves are planner.plugins.savers; the choice among them is planner.decision.rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..plugins import savers
from .resolve import Resolved
from .rules import Choice, candidate, slowdown


@dataclass(frozen=True)
class SaverEffect:
    """One saver of the plan against the same plan without it (report: "what each saver buys")."""

    name: str
    gib_saved: float  # GPU memory this plan saves with it (negative: it spends memory, as layer_checkpointing)
    host_gib: float  # pinned host memory it takes
    slowdown: float  # time per token with it / without it (below 1: faster)
    speed_source: str
    applied_by: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def saver_effects(r: Resolved, c: Choice) -> list[SaverEffect]:
    out = []
    for name in c.savers.names:
        without = c.savers.without(name)
        other = candidate(r, c.method, c.micro_batch_size, c.grad_checkpointing, without)
        saver = savers.SAVERS[name]
        out.append(SaverEffect(name, other.peak_gib - c.peak_gib, c.host_gib - other.host_gib,
                               slowdown(r, c, without), saver.speed_source, saver.applied_by))
    return out
