"""Training backends: a plug-in table, one entry per way of running the training step (in the style of peft's
`dispatch_*`). The planner's side of the seam; the executor's side is loraplan/executor/backends/, one module per
entry, named after it.

Each entry says what it needs installed, what it refuses (one line), how it changes the memory terms, and the
settings it brings. A plan names its backend in `training.backend` (plan files without the field are "hf").
Adding a backend is adding an entry here plus its module in executor/backends/ (docs/code-map.md).

No torch, transformers or peft here: the planner only reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from ..memory.step import Term

DEFAULT_BACKEND = "hf"  # what a plan file without training.backend trains with

Refusal = Callable[[str, str, frozenset], Optional[str]]  # (strategy name, method, savers on) -> why not, or None
TermsHook = Callable[[Sequence[Term]], list[Term]]  # one rank's memory terms -> the backend's


def _refuses_nothing(strategy_name: str, method: str, savers_on: frozenset) -> Optional[str]:
    return None


def _same_terms(terms: Sequence[Term]) -> list[Term]:
    return list(terms)


@dataclass(frozen=True)
class Backend:
    name: str
    description: str  # one line, shown where backends are listed
    imports: tuple[str, ...]  # the import names its executor module needs (checked before a run starts)
    install_hint: str  # the command that installs them
    refusal: Refusal = _refuses_nothing  # a combination this backend cannot train, as one line
    adjust_terms: TermsHook = _same_terms  # the memory terms the planner budgets -> what this backend holds
    # Activation checkpointing as the backend applies it: "non-reentrant" (torch.utils.checkpoint with
    # use_reentrant=False, through transformers' gradient_checkpointing_kwargs) or "reentrant".
    checkpointing: str = "non-reentrant"
    # Plan fields the backend sets unless the user chose them (e.g. {"lora.lora_dropout": 0.0}); none for hf.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def refuses(self, strategy_name: str, method: str, savers_on: frozenset[str]) -> Optional[str]:
        """Why this backend cannot train that strategy, method and set of savers (one line), or None."""
        return self.refusal(strategy_name, method, frozenset(savers_on))


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend(
        "hf",
        "transformers + peft + trl: AutoModelForCausalLM (4-bit through bitsandbytes), get_peft_model, SFTTrainer",
        ("transformers", "peft", "trl"),
        'pip install -e ".[run]"',
    ),
)}


def backend_refusal(name: str, strategy_name: str, method: str, savers_on: Sequence[str]) -> Optional[str]:
    """One line when the plan's backend refuses its strategy, method or savers, else None (Plan.validate)."""
    why = BACKENDS[name].refuses(strategy_name, method, frozenset(savers_on))
    return f"training.backend {name} cannot train this plan: {why}" if why else None
