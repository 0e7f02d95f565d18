"""The decision, as a pure function of the resolved inputs: method, gradient checkpointing and micro-batch, the
reasons for each, and (when nothing fits) what would.

Rules, in the order they apply:
1. LoRA before QLoRA when the method is `auto`: LoRA trains faster (no 4-bit dequantization).
2. Gradient checkpointing only when needed: it costs about a third more compute.
3. The largest micro-batch (a power of two dividing the per-GPU batch) whose predicted peak stays under the card's
   memory less the safety margin; memory grows with the micro-batch, so the search stops at the first that fails.
4. Nothing fits: the smallest configuration tried is reported, with the relaxations that would make it fit, each
   with the memory it saves, listed only when it helps (alone, or together with the others listed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from . import memory as M
from . import options as O
from .catalog import gpus
from .request import Resolved
from .targets import trainable_params

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# A relaxation that saves less than this is not worth a line of advice.
MIN_SAVING_GIB = 0.05


@dataclass(frozen=True)
class Choice:
    method: str
    grad_checkpointing: bool
    micro_batch_size: int
    terms: tuple[M.Term, ...]

    @property
    def peak_gib(self) -> float:
        return M.Term.sum_gib(self.terms)


@dataclass
class Decision:
    choice: Choice  # what the plan uses: the choice that fits, or the smallest tried when none does
    feasible: bool
    reasons: dict[str, str]
    suggestions: list[str]  # empty when feasible
    strategy: str = "single"  # the strategy the choice is for (planner.placement may shard)
    options: list = field(default_factory=list)  # planner.placement.StrategyOption per strategy tried
    load: Optional[object] = None  # planner.loading.LoadPeak of the choice


def shape(r: Resolved, method: str, micro_batch: int, grad_checkpointing: bool, seq_len: Optional[int] = None,
          optimizer: Optional[str] = None) -> M.Shape:
    hw = r.hardware
    return M.Shape(method=method, r=r.rank, micro_batch_size=micro_batch, seq_len=seq_len or r.seq_len,
                   grad_checkpointing=grad_checkpointing, loss=r.loss, optimizer=optimizer or r.optimizer,
                   dtype=r.dtype, double_quant=bool(O.default("double_quantization")),
                   blocksize=int(O.default("quant_blocksize")), num_gpus=hw.num_gpus,
                   device="cpu" if hw.gpu == "cpu" else "cuda")


def budget(r: Resolved, s: M.Shape) -> list[M.Term]:
    """The per-GPU terms of shape `s` under the plan's strategy."""
    p = trainable_params(r.selection, r.rank)
    return r.strategy.budget(M.budget(r.arch, r.selection, s), r.arch, p, s, r.hardware)


def _methods(r: Resolved) -> list[str]:
    return list(O.METHODS) if r.method == "auto" else [r.method]


def _checkpointing(r: Resolved) -> list[bool]:
    return {"auto": [False, True], "on": [True], "off": [False]}[r.grad_checkpointing]


def _micro_batches(r: Resolved) -> list[int]:
    if r.batch_size:
        return [r.batch_size]
    return [b for b in MICRO_BATCHES if b <= r.per_gpu_batch and r.per_gpu_batch % b == 0]


def choose(r: Resolved) -> tuple[Optional[Choice], Choice]:
    """(the first configuration that fits by rules 1-3, or None; the smallest configuration tried)."""
    smallest: Optional[Choice] = None
    for method in _methods(r):
        for gc in _checkpointing(r):
            best: Optional[Choice] = None
            for mb in _micro_batches(r):
                c = Choice(method, gc, mb, tuple(budget(r, shape(r, method, mb, gc))))
                if smallest is None or c.peak_gib < smallest.peak_gib:
                    smallest = c
                if c.peak_gib > r.usable_gib:
                    break  # memory grows with the micro-batch
                best = c
            if best is not None:
                return best, smallest
    assert smallest is not None
    return None, smallest


def smallest_peak_gib(r: Resolved) -> float:
    """The least memory any configuration the request allows needs (QLoRA if allowed, checkpointing if allowed,
    the smallest micro-batch)."""
    mb = _micro_batches(r)[0]
    return min(M.Term.sum_gib(budget(r, shape(r, m, mb, gc))) for m in _methods(r) for gc in _checkpointing(r))


# ---------------------------------------------------------------------------------------------------------
# reasons


def _method_reason(r: Resolved, c: Choice, feasible: bool) -> str:
    if r.method != "auto":
        return f"{c.method} as asked (--method {r.method})"
    dt = DTYPE_SHORT[r.dtype]
    if not feasible:
        return (f"neither fits: even QLoRA's 4-bit weights leave the smallest configuration at {c.peak_gib:.1f} GiB "
                f"per GPU, over the {r.usable_gib:.1f} GiB usable")
    if c.method == "lora":
        speedup = M.coefficients().throughput.lora_speedup_over_qlora
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
              f"{M.coefficients().decision.safety_margin:.0%} safety margin for the model's error)")
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
    expert_gib = (M.base_weights_bytes(r.arch, s) - 0.5 * M.quantized_weight_params(r.arch)) / GIB
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
                            f"{hw.num_gpus if r.strategy.data_parallel else 1} GPU(s))",
    }
    for k in ("learning_rate", "num_epochs", "rank", "alpha", "dropout", "warmup_ratio", "lr_scheduler"):
        out[k] = O.reason(k)
    if r.epochs_reason:
        out["num_epochs"] = r.epochs_reason
    out["strategy"] = r.strategy.describe(hw)
    if r.selection.note:
        out["targets"] = r.selection.note
    if r.selection.target_parameters and r.dropout == 0.0:
        out["dropout"] = "0: peft cannot apply dropout to fused expert weights (target_parameters)"
    expert = _expert_reason(r, c)
    if expert:
        out["quantization"] = expert
    return out


# ---------------------------------------------------------------------------------------------------------
# what would fit


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
    return out


RELAXABLE = ("method", "grad_checkpointing", "batch_size", "optimizer")


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


def suggestions(r: Resolved, smallest: Choice) -> list[str]:
    """What would make an infeasible request fit, each line with what it saves; only relaxations that help:
    alone, or together with the other relaxations listed."""
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


def decide(r: Resolved) -> Decision:
    """The decision for resolved inputs `r` (a pure function: same inputs, same decision)."""
    choice, smallest = choose(r)
    c = choice or smallest
    feasible = choice is not None
    return Decision(c, feasible, reasons(r, c, feasible), [] if feasible else suggestions(r, smallest),
                    strategy=r.strategy.name)
