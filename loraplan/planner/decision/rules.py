"""The decision rules, as pure functions of the resolved inputs: the configurations a request allows, their memory,
which one fits (method, gradient checkpointing, micro-batch, memory savers), and the reasons for each setting.

Rules, in the order they apply:
1. LoRA before QLoRA when the method is `auto`: LoRA trains faster (no 4-bit dequantization).
2. Gradient checkpointing only when needed: it costs about a third more compute.
3. The largest micro-batch (a power of two dividing the per-GPU batch) whose predicted peak stays under the card's
   memory less the safety margin; memory grows with the micro-batch, so the search stops at the first that fails.
4. Memory savers (planner/plugins/savers.py), a separate step, only where the request allows them (`--savers`, or
   `--seq-len max`): when nothing fits by rules 1-3, the fastest configuration that fits with savers, the
   candidates ordered by their expected time per token (checkpointing's recompute, the offloads' copies over the
   host link, the tiled MLP's extra forward), its pinned host memory within the host's share; when full
   checkpointing fits and layer_checkpointing is allowed, the fewest checkpointed layers that still fit.
   Savers forced on (`--savers NAME=on`) are part of every configuration of rules 1-3.
5. Nothing fits: the smallest configuration tried is reported, with the relaxations that would make it fit, each
   with the memory it saves, listed only when it helps (alone, or together with the others listed):
   planner.decision.suggest.

The modules built on these rules: planner.decision.placement (`decide` for one strategy, `place` across strategies),
planner.decision.suggest (what would fit), planner.decision.context_length (`--seq-len max`: `longest_seq_len`, by `fits_at`),
planner.decision.saver_effects (what each saver of a plan buys, by `slowdown`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..architecture.targets import trainable_params
from ..facts import options as option_table
from ..facts import versions
from ..memory import terms as memory
from ..plugins import savers as saver_table
from ..plugins.backends import BACKENDS, DEFAULT_BACKEND
from .resolve import Resolved

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Choice:
    method: str
    grad_checkpointing: bool
    micro_batch_size: int
    terms: tuple[memory.Term, ...]
    savers: saver_table.SaverSet = saver_table.NONE
    host_terms: tuple[memory.Term, ...] = ()  # pinned host memory the savers take (all processes on the host)

    @property
    def peak_gib(self) -> float:
        return memory.Term.sum_gib(self.terms)

    @property
    def host_gib(self) -> float:
        return sum(t.bytes for t in self.host_terms) / GIB


@dataclass
class Decision:
    choice: Choice  # what the plan uses: the choice that fits, or the smallest tried when none does
    feasible: bool
    reasons: dict[str, str]
    suggestions: list[str]  # empty when feasible
    strategy: str = "single"  # the strategy the choice is for (planner.decision.placement may shard)
    options: list = field(default_factory=list)  # planner.decision.placement.StrategyOption per strategy tried
    load: Optional[object] = None  # planner.memory.loading.LoadPeak of the choice


def shape(r: Resolved, method: str, micro_batch: int, grad_checkpointing: bool, seq_len: Optional[int] = None,
          optimizer: Optional[str] = None, savers: saver_table.SaverSet = saver_table.NONE) -> memory.MicroStep:
    hw = r.hardware
    base = memory.MicroStep(method=method, rank=r.rank, micro_batch_size=micro_batch, seq_len=seq_len or r.seq_len,
                   grad_checkpointing=grad_checkpointing, loss=r.loss, optimizer=optimizer or r.optimizer,
                   dtype=r.dtype, double_quant=bool(option_table.default("double_quantization")),
                   blocksize=int(option_table.default("quant_blocksize")),
                   device="cpu" if hw.gpu == "cpu" else "cuda",
                   targets=tuple(p.peft_name for p in r.selection.projections), lora_dropout=r.dropout > 0,
                   adapter_dtype=versions.adapter_dtype(method, r.dtype))
    return saver_table.apply(base, r.arch, savers)


def budget(r: Resolved, s: memory.MicroStep, savers: saver_table.SaverSet = saver_table.NONE) -> list[memory.Term]:
    """The per-GPU terms of shape `s` under the plan's strategy (and the savers whose effects `s` carries)."""
    p = trainable_params(r.selection, r.rank)
    terms = r.strategy.budget(memory.budget(r.arch, r.selection, s, saver_terms=saver_table.gpu_terms(r.arch, s, savers)),
                              r.arch, p, s, r.hardware)
    # the training backend's own terms (planner/plugins/backends.py: identity for hf, Unsloth's for unsloth)
    return BACKENDS[r.backend].adjust_terms(terms, r.arch, s, r.dropout, r.hardware.memory_gib * GIB)


