"""Memory savers: a plug-in table, one entry per saver (in the style of planner/strategies.py).

Each entry says whether it applies to a model and card, what it changes in the memory budget (the GPU terms it
changes through `Shape`, the GPU terms it adds, the pinned host memory it takes), what it costs in speed and
where that figure comes from (tables/savers.yaml), and how `run` applies it (a trl / transformers option, or
Liger-Kernel's tiled MLP). The decision (planner.decide) picks among `SaverSet`s, ordered by their speed cost.

    layer_checkpointing   checkpoint every n-th layer only: gives memory back for speed
    offload_checkpoints   transformers: the checkpointed layer inputs in pinned host memory, blocking copies
    offload_activations   trl: the same tensors through saved-tensor hooks on a second CUDA stream
    mlp_tiling            Liger-Kernel: the MLP over the sequence in tiles, recomputed in the backward
    padding_free          trl packing without padding, flash-attention's variable-length kernel

Nothing here imports torch: `unmet_requirements` takes what the machine has as arguments.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional

from loraplan.tables import savers as savers_table

from . import memory as M
from . import options as O
from . import throughput as TP
from .architecture import Architecture
from .plan import Hardware



def table() -> dict:
    """tables/savers.yaml: the savers' coefficients and sources."""
    return savers_table()


def host_pinned_share() -> float:
    return float(table()["host"]["pinned_share"])


def host_link_bytes_per_s() -> float:
    return float(table()["host"]["link_gbs"]) * 1e9


@dataclass(frozen=True)
class SaverSet:
    """Which savers a configuration uses: a set of names (keys of SAVERS), and layer_checkpointing's setting.
    The default is none: the plan without savers."""

    on: frozenset[str] = frozenset()
    every_n_layers: int = 1  # layer_checkpointing's setting: > 1 exactly when it is on

    def __post_init__(self):
        object.__setattr__(self, "on", frozenset(self.on))
        unknown = self.on - set(SAVERS)
        if unknown:
            raise ValueError(f"unknown savers {sorted(unknown)}")
        if ("layer_checkpointing" in self.on) != (self.every_n_layers > 1):
            raise ValueError("layer_checkpointing is on exactly when every_n_layers > 1")

    @classmethod
    def of(cls, *names: str, every_n_layers: int = 2) -> "SaverSet":
        """The set of `names`; layer_checkpointing among them checkpoints every `every_n_layers` layers."""
        return cls(frozenset(names), every_n_layers if "layer_checkpointing" in names else 1)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in SAVERS if n in self.on)

    def without(self, name: str) -> "SaverSet":
        return SaverSet(self.on - {name}, 1 if name == "layer_checkpointing" else self.every_n_layers)

    def every(self, n: int) -> "SaverSet":
        """The same set with layer_checkpointing every n layers (n = 1: off)."""
        on = self.on | {"layer_checkpointing"} if n > 1 else self.on - {"layer_checkpointing"}
        return SaverSet(on, n)

    def describe(self) -> str:
        parts = []
        for n in self.names:
            parts.append(f"layer_checkpointing (every {self.every_n_layers} layers)" if n == "layer_checkpointing" else n)
        return ", ".join(parts) or "none"


# ---------------------------------------------------------------------------------------------------------
# applicability: None when the saver applies, else a one-line reason


def _device_only(arch: Architecture, hw: Hardware) -> Optional[str]:
    if hw.gpu == "cpu":
        return "nothing to offload on the CPU: the activations already live in host memory"
    return None


def _dense_gated_mlp(arch: Architecture, hw: Hardware) -> Optional[str]:
    names = {p.peft_name for p in arch.projections}
    if arch.is_moe or not {"gate_proj", "up_proj", "down_proj"} <= names:
        return (f"Liger-Kernel's tiled MLP takes a dense gated MLP (gate_proj, up_proj, down_proj); {arch.family} "
                "has " + ("experts" if arch.is_moe else "another MLP layout"))
    if hw.gpu == "cpu":
        return "Liger-Kernel's kernels need a GPU"
    return None


def _flash_attention(arch: Architecture, hw: Hardware) -> Optional[str]:
    if arch.attn_implementation == "eager":
        return f"flash-attention's variable-length path cannot run {arch.family}'s eager (softcapped) attention"
    if hw.gpu == "cpu":
        return "flash-attention needs a GPU"
    return None


def _always(arch: Architecture, hw: Hardware) -> Optional[str]:
    return None


# ---------------------------------------------------------------------------------------------------------
# terms


