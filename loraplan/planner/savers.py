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
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional

from . import memory as M
from . import options as O
from . import throughput as TP
from .architecture import Architecture
from .plan import Hardware

GIB = 2**30
OFFLOADS = ("offload_checkpoints", "offload_activations")


@functools.lru_cache(maxsize=1)
def table() -> dict:
    """tables/savers.yaml: the savers' coefficients and sources."""
    from .catalog import load_table

    return load_table("savers.yaml")


def host_pinned_share() -> float:
    return float(table()["host"]["pinned_share"])


def host_link_bytes_per_s() -> float:
    return float(table()["host"]["link_gbs"]) * 1e9


@dataclass(frozen=True)
class SaverSet:
    """Which savers a configuration uses. The default is none: the plan without savers."""

    every_n_layers: int = 1  # layer_checkpointing when > 1
    offload: Optional[str] = None  # offload_checkpoints | offload_activations | None
    mlp_tiling: bool = False
    padding_free: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        on = {"layer_checkpointing": self.every_n_layers > 1, "offload_checkpoints": self.offload == OFFLOADS[0],
              "offload_activations": self.offload == OFFLOADS[1], "mlp_tiling": self.mlp_tiling,
              "padding_free": self.padding_free}
        return tuple(n for n in O.SAVERS if on[n])

    def without(self, name: str) -> "SaverSet":
        if name == "layer_checkpointing":
            return dataclasses.replace(self, every_n_layers=1)
        if name in OFFLOADS:
            return dataclasses.replace(self, offload=None)
        return dataclasses.replace(self, **{name: False})

    def describe(self) -> str:
        parts = []
        for n in self.names:
            parts.append(f"layer_checkpointing (every {self.every_n_layers} layers)" if n == "layer_checkpointing" else n)
        return ", ".join(parts) or "none"


NONE = SaverSet()


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


# ---------------------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Saver:
    name: str
    summary: str  # what it does, in a line
    needs_checkpointing: bool
    applies: Callable[[Architecture, Hardware], Optional[str]]
    gpu_terms: Callable[[Architecture, M.Shape], list[M.Term]]  # terms it adds to each GPU's budget
    needs_cuda: bool  # `run` refuses it on a machine without a CUDA device
    library: Optional[str]  # an import `run` needs beyond the [run] extra
    install: Optional[str]
    chosen_automatically: bool  # False: only `--savers NAME=on` adds it (it changes no planned memory)

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


SAVERS: dict[str, Saver] = {s.name: s for s in (
    Saver("layer_checkpointing", "checkpoint every n-th decoder layer only; the others keep their activations",
          True, _always, _no_terms, False, None, None, True),
    Saver("offload_checkpoints", "checkpointed layer inputs in pinned host memory (blocking copies)",
          True, _device_only, _offload_terms, True, None, None, True),
    Saver("offload_activations", "checkpointed layer inputs in pinned host memory (copies on a second stream)",
          True, _device_only, _offload_terms, True, None, None, True),
    Saver("mlp_tiling", "the MLP over the sequence in tiles, recomputed in the backward",
          False, _dense_gated_mlp, _mlp_tile_terms, True, "liger_kernel", "pip install liger-kernel", True),
    Saver("padding_free", "rows packed without padding (flash-attention's variable-length kernel)",
          False, _flash_attention, _no_terms, True, "flash_attn", "pip install flash-attn", False),
)}
assert tuple(SAVERS) == O.SAVERS, "planner.options.SAVERS and the table must list the same savers"


def cli_name(name: str) -> str:
    return name.replace("_", "-")


def apply(shape: M.Shape, arch: Architecture, savers: SaverSet) -> M.Shape:
    """The shape with the savers' effects on the memory terms."""
    if savers == NONE:
        return shape
    resident = int(SAVERS[savers.offload].coefficients["resident_inputs"]) if savers.offload else 0
    tile = 0
    if savers.mlp_tiling:
        shards = max(1, math.ceil(shape.seq_len / arch.hidden_size))  # Liger's default num_shards
        tile = shape.micro_batch_size * math.ceil(shape.seq_len / shards)
    return dataclasses.replace(shape, every_n_layers=savers.every_n_layers,
                               checkpoints_offloaded=savers.offload is not None, offload_resident_inputs=resident,
                               mlp_tile_tokens=tile)