def candidate(r: Resolved, method: str, micro_batch: int, grad_checkpointing: bool,
              savers: saver_table.SaverSet = saver_table.NONE) -> Choice:
    """One configuration with its GPU terms and the pinned host memory its savers take."""
    s = shape(r, method, micro_batch, grad_checkpointing, savers=savers)
    return Choice(method, grad_checkpointing, micro_batch, tuple(budget(r, s, savers)), savers,
                  tuple(saver_table.host_terms(r.arch, s, savers, r.host_processes)
                        + BACKENDS[r.backend].host_terms(r.arch, s, r.host_processes)))


def fits(r: Resolved, c: Choice) -> bool:
    """Under the card's usable memory, and its pinned host memory under the host's usable share."""
    return c.peak_gib <= r.usable_gib and (not c.host_terms or c.host_gib <= r.usable_host_gib)


def methods_to_try(r: Resolved) -> list[str]:
    """Rule 1's order: LoRA, then QLoRA, under `--method auto`; else the one asked for."""
    return list(option_table.METHODS) if r.method == "auto" else [r.method]


def checkpointing_to_try(r: Resolved, savers: saver_table.SaverSet = saver_table.NONE) -> list[bool]:
    """Rule 2's order: off, then on, under `auto`; only on where the savers need checkpointing."""
    allowed = {"auto": [False, True], "on": [True], "off": [False]}[r.grad_checkpointing]
    return [gc for gc in allowed if gc or not saver_table.needs_checkpointing(savers)]


def micro_batches_to_try(r: Resolved) -> list[int]:
    """Rule 3's candidates, smallest first: the powers of two dividing the per-GPU batch, or --batch-size."""
    if r.batch_size:
        return [r.batch_size]
    return [b for b in MICRO_BATCHES if b <= r.per_gpu_batch and r.per_gpu_batch % b == 0]


def _largest_micro_batch(r: Resolved, method: str, gc: bool, savers: saver_table.SaverSet,
                         smallest: Optional[Choice]) -> tuple[Optional[Choice], Optional[Choice]]:
    """(the largest micro-batch that fits at this method, checkpointing and savers, or None; the smallest tried)."""
    best: Optional[Choice] = None
    for mb in micro_batches_to_try(r):
        c = candidate(r, method, mb, gc, savers)
        if smallest is None or c.peak_gib < smallest.peak_gib:
            smallest = c
        if not fits(r, c):
            break  # memory grows with the micro-batch
        best = c
    return best, smallest


def _choose_by_rules(r: Resolved, savers: saver_table.SaverSet) -> tuple[Optional[Choice], Choice]:
    """Rules 1-3 with a fixed saver set (none, or those forced on)."""
    smallest: Optional[Choice] = None
    for method in methods_to_try(r):
        for gc in checkpointing_to_try(r, savers):
            best, smallest = _largest_micro_batch(r, method, gc, savers, smallest)
            if best is not None:
                return best, smallest
    assert smallest is not None, "no configuration: --grad-checkpointing off with savers that need it"
    return None, smallest