def pinned_host_bytes(arch: Architecture, shape: M.Shape) -> float:
    """Pinned host memory one process holds for the offloaded checkpointed inputs: one block per checkpointed
    layer, each rounded up to a power of two by torch's caching host allocator:
        Lc x 2^ceil(log2(dtype x h x T))
    (tables/savers.yaml host.pinned_rounding_source). The blocks stay cached for the next step. Steps shorter than
    the planned full rows ask for smaller blocks, which the cache keeps beside these (at most as much again):
    `run` measures the pinned peak and reports it beside this figure."""
    if not shape.checkpoints_offloaded:
        return 0.0
    block = M.DTYPE_BYTES[shape.dtype] * arch.hidden_size * shape.tokens
    return M.checkpointed_layers(arch, shape) * 2 ** math.ceil(math.log2(block))


def transfer_bytes_per_token(arch: Architecture, shape: M.Shape) -> float:
    """Bytes an offload copies per token, each way: the checkpointed input of every checkpointed layer,
    dtype x Lc x h (out in the forward, back in the backward)."""
    if not shape.checkpoints_offloaded:
        return 0.0
    return M.DTYPE_BYTES[shape.dtype] * M.checkpointed_layers(arch, shape) * arch.hidden_size


def _offload_terms(arch: Architecture, shape: M.Shape) -> list[M.Term]:
    k = shape.offload_resident_inputs
    return [M.Term("offload_resident", M.offload_resident_bytes(arch, shape), f"{k} x dtype x h x T", "activations")]


def _mlp_tile_terms(arch: Architecture, shape: M.Shape) -> list[M.Term]:
    return [M.Term("mlp_tile", M.mlp_tile_bytes(arch, shape), "(s + s_rc) x (6i + MLP LoRA) x tile tokens", "activations")]


def _no_terms(arch: Architecture, shape: M.Shape) -> list[M.Term]:
    return []


def _pinned_terms(arch: Architecture, shape: M.Shape, processes: int) -> list[M.Term]:
    """Pinned host memory on the machine: per process, times the processes sharing the host."""
    per = pinned_host_bytes(arch, shape)
    where = f" x {processes} processes" if processes > 1 else ""
    return [M.Term("pinned_checkpoints", per * processes, f"ceil(L/n) x 2^ceil(log2(dtype x h x T)){where}", "host")]


def _no_host_terms(arch: Architecture, shape: M.Shape, processes: int) -> list[M.Term]:
    return []


# what a saver changes in the Shape the memory terms read, given the set it is in


def _every_n(shape: M.Shape, arch: Architecture, savers: "SaverSet", name: str) -> M.Shape:
    return dataclasses.replace(shape, every_n_layers=savers.every_n_layers)


def _offloaded(shape: M.Shape, arch: Architecture, savers: "SaverSet", name: str) -> M.Shape:
    resident = int(table()["savers"][name]["resident_inputs"])
    return dataclasses.replace(shape, checkpoints_offloaded=True, offload_resident_inputs=resident)


def _tiled(shape: M.Shape, arch: Architecture, savers: "SaverSet", name: str) -> M.Shape:
    shards = max(1, math.ceil(shape.seq_len / arch.hidden_size))  # Liger's default num_shards
    return dataclasses.replace(shape, mlp_tile_tokens=shape.micro_batch_size * math.ceil(shape.seq_len / shards))


def _unchanged(shape: M.Shape, arch: Architecture, savers: "SaverSet", name: str) -> M.Shape:
    return shape


# the time a saver adds per token on one GPU, given the compute time per token


def _copy_seconds(arch: Architecture, shape: M.Shape, compute_s: float, name: str) -> float:
    """The offload's copies over the host link: blocking copies add 2 x transfer / link; copies on a second stream
    add only what exceeds the compute they overlap, plus a cited overhead (tables/savers.yaml)."""
    copy = 2 * transfer_bytes_per_token(arch, shape) / host_link_bytes_per_s()
    c = table()["savers"][name]
    if c.get("overlap"):
        return max(0.0, copy - compute_s) + float(c.get("async_overhead", 0.0)) * compute_s
    return copy


