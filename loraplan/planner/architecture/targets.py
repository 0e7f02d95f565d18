"""Which modules LoRA adapts: a user's --targets resolved against an `Architecture`, and the trainable count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ArchitectureError
from ..facts.options import default
from .types import Architecture, Projection

SHORT_NAMES = {
    "q": "q", "q_proj": "q", "k": "k", "k_proj": "k", "v": "v", "v_proj": "v", "o": "o", "o_proj": "o",
    "gate": "gate", "gate_proj": "gate", "w1": "gate", "up": "up", "up_proj": "up", "w3": "up",
    "down": "down", "down_proj": "down", "w2": "down",
    "qkv": "qkv", "qkv_proj": "qkv", "gate_up": "gate_up", "gate_up_proj": "gate_up",
}


def default_kinds() -> tuple[str, ...]:
    """The targets when --targets is not given (tables/hyperparameters.yaml `targets`)."""
    return tuple(default("targets"))


@dataclass
class TargetSelection:
    projections: list[Projection]
    target_modules: list[str]  # peft LoraConfig.target_modules
    target_parameters: list[str]  # peft LoraConfig.target_parameters (fused MoE experts)
    note: str = ""


def select_targets(arch: Architecture, spec: Optional[str]) -> TargetSelection:
    """Resolve a user's --targets ("q,k,v,o,gate,up,down", "all-linear", or module names) for `arch`.

    A fused module (Phi-3's qkv_proj, gate_up_proj; MoE experts' gate_up_proj) is adapted whole when any
    of the kinds it carries is asked for: peft adapts a module, not a slice of it.
    """
    by_name = {p.peft_name: set(p.kinds) for p in arch.projections}
    if spec is None or spec.strip() == "":
        wanted = set(default_kinds())
        if not any(wanted & set(p.kinds) for p in arch.projections):  # e.g. gpt_neox's query_key_value, dense
            wanted = set(arch.kinds())
    elif spec.strip() == "all-linear":
        wanted = set(arch.kinds())
    else:
        wanted = set()
        for raw in spec.split(","):
            name = raw.strip()
            if not name:
                continue
            kind = SHORT_NAMES.get(name)
            if name in by_name and kind is None:  # a module name of this architecture
                wanted |= by_name[name]
            elif kind == "qkv":
                wanted |= {"q", "k", "v"}
            elif kind == "gate_up":
                wanted |= {"gate", "up"}
            elif kind is not None:
                wanted.add(kind)
            else:
                raise ArchitectureError(
                    f"target {name!r} matches no module of {arch.family}; choose from "
                    + ", ".join(p.peft_name for p in arch.projections)
                    + " (or q,k,v,o,gate,up,down, or all-linear)"
                )
    chosen = [p for p in arch.projections if wanted & set(p.kinds)]
    if not chosen:
        raise ArchitectureError(f"targets {spec!r} match no module of {arch.family}")
    modules: list[str] = []
    params: list[str] = []
    for p in chosen:
        if p.param:
            name = f"mlp.experts.{p.peft_name}"
            if name not in params:
                params.append(name)
        elif p.peft_name not in modules:
            modules.append(p.peft_name)
    widened = sorted({k for p in chosen for k in p.kinds} - wanted)
    note = f"fused modules also adapt {', '.join(widened)}" if widened else ""
    if (spec is None or not spec.strip()) and not any(set(default_kinds()) & set(p.kinds) for p in chosen):
        note = "the architecture has none of q,k,v,o,gate,up,down: every linear layer is adapted"
    return TargetSelection(chosen, modules, params, note)


def trainable_params(selection: TargetSelection, r: int) -> int:
    return sum(p.lora_params(r) for p in selection.projections)