def _saver_candidates(r: Resolved, first: saver_table.SaverSet) -> list[tuple[str, bool, saver_table.SaverSet]]:
    """(method, checkpointing, savers) the request allows beyond `first`, fastest first: ordered by the expected
    time per token at micro-batch 1 (planner.plugins.savers.seconds_per_token), ties in the order of rules 1-2."""
    out = []
    peak = r.hardware.peak_bf16_tflops
    for sset in saver_table.candidate_sets(r.savers, r.arch, r.hardware):
        for i, method in enumerate(methods_to_try(r)):
            for gc in checkpointing_to_try(r, sset):
                if sset == first or (sset.every_n_layers > 1 and not gc):
                    continue
                cost = saver_table.seconds_per_token(r.arch, shape(r, method, 1, gc, savers=sset), sset, peak)
                out.append((cost, i, gc, method, sset))
    out.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(method, gc, sset) for _, _, gc, method, sset in out]


def _choose_with_savers(r: Resolved, first: saver_table.SaverSet,
                        smallest: Choice) -> tuple[Optional[Choice], Choice]:
    """Rule 4 when nothing fits by rules 1-3: the fastest candidate with savers that fits."""
    for method, gc, sset in _saver_candidates(r, first):
        best, smallest = _largest_micro_batch(r, method, gc, sset, smallest)
        if best is not None:
            return best, smallest
    return None, smallest


def _fewer_checkpoints(r: Resolved, c: Choice) -> Choice:
    """Rule 4 when full checkpointing fits and layer_checkpointing is allowed: the largest every_n_layers (the
    fewest layers recomputed, the fastest) that still fits at the same method, micro-batch and other savers."""
    if r.savers.get("layer_checkpointing") not in ("auto", "on") or not c.grad_checkpointing:
        return c
    for n in sorted((int(x) for x in saver_table.table()["savers"]["layer_checkpointing"]["every_n_layers"]), reverse=True):
        if n <= c.savers.every_n_layers or n >= r.arch.num_layers:
            continue
        trial = candidate(r, c.method, c.micro_batch_size, True, c.savers.every(n))
        if fits(r, trial):
            return trial
    return c


def choose(r: Resolved) -> tuple[Optional[Choice], Choice]:
    """(the configuration that fits by rules 1-4, or None; the smallest configuration tried)."""
    first = saver_table.forced(saver_table.allowed(r.savers, r.arch, r.hardware))
    choice, smallest = _choose_by_rules(r, first)
    if not r.uses_savers:
        return choice, smallest
    if choice is None:
        choice, smallest = _choose_with_savers(r, first, smallest)
    if choice is not None:
        choice = _fewer_checkpoints(r, choice)
    return choice, smallest


# at another length (--seq-len max: planner.decision.context_length searches with it; the seq_len reason below)


def fits_at(r: Resolved, seq_len: int) -> bool:
    """Some configuration the request allows fits at this length (the smallest micro-batch: memory grows with it)."""
    at = dataclasses.replace(r, seq_len=seq_len)
    mb = micro_batches_to_try(at)[0]
    first = saver_table.forced(saver_table.allowed(at.savers, at.arch, at.hardware))
    sets = saver_table.candidate_sets(at.savers, at.arch, at.hardware) if at.uses_savers else [first]
    return any(fits(at, candidate(at, m, mb, gc, sset)) for sset in sets for m in methods_to_try(at)
               for gc in checkpointing_to_try(at, sset) if not (sset.every_n_layers > 1 and not gc))


# ---------------------------------------------------------------------------------------------------------
# reasons


def host_bound(r: Resolved, c: Choice) -> bool:
    """The configuration fits the card; only its pinned host memory is over the host's usable share."""
    return c.peak_gib <= r.usable_gib and bool(c.host_terms) and c.host_gib > r.usable_host_gib


def slowdown(r: Resolved, c: Choice, without: saver_table.SaverSet) -> float:
    """Time per token of the choice over the same configuration with `without`'s savers instead."""
    peak = r.hardware.peak_bf16_tflops
    mine = saver_table.seconds_per_token(r.arch, shape(r, c.method, c.micro_batch_size, c.grad_checkpointing, savers=c.savers),
                               c.savers, peak)
    base = saver_table.seconds_per_token(r.arch, shape(r, c.method, c.micro_batch_size, c.grad_checkpointing, savers=without),
                               without, peak)
    return mine / base


