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

from loraplan.tables import load_table

from ..architecture.families import FAMILIES
from ..architecture.types import Architecture
from ..memory import unsloth as unsloth_memory
from ..memory.step import MicroStep, Term
from . import savers as saver_table
from . import strategies as strategy_table

DEFAULT_BACKEND = "hf"  # what a plan file without training.backend trains with

Refusal = Callable[[str, str, frozenset], Optional[str]]  # (strategy name, method, savers on) -> why not, or None
# (one rank's memory terms, the architecture, the micro-step, the LoRA dropout, the card's bytes or None) -> the
# terms this backend holds
TermsHook = Callable[[Sequence[Term], Architecture, MicroStep, float, Optional[float]], list[Term]]
HostHook = Callable[[Architecture, MicroStep, int], list[Term]]  # (arch, step, processes) -> pinned host terms
ModelRefusal = Callable[[Architecture], Optional[str]]  # a model family this backend cannot train, or None
WarningsHook = Callable[[Architecture, MicroStep, float], list[str]]  # (arch, step, dropout) -> what the plan says


def _refuses_nothing(strategy_name: str, method: str, savers_on: frozenset) -> Optional[str]:
    return None


def _same_terms(terms: Sequence[Term], arch: Architecture, shape: MicroStep, dropout: float,
                card_bytes: Optional[float]) -> list[Term]:
    return list(terms)


def _no_host_terms(arch: Architecture, shape: MicroStep, processes: int) -> list[Term]:
    return []


def _takes_any_model(arch: Architecture) -> Optional[str]:
    return None


def _no_warnings(arch: Architecture, shape: MicroStep, dropout: float) -> list[str]:
    return []


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
    host_terms: HostHook = _no_host_terms  # pinned host memory the backend itself takes (its own offloading)
    refuses_model: ModelRefusal = _takes_any_model  # a model family it cannot train, as one line
    # what `pip` needs besides loraplan's [run] extra, shown in the side-by-side
    needs: str = "loraplan[run]"
    takes_target_parameters: bool = True  # LoRA on parameters (MoE experts, peft's target_parameters)
    # what the plan should say about a chosen configuration under this backend (the plan's warnings)
    warnings: WarningsHook = _no_warnings

    @property
    def published(self) -> Mapping[str, Any]:
        """tables/backends.yaml's entry: published facts (the speed-up claimed, its source), none for hf."""
        return load_table("backends.yaml").get(self.name, {})

    def refuses(self, strategy_name: str, method: str, savers_on: frozenset[str]) -> Optional[str]:
        """Why this backend cannot train that strategy, method and set of savers (one line), or None."""
        return self.refusal(strategy_name, method, frozenset(savers_on))


# ---------------------------------------------------------------------------------------------------------
# unsloth: FastLanguageModel + its LoRA kernels + trl's SFTTrainer as Unsloth patches it (executor/backends/unsloth.py)

# model_type -> FastLanguageModel's own model class (unsloth/models/loader.py:1796-1858, 2026.10.9): their LoRA
# projections run through Unsloth's fused kernels. Any other model_type is delegated to FastModel (loader.py:1861),
# which trains transformers' own modules with peft's forward, under Unsloth's checkpointing and loss.
UNSLOTH_OWN_FAMILIES = ("llama", "mistral", "gemma", "gemma2", "qwen2", "qwen3", "qwen3_moe")
# savers Unsloth replaces or cannot take, with why (planner/plugins/savers.py's names)
UNSLOTH_SAVER_REFUSALS = {
    "offload_checkpoints": "Unsloth offloads the checkpointed layer inputs to host memory itself (its "
                           "use_gradient_checkpointing=\"unsloth\")",
    "offload_activations": "Unsloth offloads the checkpointed layer inputs to host memory itself (its "
                           "use_gradient_checkpointing=\"unsloth\"); trl's activation offloading would wrap "
                           "Unsloth's own",
    "layer_checkpointing": "Unsloth checkpoints every decoder layer through its own checkpoint function; a "
                           "checkpoint every n layers is not one of its settings",
    "mlp_tiling": "Unsloth tiles the MLP itself (from_pretrained(unsloth_tiled_mlp=True), unsloth_zoo/tiled_mlp.py), "
                  "not through Liger's patch, and loraplan does not plan its tiling yet",
}