def gpu_terms(arch: Architecture, shape: M.Shape, savers: SaverSet) -> list[M.Term]:
    out: list[M.Term] = []
    for name in savers.names:
        out += SAVERS[name].gpu_terms(arch, shape)
    return out


def host_terms(arch: Architecture, shape: M.Shape, savers: SaverSet, processes: int) -> list[M.Term]:
    """Pinned host memory the savers take on the machine: per process, times the processes sharing the host."""
    if not savers.offload:
        return []
    per = pinned_host_bytes(arch, shape)
    where = f" x {processes} processes" if processes > 1 else ""
    return [M.Term("pinned_checkpoints", per * processes, f"ceil(L/n) x 2^ceil(log2(dtype x h x T)){where}", "host")]


# ---------------------------------------------------------------------------------------------------------
# speed


def seconds_per_token(arch: Architecture, shape: M.Shape, savers: SaverSet, peak_tflops: Optional[float]) -> float:
    """Time per token on one GPU: the FLOP model (planner.throughput, with the recompute of partial checkpointing
    and the MLP tiling's extra forward) plus the offload's copies over the host link:
    blocking copies add 2 x transfer / link; copies on a second stream add only what exceeds the compute they
    overlap, plus a cited overhead (tables/savers.yaml). Without a known peak, the nominal one orders savers."""
    peak = peak_tflops or float(table()["nominal_peak_tflops"])
    compute = 1.0 / TP.tokens_per_second(arch, shape, peak)
    if not savers.offload:
        return compute
    copy = 2 * transfer_bytes_per_token(arch, shape) / host_link_bytes_per_s()
    c = SAVERS[savers.offload].coefficients
    if c.get("overlap"):
        return compute + max(0.0, copy - compute) + float(c.get("async_overhead", 0.0)) * compute
    return compute + copy


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
    offload = next((n for n in OFFLOADS if modes.get(n) == "on"), None)
    return SaverSet(every_n_layers=2 if modes.get("layer_checkpointing") == "on" else 1, offload=offload,
                    mlp_tiling=modes.get("mlp_tiling") == "on", padding_free=modes.get("padding_free") == "on")


def allowed(modes: dict[str, str], arch: Architecture, hw: Hardware) -> dict[str, str]:
    """The modes with every auto saver that does not apply to this model and card turned off."""
    return {n: ("off" if m == "auto" and SAVERS[n].applies(arch, hw) else m) for n, m in modes.items()}


def candidate_sets(modes: dict[str, str], arch: Architecture, hw: Hardware) -> list[SaverSet]:
    """Every saver set the modes allow on this model and card (on: always in; auto: in or out; off: out)."""
    modes = allowed(modes, arch, hw)

    def choices(name: str) -> list:
        m = modes[name]
        auto = m == "auto" and SAVERS[name].chosen_automatically
        return [m == "on"] if not auto else [False, True]

    ns = [int(n) for n in table()["savers"]["layer_checkpointing"]["every_n_layers"]]
    if modes["layer_checkpointing"] == "on":
        every = [n for n in ns if n < arch.num_layers] or [2]
    elif modes["layer_checkpointing"] == "auto":
        every = [1] + [n for n in ns if n < arch.num_layers]
    else:
        every = [1]
    offloads: list[Optional[str]] = [n for n in OFFLOADS if modes[n] == "on"]
    if not offloads:
        offloads = [None] + [n for n in OFFLOADS if modes[n] == "auto"]
    out = []
    for n in every:
        for off in offloads:
            for tile in choices("mlp_tiling"):
                for pf in choices("padding_free"):
                    out.append(SaverSet(every_n_layers=n, offload=off, mlp_tiling=tile, padding_free=pf))
    return out


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
