"""Which strategy, and so where the model and its states live: the decision across strategies (`place`), and the
decision for one strategy (`decide`: planner.decision.rules's rules and reasons, planner.decision.suggest's advice when nothing fits).

For one process the strategy is fixed (single, or cpu) and this is `decide`'s decision. With several GPUs and
`--strategy auto`, each data-parallel strategy is tried in turn (ddp, fsdp, fsdp-offload); for each, the method,
checkpointing and micro-batch follow planner.decision.rules's rules, and the plan must also load (planner.memory.loading: the GPU
at load time, and the host memory of rank 0's node) and fit the host memory it offloads to. Of the strategies that
fit, the fastest by the estimate with communication (planner.speed.communication) wins: DDP when a replica fits, since it
gathers nothing per layer; FSDP when only shards fit; offload when only the host can hold the shards.
Combinations the stack is known to break are not tried, with their reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..architecture.targets import trainable_params
from ..facts.hardware import DEFAULT_NETWORK, parse_network_gbs
from ..memory import terms as memory
from ..memory.loading import LoadPeak, load_peak
from ..plugins.backends import BACKENDS
from ..plugins.strategies import STRATEGIES, Strategy, auto_candidates, sharded_strategies
from ..speed.communication import overlap, step_bytes
from . import rules, suggest
from .estimate import rate
from .resolve import Resolved


@dataclass(frozen=True)
class StrategyOption:
    strategy: str
    fits: bool
    choice: rules.Choice  # what fits, or the smallest configuration tried
    load: LoadPeak
    host_gib: float  # host memory needed on the busiest node (rank 0's): offloaded shards + the load's copy
    tokens_per_s: Optional[float]  # over all GPUs, with communication; None when unknown (CPU, custom card)
    why_not: Optional[str]  # when it does not fit: what binds
    binds: Optional[str] = None  # when it does not fit: "training", "loading", "host memory" or "combination"
    moved_gb: Optional[float] = None  # per rank and optimizer step over the links: collectives plus host copies

    def moved(self) -> float:
        return self.moved_gb if self.moved_gb is not None else float("inf")

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "fits": self.fits, "method": self.choice.method,
                "micro_batch_size": self.choice.micro_batch_size, "grad_checkpointing": self.choice.grad_checkpointing,
                "per_gpu_gib": self.choice.peak_gib, "load_gpu_gib": self.load.gpu_gib, "host_gib": self.host_gib,
                "loading": self.load.mode, "tokens_per_s": self.tokens_per_s, "why_not": self.why_not,
                "binds": self.binds, "moved_gb_per_step": self.moved_gb}


def _runtime_gib(terms) -> float:
    return sum(t.bytes for t in terms if t.group == "runtime" and t.name != "allocator_reserve") / 2**30


def _load(r: Resolved, c: rules.Choice) -> LoadPeak:
    s = rules.shape(r, c.method, c.micro_batch_size, c.grad_checkpointing)
    return load_peak(r.arch, s, r.strategy.sharded, r.strategy.offload_params, r.hardware.world_size,
                     _runtime_gib(c.terms), r.hardware.num_gpus, trainable_params(r.selection, r.rank))


def host_needed_gib(r: Resolved, c: rules.Choice, load: LoadPeak) -> float:
    """Rank 0's node: its ranks' host-resident terms, plus the copy the load holds there."""
    return memory.Term.host_gib(c.terms) * r.hardware.num_gpus + load.host_gib


def tokens_per_s(r: Resolved, c: rules.Choice) -> Optional[float]:
    """Over all GPUs: the estimate's figure (planner.decision.estimate.rate, savers and communication included)."""
    tps, _ = rate(r, c)
    return tps * r.hardware.world_size if tps else None