def _unsloth_refusal(strategy_name: str, method: str, savers_on: frozenset) -> Optional[str]:
    strategy = strategy_table.STRATEGIES.get(strategy_name)
    if strategy is not None and strategy.sharded:  # read the entry's fields, never its name
        return (f"strategy {strategy_name} shards the model (FSDP), and Unsloth trains data-parallel only; "
                "use --backend hf for FSDP")
    for name in sorted(savers_on):
        if name in UNSLOTH_SAVER_REFUSALS:
            return f"saver {saver_table.cli_name(name)}: {UNSLOTH_SAVER_REFUSALS[name]}"
    return None


def _unsloth_terms(terms: Sequence[Term], arch: Architecture, shape: MicroStep, dropout: float,
                   card_bytes: Optional[float]) -> list[Term]:
    """planner.memory.unsloth's budget on a GPU; on the CPU Unsloth runs its CPU backend (unsloth_zoo/cpu: stock
    transformers + peft + trl, plain recomputation, none of its GPU kernels), so the standard terms stand."""
    if shape.device != "cuda":
        return list(terms)
    return unsloth_memory.unsloth_budget(arch, shape, terms, dropout=dropout, card_bytes=card_bytes,
                                         own_model=arch.family in UNSLOTH_OWN_FAMILIES)


def _unsloth_host_terms(arch: Architecture, shape: MicroStep, processes: int) -> list[Term]:
    if shape.device != "cuda":
        return []
    return unsloth_memory.unsloth_host_terms(arch, shape, processes)


def _unsloth_warnings(arch: Architecture, shape: MicroStep, dropout: float) -> list[str]:
    """A LoRA dropout above 0 on a GPU: what its masks cost (planner.memory.unsloth.dropout_mask_bytes). In unsloth
    2026.10.9 the fused kernels still run (UNSLOTH_FUSED_LORA_DROPOUT is on by default) and save a 1-byte mask per
    dropped input."""
    if dropout <= 0 or shape.device != "cuda":
        return []
    extra = unsloth_memory.dropout_mask_bytes(arch, shape, own_model=arch.family in UNSLOTH_OWN_FAMILIES)
    if not extra:
        return [f"--dropout {dropout:g} under --backend unsloth: {arch.family} runs peft's LoRA forward there, "
                "whose dropout outputs the activation term already counts"]
    return [f"--dropout {dropout:g} under --backend unsloth: its fused LoRA kernels still run (unsloth 2026.10.9's "
            f"UNSLOTH_FUSED_LORA_DROPOUT is on by default) and keep a 1-byte mask per dropped input, (6h + i) x T per "
            f"layer recomputed: {extra / 2**30:.2f} GiB more at this micro-batch; --dropout 0 is its default"]


def _unsloth_model(arch: Architecture) -> Optional[str]:
    if arch.family not in FAMILIES:
        return (f"{arch.family} is not a family loraplan's catalog describes, and Unsloth's memory for it is not "
                "planned; use --backend hf")
    return None


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend(
        "hf",
        "transformers + peft + trl: AutoModelForCausalLM (4-bit through bitsandbytes), get_peft_model, SFTTrainer",
        ("transformers", "peft", "trl"),
        'pip install -e ".[run]"',
    ),
    Backend(
        "unsloth",
        "Unsloth: FastLanguageModel (4-bit NF4), its fused LoRA kernels, offloaded checkpointing and chunked loss, "
        "trl's SFTTrainer as Unsloth patches it",
        ("unsloth", "unsloth_zoo", "transformers", "peft", "trl"),
        'pip install "loraplan[unsloth]" -c <(echo torch==2.13.0) && pip uninstall -y torchvision '
        "(on a machine without a GPU; README)",
        refusal=_unsloth_refusal,
        adjust_terms=_unsloth_terms,
        checkpointing="unsloth",
        defaults={"lora.lora_dropout": 0.0},
        host_terms=_unsloth_host_terms,
        refuses_model=_unsloth_model,
        warnings=_unsloth_warnings,
        takes_target_parameters=False,  # FastLanguageModel.get_peft_model takes target_modules only
        needs="loraplan[unsloth] (unsloth + unsloth_zoo 2026.10.9; transformers <= 5.17, trl <= 1.15)",
    ),
)}


def backend_refusal(name: str, strategy_name: str, method: str, savers_on: Sequence[str]) -> Optional[str]:
    """One line when the plan's backend refuses its strategy, method or savers, else None (Plan.validate)."""
    why = BACKENDS[name].refuses(strategy_name, method, frozenset(savers_on))
    return f"training.backend {name} cannot train this plan: {why}" if why else None