def _method_reason(r: Resolved, c: Choice, feasible: bool) -> str:
    if r.method != "auto":
        return f"{c.method} as asked (--method {r.method})"
    dt = DTYPE_SHORT[r.dtype]
    if not feasible:
        return (f"neither fits: even QLoRA's 4-bit weights leave the smallest configuration at {c.peak_gib:.1f} GiB "
                f"per GPU, over the {r.usable_gib:.1f} GiB usable")
    if c.method == "lora":
        speedup = memory.coefficients().throughput.lora_speedup_over_qlora
        return (f"LoRA fits, and it trains faster than QLoRA (no 4-bit dequantization: {speedup:.2f}x the tokens/s "
                "at the same shape, measured on an H200)")
    return f"LoRA's {dt} weights do not fit; QLoRA's 4-bit weights do"


def _checkpointing_reason(r: Resolved, c: Choice, feasible: bool) -> str:
    if r.grad_checkpointing != "auto":
        return f"{'on' if c.grad_checkpointing else 'off'} as asked"
    if not feasible:
        return "on: the smallest configuration tried, and it still does not fit"
    if c.grad_checkpointing:
        return "on: without it even a micro-batch of 1 does not fit"
    return "off: not needed to fit, and it would cost about a third more compute"


def _micro_batch_reason(r: Resolved, c: Choice, feasible: bool) -> str:
    hw = r.hardware
    usable = (f"{r.usable_gib:.1f} GiB ({hw.memory_gib:.1f} GiB less a "
              f"{memory.coefficients().decision.safety_margin:.0%} safety margin for the model's error)")
    if not feasible and host_bound(r, c):
        return f"{c.micro_batch_size}: the smallest tried; {c.peak_gib:.1f} GiB fits the card, its pinned host memory does not"
    if not feasible:
        return f"{c.micro_batch_size}: the smallest tried; it needs {c.peak_gib:.1f} GiB, over the {usable}"
    if r.batch_size:
        return f"{c.micro_batch_size} as asked (--batch-size)"
    return f"{c.micro_batch_size}: the largest dividing the per-GPU batch of {r.per_gpu_batch} that stays under {usable}"


def _expert_reason(r: Resolved, c: Choice) -> Optional[str]:
    """MoE QLoRA: say in words how much of the weights bitsandbytes leaves unquantized."""
    if not (r.arch.is_moe and c.method == "qlora"):
        return None
    s = shape(r, "qlora", 1, False)
    expert_gib = (memory.base_weights_bytes(r.arch, s) - 0.5 * memory.quantized_weight_params(r.arch)) / GIB
    if expert_gib <= 0:
        return None
    return (f"the fused expert weights stay in {DTYPE_SHORT[r.dtype]} under QLoRA ({expert_gib:.1f} GiB): "
            "transformers' bitsandbytes integration quantizes nn.Linear layers only, not the 3-D expert parameters")


def reasons(r: Resolved, c: Choice, feasible: bool) -> dict[str, str]:
    hw = r.hardware
    accum = r.per_gpu_batch // c.micro_batch_size
    out = {
        "method": _method_reason(r, c, feasible),
        "grad_checkpointing": _checkpointing_reason(r, c, feasible),
        "micro_batch_size": _micro_batch_reason(r, c, feasible),
        "grad_accum_steps": f"{accum} = global batch {r.global_batch_size} / (micro-batch {c.micro_batch_size} x "
                            f"{r.strategy.batch_ways(hw)} GPU(s))",
    }
    if "global_batch_size" in r.default_notes:  # the default global batch, fitted to the world size
        out["grad_accum_steps"] += f"; {r.default_notes['global_batch_size']}"
    if "seq_len" in r.default_notes:  # the default length, capped at the model's context
        out["seq_len"] = r.default_notes["seq_len"]
    for k in ("learning_rate", "num_epochs", "rank", "alpha", "dropout", "warmup_ratio", "lr_scheduler"):
        out[k] = option_table.reason(k)
    if r.epochs_reason:
        out["num_epochs"] = r.epochs_reason
    out["strategy"] = r.strategy.describe(hw)
    if r.selection.note:
        out["targets"] = r.selection.note
    if r.selection.target_parameters and r.dropout == 0.0:
        out["dropout"] = "0: peft cannot apply dropout to fused expert weights (target_parameters)"
    if "lora_dropout" in r.default_notes:  # the training backend's default (planner/plugins/backends.py)
        out["dropout"] = r.default_notes["lora_dropout"]
    if r.backend != DEFAULT_BACKEND:
        b = BACKENDS[r.backend]
        out["backend"] = f"{b.name}: {b.description}; checkpointing {b.checkpointing!r}"
    expert = _expert_reason(r, c)
    if expert:
        out["quantization"] = expert
    if r.uses_savers:
        out["savers"] = _savers_reason(r, c, feasible)
    if r.seq_len_max:
        out["seq_len"] = _seq_len_reason(r) if feasible else (
            f"not even {option_table.SEQ_LEN_STEP} tokens fit: the smallest configuration at {r.seq_len} is shown")
    return out