def moved_gb(r: Resolved, c: rules.Choice) -> float:
    """GB one rank moves per optimizer step over the links (planner.speed.communication.step_bytes)."""
    s = rules.shape(r, c.method, c.micro_batch_size, c.grad_checkpointing)
    volume, copies = step_bytes(r.arch, trainable_params(r.selection, r.rank), s, r.hardware, r.strategy,
                                max(r.per_gpu_batch // c.micro_batch_size, 1))
    return (volume + copies) / 1e9


def tie_band() -> float:
    """Estimates this close to the fastest are a tie (tables/communication.yaml strategy_tie_band)."""
    return float(overlap("strategy_tie_band"))


def evaluate(r: Resolved, strategy: Strategy) -> StrategyOption:
    """The first method (LoRA before QLoRA, as planner.decision.rules) whose training, loading and host memory all fit."""
    rs = dataclasses.replace(r, strategy=strategy)
    host_usable = (rs.hardware.host_memory_gib or 0) * (1 - memory.coefficients().decision.safety_margin)
    smallest: Optional[tuple[rules.Choice, Resolved]] = None
    trained: Optional[tuple[rules.Choice, Resolved, LoadPeak, float, str]] = None  # training fits, loading/host do not
    reasons = []
    for method in rules.methods_to_try(rs):
        rm = dataclasses.replace(rs, method=method)
        choice, small = rules.choose(rm)
        if smallest is None or small.peak_gib < smallest[0].peak_gib:
            smallest = (small, rm)
        broken = strategy.refuses(method, r.optimizer)
        if broken:
            reasons.append(f"{method}: {broken}")
            continue
        if choice is None:
            reasons.append(f"{method}: training needs {small.peak_gib:.1f} GiB per GPU, over the "
                           f"{rs.usable_gib:.1f} GiB usable")
            continue
        load = _load(rm, choice)
        host = host_needed_gib(rm, choice, load)
        if load.gpu_gib > rs.usable_gib:
            reasons.append(f"{method}: loading, not training, binds: {load.note}, {load.gpu_gib:.1f} GiB per GPU over "
                           f"the {rs.usable_gib:.1f} GiB usable (training itself needs {choice.peak_gib:.1f})")
            trained = trained or (choice, rm, load, host, "loading")
        elif host > host_usable:
            reasons.append(f"{method}: host memory binds: {host:.0f} GiB needed on rank 0's node, "
                           f"{host_usable:.0f} GiB usable of {rs.hardware.host_memory_gib:.0f} (--host-memory)")
            trained = trained or (choice, rm, load, host, "host memory")
        else:
            return StrategyOption(strategy.name, True, choice, load, host, tokens_per_s(rm, choice), None,
                                  moved_gb=moved_gb(rm, choice))
    if trained:  # the closest: its training fits, and what binds is said
        choice, rm, load, host, binds = trained
        return StrategyOption(strategy.name, False, choice, load, host, None, "; ".join(reasons), binds)
    assert smallest is not None
    small, rm = smallest
    load = _load(rm, small)
    binds = "training" if any("training needs" in x for x in reasons) else "combination"
    return StrategyOption(strategy.name, False, small, load, host_needed_gib(rm, small, load), None,
                          "; ".join(reasons), binds)


def strategies_to_try(r: Resolved) -> list[Strategy]:
    if r.strategy_choice != "auto" or r.hardware.world_size == 1 or r.hardware.gpu == "cpu":
        return [r.strategy]
    backend = BACKENDS[r.backend]  # a strategy the training backend refuses (Unsloth: FSDP) is not tried
    return [s for s in auto_candidates() if not backend.refuses(s.name, "lora", frozenset())] or [r.strategy]


def _strategy_reason(r: Resolved, best: StrategyOption, options: list[StrategyOption]) -> str:
    chosen = STRATEGIES[best.strategy]
    text = f"{chosen.describe(r.hardware)}; checkpoints and the adapter: {chosen.saves}"
    if r.strategy_choice != "auto":
        return f"{text} (--strategy {r.strategy_choice})"
    others = [o for o in options if o is not best]
    if not others:
        return text
    fitting = [o for o in options if o.fits]
    if best.fits and len(fitting) > 1 and all(o.tokens_per_s for o in fitting):
        speeds = ", ".join(f"{o.strategy} {o.tokens_per_s:,.0f} tokens/s, {o.moved():,.1f} GB/step" for o in fitting)
        fastest = max(fitting, key=lambda o: o.tokens_per_s)
        if fastest is not best:  # within the error band of the fastest, and it moves less
            return (f"{text}; within the {tie_band():.0%} error band of {fastest.strategy}'s estimate, and it moves "
                    f"less over the links ({speeds}; tables/communication.yaml)")
        return f"{text}; the fastest that fits ({speeds})"
    missed = [f"{o.strategy} does not fit ({o.why_not})" for o in others if not o.fits]
    return text + ("; " + "; ".join(missed) if missed else "")


def best_option(r: Resolved) -> tuple[StrategyOption, list[StrategyOption]]:
    """(the fastest strategy that fits, or the first tried when none does; every strategy tried)."""
    options = [evaluate(r, s) for s in strategies_to_try(r)]
    fitting = [o for o in options if o.fits]
    if fitting:  # the fastest; within the estimates' error band of it, the one that moves least over the links
        fastest = max(fitting, key=lambda o: o.tokens_per_s or 0.0)
        if fastest.tokens_per_s is None:
            return fastest, options
        ties = [o for o in fitting if (o.tokens_per_s or 0.0) >= fastest.tokens_per_s * (1 - tie_band())]
        return min(ties, key=lambda o: (o.moved(), -(o.tokens_per_s or 0.0))), options
    # none fits: the closest, an option whose training fits before one whose does not, then the smallest peak
    return min(options, key=lambda o: (o.binds == "training", o.choice.peak_gib)), options


def decide(r: Resolved) -> rules.Decision:
    """The decision for resolved inputs `r` under their one strategy, r.strategy (a pure function: same inputs,
    same decision): planner.decision.rules's rules and reasons, and planner.decision.suggest's advice when nothing fits."""
    choice, smallest = rules.choose(r)
    c = choice or smallest
    feasible = choice is not None
    return rules.Decision(c, feasible, rules.reasons(r, c, feasible), [] if feasible else suggest.suggestions(r, smallest),
                      strategy=r.strategy.name)


def place(r: Resolved) -> rules.Decision:
    """The decision over strategies (a pure function of `r`)."""
    best, options = best_option(r)
    rb = dataclasses.replace(r, strategy=STRATEGIES[best.strategy])
    if best.fits:
        reasons = rules.reasons(rb, best.choice, True)
        suggestions: list[str] = []
    else:
        single = decide(rb)
        reasons, suggestions = single.reasons, list(single.suggestions)
        if single.feasible:  # training fits; loading, the host or a broken combination does not
            reasons["method"] = best.why_not or ""
            suggestions = _beyond_training(rb, best)
        suggestions += more_gpus(r)
    reasons["strategy"] = _strategy_reason(r, best, options)
    if STRATEGIES[best.strategy].sharded:
        reasons["loading"] = (f"{best.load.note}: {best.load.gpu_gib:.1f} GiB per GPU at load"
                              + (f", {best.load.host_gib:.0f} GiB of host memory on rank 0's node"
                                 if best.load.host_gib else "")
                              + (f"; the run needs {best.host_gib:.0f} GiB of host memory on that node (the "
                                 f"offloaded shards of its ranks + what loading holds there)"
                                 if best.host_gib > best.load.host_gib + 0.5 else ""))
    return rules.Decision(best.choice, best.fits, reasons, suggestions, best.strategy, options, best.load)


def _beyond_training(r: Resolved, best: StrategyOption) -> list[str]:
    """What would help when training fits and loading or the host does not: relaxing the training shape would
    not, so say what binds and what would hold the load (a card whose usable memory holds the load peak; more host
    memory)."""
    out = [best.why_not or ""]
    margin = memory.coefficients().decision.safety_margin
    if best.load.gpu_gib > r.usable_gib:
        need = max(best.load.gpu_gib, best.choice.peak_gib)
        cards = suggest.larger_cards(r, need)
        if cards:
            out.append(f"a card that holds the {need:.1f} GiB load: " + ", ".join(cards))
        if best.choice.method == "qlora" and r.method == "auto":
            out.append("LoRA, whose bf16 weights load sharded (cpu_ram_efficient_loading): --method lora")
    elif best.host_gib > (r.hardware.host_memory_gib or 0) * (1 - margin):
        out.append(f"a host with at least {best.host_gib / (1 - margin):,.0f} GiB of RAM per node: --host-memory")
    return out


def more_gpus(r: Resolved) -> list[str]:
    """The smallest sharded topology that fits the same request: more GPUs per node (up to 8), then nodes of 8."""
    hw = r.hardware
    if hw.gpu == "cpu":
        return []
    shapes = [(g, 1) for g in (2, 4, 8) if g > hw.world_size] + [(8, n) for n in (2, 4, 8, 16) if 8 * n > hw.world_size]
    for gpus, nodes in shapes:
        network = hw.network_gbs or (parse_network_gbs(DEFAULT_NETWORK)[0] if nodes > 1 else None)
        big = dataclasses.replace(hw, num_gpus=gpus, num_nodes=nodes, network_gbs=network)
        for strategy in sharded_strategies():
            per_gpu = max(strategy.per_gpu_batch(r.global_batch_size, big), 1)  # the global batch rounded to the world
            rb = dataclasses.replace(r, hardware=big, per_gpu_batch=per_gpu,
                                     global_batch_size=per_gpu * strategy.batch_ways(big))
            o = evaluate(rb, strategy)
            if o.fits:
                name = strategy.name
                flags = f"--num-gpus {gpus}" + (f" --num-nodes {nodes}" if nodes > 1 else "")
                return [f"sharded over {nodes} x {gpus} GPUs ({name}) it fits at {o.choice.peak_gib:.1f} GiB per GPU "
                        f"({o.choice.method}): {flags}"]
    return []