def _no_seconds(arch: Architecture, shape: M.Shape, compute_s: float, name: str) -> float:
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Saver:
    """One saver, with every condition on it. Its facts (coefficients, sources, default modes, how `run` applies
    it, its short name) are its entry in tables/savers.yaml; adding a saver is an entry here and there."""

    name: str
    needs_checkpointing: bool
    applies: Callable[[Architecture, Hardware], Optional[str]]
    reshape: Callable[[M.Shape, Architecture, "SaverSet", str], M.Shape]  # what it changes in the memory terms
    gpu_terms: Callable[[Architecture, M.Shape], list[M.Term]]  # terms it adds to each GPU's budget
    host_terms: Callable[[Architecture, M.Shape, int], list[M.Term]]  # host memory it takes on the machine
    extra_seconds: Callable[[Architecture, M.Shape, float, str], float]  # time per token it adds to the compute
    excludes: Optional[str]  # a group of savers that move the same tensors: at most one of a group is on
    needs_cuda: bool  # `run` refuses it on a machine without a CUDA device
    library: Optional[str]  # an import `run` needs beyond the [run] extra
    install: Optional[str]
    chosen_automatically: bool  # False: only `--savers NAME=on` adds it (it changes no planned memory)
    settings: Callable[["Saver", str, Architecture], list[int]]  # a mode -> the settings to try, 0 meaning off

    @property
    def coefficients(self) -> dict:
        return table()["savers"][self.name]

    @property
    def speed_source(self) -> str:
        return " ".join(self.coefficients["speed_source"].split())

    @property
    def applied_by(self) -> str:
        return " ".join(self.coefficients["applied_by"].split())

    @property
    def applied_short(self) -> str:
        return self.coefficients["applied_short"]

    @property
    def short(self) -> str:
        return self.coefficients["short"]

    @property
    def run(self) -> dict:
        """How `run` applies it (executor/saver_settings.py): {checkpointing: kwargs} | {sft_config: fields} |
        {model_patch: name}; the value `setting` stands for the saver's setting."""
        return self.coefficients["run"]



def _on_off(saver: Saver, mode: str, arch: Architecture) -> list[int]:
    """A saver without a setting: on -> [1], auto -> [0, 1] when the planner chooses it itself, off -> [0]."""
    if mode == "on":
        return [1]
    return [0, 1] if mode == "auto" and saver.chosen_automatically else [0]


def _every_n_values(saver: Saver, mode: str, arch: Architecture) -> list[int]:
    """layer_checkpointing's setting is every_n_layers (1 is plain checkpointing, so 0 and 1 both mean off): the
    values of tables/savers.yaml below the model's depth, from the fastest down."""
    ns = [n for n in (int(x) for x in saver.coefficients["every_n_layers"]) if n < arch.num_layers]
    return {"on": ns or [2], "auto": [0] + ns}.get(mode, [0])


_CKPT_OFFLOAD = "checkpointed layer inputs"  # the offloads move the same tensors: at most one of them

SAVERS: dict[str, Saver] = {s.name: s for s in (
    Saver("layer_checkpointing", needs_checkpointing=True, applies=_always, reshape=_every_n, gpu_terms=_no_terms,
          host_terms=_no_host_terms, extra_seconds=_no_seconds, excludes=None, needs_cuda=False, library=None,
          install=None, chosen_automatically=True, settings=_every_n_values),
    Saver("offload_checkpoints", needs_checkpointing=True, applies=_device_only, reshape=_offloaded,
          gpu_terms=_offload_terms, host_terms=_pinned_terms, extra_seconds=_copy_seconds, excludes=_CKPT_OFFLOAD,
          needs_cuda=True, library=None, install=None, chosen_automatically=True, settings=_on_off),
    Saver("offload_activations", needs_checkpointing=True, applies=_device_only, reshape=_offloaded,
          gpu_terms=_offload_terms, host_terms=_pinned_terms, extra_seconds=_copy_seconds, excludes=_CKPT_OFFLOAD,
          needs_cuda=True, library=None, install=None, chosen_automatically=True, settings=_on_off),
    Saver("mlp_tiling", needs_checkpointing=False, applies=_dense_gated_mlp, reshape=_tiled,
          gpu_terms=_mlp_tile_terms, host_terms=_no_host_terms, extra_seconds=_no_seconds, excludes=None,
          needs_cuda=True, library="liger_kernel", install="pip install liger-kernel", chosen_automatically=True,
          settings=_on_off),
    Saver("padding_free", needs_checkpointing=False, applies=_flash_attention, reshape=_unchanged, gpu_terms=_no_terms,
          host_terms=_no_host_terms, extra_seconds=_no_seconds, excludes=None, needs_cuda=True, library="flash_attn",
          install="pip install flash-attn", chosen_automatically=False,
          settings=_on_off),
)}
assert tuple(SAVERS) == O.SAVERS, "tables/savers.yaml and the table must list the same savers, in the same order"
NONE = SaverSet()


def conflict(names) -> Optional[str]:
    """Two savers of one `excludes` group, in one line; None when the names can be on together."""
    seen: dict[str, str] = {}
    for n in names:
        group = SAVERS[n].excludes
        if group and group in seen:
            return f"{seen[group]} and {n} offload the same tensors ({group}): set one of them"
        if group:
            seen[group] = n
    return None


def cli_name(name: str) -> str:
    return name.replace("_", "-")