def _savers_reason(r: Resolved, c: Choice, feasible: bool) -> str:
    modes = saver_table.allowed(r.savers, r.arch, r.hardware)
    forced = [n for n, m in modes.items() if m == "on"]
    if not feasible and host_bound(r, c):
        return (f"{c.savers.describe()} would pin {c.host_gib:.1f} GiB of host memory, over the "
                f"{r.usable_host_gib:.1f} GiB usable ({r.host_note}, {saver_table.host_pinned_share():.0%} of it)")
    if not feasible:
        return f"none of the allowed sets fits (allowed: {', '.join(n for n, m in modes.items() if m != 'off')})"
    if c.savers == saver_table.NONE:
        return "none needed: the plan fits without them"
    host = (f"; {c.host_gib:.1f} GiB of pinned host memory of the {r.usable_host_gib:.1f} GiB usable ({r.host_note}, "
            f"{saver_table.host_pinned_share():.0%} of it)" if c.host_terms else "")
    slower = slowdown(r, c, saver_table.NONE) - 1
    speed = f"about {slower:.1%} slower than without them" if slower >= 0 else f"about {-slower:.1%} faster"
    if forced and set(c.savers.names) <= set(forced):
        return f"{c.savers.describe()} as asked (--savers); {speed}{host}"
    if c.savers.names == ("layer_checkpointing",):
        return (f"{c.savers.describe()}: full checkpointing leaves room, and recomputing fewer layers is faster: "
                f"{speed} than checkpointing every layer")
    return (f"{c.savers.describe()}: nothing fits without savers; the fastest allowed set that fits, ordered by "
            f"expected time per token ({speed}){host}")


def _seq_len_reason(r: Resolved) -> str:
    """Why --seq-len max stopped where it did: the model's context, the card, or the host's pinned memory."""
    allowed = [n for n, m in saver_table.allowed(r.savers, r.arch, r.hardware).items() if m != "off"]
    savers = f"with {', '.join(allowed)} allowed" if allowed else "with no savers allowed (--savers)"
    head = f"{r.seq_len:,}: the longest multiple of {option_table.SEQ_LEN_STEP} that fits, {savers}"
    if r.seq_len >= r.seq_len_limit:
        return f"{head}; capped at the model's context (max_position_embeddings {r.seq_len_limit:,})"
    nxt = dataclasses.replace(r, seq_len=r.seq_len + option_table.SEQ_LEN_STEP)
    gpu_only = dataclasses.replace(nxt, hardware=dataclasses.replace(nxt.hardware, host_memory_gib=float("inf")))
    if fits_at(gpu_only, nxt.seq_len):
        return (f"{head}; {nxt.seq_len:,} would fit the card but not the host: its pinned memory would pass the "
                f"{r.usable_host_gib:.1f} GiB usable ({r.host_note}, {saver_table.host_pinned_share():.0%} of it; --host-memory)")
    return f"{head}; {nxt.seq_len:,} would not fit the {r.usable_gib:.1f} GiB usable on the card"
