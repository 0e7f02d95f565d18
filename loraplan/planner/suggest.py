"""What would make an infeasible request fit (rule 5 of planner.decide): each relaxation of a constraint the user
set that costs memory (the method, checkpointing, the micro-batch, the optimizer, the savers), with the memory it
saves, listed only when it helps, alone or together with the others listed; else a shorter sequence; and the
larger cards that would hold it. When the card holds the plan and only the savers' pinned host memory is short,
the host's shortfall and the RAM that would do instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from . import memory as M
from . import savers as S
from loraplan.tables import gpus
from .decide import Choice, candidate, checkpointing_to_try, host_bound, methods_to_try, micro_batches_to_try
from .request import Resolved

# A relaxation that saves less than this is not worth a line of advice.
MIN_SAVING_GIB = 0.05


def smallest_peak_gib(r: Resolved) -> float:
    """The least memory any configuration the request allows needs (QLoRA if allowed, checkpointing if allowed,
    the savers if allowed, the smallest micro-batch)."""
    mb = micro_batches_to_try(r)[0]
    sets = S.candidate_sets(r.savers, r.arch, r.hardware) if r.uses_savers else [S.NONE]
    return min(candidate(r, m, mb, gc, sset).peak_gib for sset in sets for m in methods_to_try(r)
               for gc in checkpointing_to_try(r, sset))


def _relaxations(r: Resolved) -> list[tuple[str, Resolved]]:
    """(advice, the request with that one constraint lifted), for each constraint the user set that costs memory."""
    out = []
    if r.method == "lora":
        out.append(("QLoRA: --method auto (or qlora)", dataclasses.replace(r, method="auto")))
    if r.grad_checkpointing == "off":
        out.append(("gradient checkpointing: --grad-checkpointing auto", dataclasses.replace(r, grad_checkpointing="auto")))
    if r.batch_size and r.batch_size > 1:
        out.append(("a smaller micro-batch: drop --batch-size", dataclasses.replace(r, batch_size=None)))
    if r.optimizer == "adamw":
        out.append(("an 8-bit optimizer: --optimizer adamw-8bit", dataclasses.replace(r, optimizer="adamw-8bit")))
    auto = {n: ("auto" if m == "off" and not S.SAVERS[n].applies(r.arch, r.hardware) else m)
            for n, m in r.savers.items()}
    if auto != r.savers and len(S.candidate_sets(auto, r.arch, r.hardware)) > 1:
        names = ", ".join(S.cli_name(n) for n in auto if auto[n] != r.savers[n] and S.SAVERS[n].chosen_automatically)
        out.append((f"memory savers ({names}): --savers auto", dataclasses.replace(r, savers=auto)))
    return out


RELAXABLE = ("method", "grad_checkpointing", "batch_size", "optimizer", "savers")


def _relaxed_by(r: Resolved, advices) -> Resolved:
    """The request with the named relaxations of `_relaxations` lifted together."""
    changed = {}
    for advice, relaxed in _relaxations(r):
        if advice in advices:
            changed.update({n: getattr(relaxed, n) for n in RELAXABLE if getattr(relaxed, n) != getattr(r, n)})
    return dataclasses.replace(r, **changed)


def _all_relaxed(r: Resolved) -> Resolved:
    return _relaxed_by(r, [advice for advice, _ in _relaxations(r)])


def _needed(r: Resolved, advices: list[str]) -> list[str]:
    """Drop, one at a time, each relaxation the others fit without: what is left is needed."""
    kept = list(advices)
    for advice in reversed(advices):
        rest = [a for a in kept if a != advice]
        if rest and smallest_peak_gib(_relaxed_by(r, rest)) <= r.usable_gib:
            kept = rest
    return kept


def _longest_halved_seq(r: Resolved) -> Optional[tuple[int, float]]:
    """(the longest of seq_len / 2, / 4, ... down to 128 that fits, its peak GiB), or None."""
    seq = r.seq_len
    while seq > 128:
        seq //= 2
        peak = smallest_peak_gib(dataclasses.replace(r, seq_len=seq))
        if peak <= r.usable_gib:
            return seq, peak
    return None


def _host_suggestions(r: Resolved, c: Choice) -> list[str]:
    share = S.host_pinned_share()
    return [
        f"the smallest configuration ({c.method}, micro-batch {c.micro_batch_size}, {c.savers.describe()}) fits the "
        f"card ({c.peak_gib:.1f} of {r.usable_gib:.1f} GiB) but pins {c.host_gib:.1f} GiB of host memory; "
        f"{r.host_note} allows {r.usable_host_gib:.1f} GiB ({share:.0%} of it): "
        f"{c.host_gib - r.usable_host_gib:.1f} GiB short",
        f"a host with at least {math.ceil(c.host_gib / share)} GiB of RAM: --host-memory names the machine that runs it",
        "a shorter sequence: the pinned blocks halve at each power of two below "
        f"{r.seq_len:,} tokens (--seq-len max finds the longest that fits)",
    ]


def suggestions(r: Resolved, smallest: Choice) -> list[str]:
    """What would make an infeasible request fit, each line with what it saves; only relaxations that help:
    alone, or together with the other relaxations listed."""
    if host_bound(r, smallest):
        return _host_suggestions(r, smallest)
    usable = r.usable_gib
    need = smallest.peak_gib
    out = [f"the smallest configuration ({smallest.method}, micro-batch {smallest.micro_batch_size}, checkpointing "
           f"{'on' if smallest.grad_checkpointing else 'off'}) needs {need:.1f} GiB per GPU; {r.hardware.gpu_name} "
           f"allows {usable:.1f} GiB: {need - usable:.1f} GiB short"]
    lines = []
    for advice, relaxed in _relaxations(r):
        peak = smallest_peak_gib(relaxed)
        if need - peak >= MIN_SAVING_GIB:
            lines.append((advice, need - peak, peak <= usable))
    together = _all_relaxed(r)
    together_peak = smallest_peak_gib(together)
    alone = [line for line in lines if line[2]]
    if alone:  # each of these is enough by itself
        for advice, saved, _ in alone:
            out.append(f"{advice} saves {saved:.1f} GiB and fits")
    elif together_peak <= usable:  # none is enough alone; together they are: list the ones needed
        needed = _needed(r, [advice for advice, _, _ in lines])
        for advice, saved, _ in lines:
            if advice in needed:
                out.append(f"{advice} saves {saved:.1f} GiB")
        out.append(f"together these fit: {smallest_peak_gib(_relaxed_by(r, needed)):.1f} GiB per GPU")
    else:
        shorter = _longest_halved_seq(r)
        relaxed = _longest_halved_seq(together) if together_peak < need - MIN_SAVING_GIB else None
        if shorter:
            out.append(f"a shorter sequence fits: --seq-len {shorter[0]} ({shorter[1]:.1f} GiB)")
        if relaxed and (shorter is None or relaxed[0] > shorter[0]):
            flags = "; ".join(advice for advice, _, _ in lines)
            out.append(f"with {flags}: --seq-len {relaxed[0]} fits ({relaxed[1]:.1f} GiB)")
    out.append(_larger_cards(r, need))
    return out


def _larger_cards(r: Resolved, need_gib: float) -> str:
    margin = M.coefficients().decision.safety_margin
    bigger = sorted((e["memory_gib"], k) for k, e in gpus().items()
                    if e["memory_gib"] * (1 - margin) >= need_gib and e["memory_gib"] > r.hardware.memory_gib)
    if bigger:
        return "a larger card: " + ", ".join(k for _, k in bigger[:4])
    return ("no single card in the catalog holds a replica: data-parallel training copies the model to every GPU, "
            "so only sharding it (FSDP) over more GPUs helps")