def apply(shape: M.Shape, arch: Architecture, savers: SaverSet) -> M.Shape:
    """The shape with the savers' effects on the memory terms."""
    if savers == NONE:
        return shape
    out = dataclasses.replace(shape, every_n_layers=1, checkpoints_offloaded=False, offload_resident_inputs=0,
                              mlp_tile_tokens=0)
    for name in savers.names:
        out = SAVERS[name].reshape(out, arch, savers, name)
    return out


def gpu_terms(arch: Architecture, shape: M.Shape, savers: SaverSet) -> list[M.Term]:
    out: list[M.Term] = []
    for name in savers.names:
        out += SAVERS[name].gpu_terms(arch, shape)
    return out


def host_terms(arch: Architecture, shape: M.Shape, savers: SaverSet, processes: int) -> list[M.Term]:
    """Host memory the savers take on the machine (pinned): per process, times the processes sharing the host."""
    out: list[M.Term] = []
    for name in savers.names:
        out += SAVERS[name].host_terms(arch, shape, processes)
    return out


# ---------------------------------------------------------------------------------------------------------
# speed


def seconds_per_token(arch: Architecture, shape: M.Shape, savers: SaverSet, peak_tflops: Optional[float]) -> float:
    """Time per token on one GPU: the FLOP model (planner.throughput, with the recompute of partial checkpointing
    and the MLP tiling's extra forward) plus what each saver adds (the offloads' copies over the host link).
    Without a known peak, the nominal one orders savers."""
    peak = peak_tflops or float(table()["nominal_peak_tflops"])
    compute = 1.0 / TP.tokens_per_second(arch, shape, peak)
    return compute + sum(SAVERS[n].extra_seconds(arch, shape, compute, n) for n in savers.names)


def tokens_per_second(arch: Architecture, shape: M.Shape, savers: SaverSet,
                      peak_tflops: Optional[float]) -> Optional[float]:
    """Expected tokens/s per GPU with the savers; None when the card's peak is unknown (as planner.throughput)."""
    if not peak_tflops:
        return None
    return 1.0 / seconds_per_token(arch, shape, savers, peak_tflops)


# ---------------------------------------------------------------------------------------------------------
# the candidates a request allows


def forced(modes: dict[str, str]) -> SaverSet:
    """The savers the request turns on (`--savers NAME=on`), as a set; layer_checkpointing on starts at every 2."""
    return SaverSet.of(*(n for n in SAVERS if modes.get(n) == "on"), every_n_layers=2)


def allowed(modes: dict[str, str], arch: Architecture, hw: Hardware) -> dict[str, str]:
    """The modes with every auto saver that does not apply to this model and card turned off."""
    return {n: ("off" if m == "auto" and SAVERS[n].applies(arch, hw) else m) for n, m in modes.items()}


def candidate_sets(modes: dict[str, str], arch: Architecture, hw: Hardware) -> list[SaverSet]:
    """Every saver set the modes allow on this model and card (on: always in; auto: in or out; off: out), in the
    table's order; a saver whose group another saver forced on stays out."""
    modes = allowed(modes, arch, hw)
    forced_groups = {SAVERS[n].excludes for n, m in modes.items() if m == "on" and SAVERS[n].excludes}
    sets: list[tuple[frozenset[str], int]] = [(frozenset(), 1)]
    for name, saver in SAVERS.items():
        mode = modes[name]
        if mode == "auto" and saver.excludes in forced_groups:
            mode = "off"
        grown = []
        for on, every in sets:
            for setting in saver.settings(saver, mode, arch):
                if not setting:
                    grown.append((on, every))
                elif not conflict(on | {name}):  # the one setting a set holds is layer_checkpointing's
                    grown.append((on | {name}, setting if saver.settings is _every_n_values else every))
        sets = grown
    return [SaverSet(on, every) for on, every in sets]


def needs_checkpointing(savers: SaverSet) -> bool:
    return any(SAVERS[n].needs_checkpointing for n in savers.names)


def unmet_requirements(names, cuda_available: bool, has_module: Callable[[str], bool]) -> Optional[str]:
    """Why this machine cannot apply the plan's savers, in one line; None when it can. `run` calls it before
    writing anything, with torch.cuda.is_available() and an importlib check."""
    for name in names:
        s = SAVERS[name]
        if s.needs_cuda and not cuda_available:
            return (f"the plan's saver {name} needs a CUDA GPU and this machine has none: plan again without it "
                    f"(--savers no-{cli_name(name)})")
        if s.library and not has_module(s.library):
            return (f"the plan's saver {name} needs {s.library}, which is not installed: {s.install}, or plan again "
                    f"without it (--savers no-{cli_name(name)})")
    return None
