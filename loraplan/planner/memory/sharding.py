"""Per-rank memory of fully sharded data parallel training (torch FSDP2 through accelerate), as named terms.

What each rank holds is read from the code that builds it (accelerate 1.15 `utils/fsdp_utils.py::
fsdp2_prepare_model`, torch 2.13 `torch/distributed/fsdp/_fully_shard`):
- every decoder layer is its own `fully_shard` unit (wrapped by its class); the input embeddings are a unit; the
  final norm and the LM head (with the embeddings when tied) form a "tail" unit that accelerate shards with
  `reshard_after_forward=False`, so it stays gathered from the end of the forward through the start of the
  backward; the root (the model) takes what is left;
- parameters, their gradients and the optimizer states are sharded over the N ranks (dim-0 shards);
- while a unit computes, its parameters are all-gathered (unsharded); FSDP2 prefetches the next unit in the forward
  and in the backward, so two decoder layers are unsharded at a time;
- in the backward the unit's unsharded gradients exist until they are reduce-scattered into the shards, through a
  reduce-scatter input buffer of the same size.
Activations and the loss are per micro-batch, as without sharding (planner.memory.terms).

Symbols: N ranks (GPUs over all nodes), L layers, W_layer the bytes of one decoder layer's weights as stored (dtype,
or 0.5 B/param NF4 packed in a `bnb_4bit_quant_storage` = dtype tensor), P trainable parameters, P_layer = P / L.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from ..architecture.types import Architecture
from ..facts.options import DTYPE_BYTES
from .terms import MicroStep, Term, adapter_bytes_per_param, base_weights_bytes

# FSDP2 keeps the unit computing and the one it prefetches unsharded: torch's implicit forward/backward prefetch.
UNSHARDED_LAYERS = 2
SHARDED_GROUPS = ("weights", "adapter")


def layer_weight_bytes(arch: Architecture, shape: MicroStep) -> float:
    """One decoder layer's weights as FSDP gathers them: (projection weights + per-layer norms) / L, in the stored
    dtype (0.5 B/param for NF4 projections under QLoRA)."""
    dt = DTYPE_BYTES[shape.dtype]
    per_layer_norms = arch.norm_params - arch.hidden_size  # all but the final norm
    return (base_weights_bytes(arch, shape) + dt * max(per_layer_norms, 0)) / arch.num_layers


def tail_bytes(arch: Architecture, shape: MicroStep) -> float:
    """The tail unit (final norm + LM head, plus the embeddings when tied), whole: dtype x its parameters."""
    dt = DTYPE_BYTES[shape.dtype]
    head = arch.lm_head_params if not arch.tie_word_embeddings else arch.embedding_params
    return dt * (head + arch.hidden_size)


def sharded(term: Term, world: int) -> Term:
    """A weight or adapter term divided over the N ranks: each holds a 1/N shard."""
    return replace(term, name=f"{term.name}_shard", bytes=term.bytes / world, formula=f"({term.formula}) / N")


def gathered_layers_bytes(arch: Architecture, shape: MicroStep) -> float:
    """The decoder layers unsharded at once (computing + prefetched): 2 x W_layer."""
    return UNSHARDED_LAYERS * layer_weight_bytes(arch, shape)


def gathered_tail_bytes(arch: Architecture, shape: MicroStep, world: int, offload: bool = False) -> float:
    """The tail unit kept gathered through the turn from forward to backward, beyond its own shard on the GPU:
    (1 - 1/N) x tail bytes; with CPU offload the shard itself is on the host, so the whole tail: 1 x tail bytes."""
    return (1.0 if offload else 1 - 1 / world) * tail_bytes(arch, shape)


def gradient_bytes_per_param(shape: MicroStep) -> float:
    """Bytes per LoRA parameter of FSDP2's unsharded gradients and of what it all-gathers and reduce-scatters, g.

    On a GPU `run`'s accelerate config says `mixed_precision: bf16`, and accelerate (`set_mixed_precision`) gives FSDP2
    `MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)`: each unit's parameters are cast to the training
    dtype before the all-gather (torch `_fsdp_param.py` `all_gather_inputs`), so the gradients are computed in it, and
    the reduce-scatter runs in it (`_fsdp_collectives.py` `foreach_reduce`, reduce_dtype) before the result is cast
    back to the shards' own dtype: g = dtype bytes (2 in bf16), also for peft's fp32 adapters. On the CPU `run` sets
    no policy: g = the adapters' own bytes (planner.memory.terms.adapter_bytes_per_param)."""
    if shape.device == "cuda":
        return float(DTYPE_BYTES[shape.dtype])
    return adapter_bytes_per_param(shape)


def layer_gradients_bytes(p: int, arch: Architecture, bytes_per_param: float) -> float:
    """The unsharded LoRA gradients of the layers in the backward (computing + prefetched), g bytes each
    (gradient_bytes_per_param): 2 x g x P_layer."""
    return UNSHARDED_LAYERS * bytes_per_param * p / arch.num_layers


def reduce_scatter_bytes(p: int, arch: Architecture, bytes_per_param: float) -> float:
    """The reduce-scatter input buffer of one layer's gradients, in the reduce dtype: g x P_layer."""
    return bytes_per_param * p / arch.num_layers


def fsdp_terms(terms: Sequence[Term], arch: Architecture, p: int, shape: MicroStep, world: int,
               offload: bool) -> list[Term]:
    """The single-GPU terms turned into one FSDP rank's: weights and adapter states sharded (on the host with
    offload), the gathered units and gradient buffers added after them, the rest (activations, loss, runtime) as is.
    NF4 quantization constants are not parameters (they ride on each Params4bit as its quant_state) and are
    planned whole on every rank, unsharded."""
    out: list[Term] = []
    for t in terms:
        if t.group in SHARDED_GROUPS and t.name != "quant_constants":
            s = sharded(t, world)
            out.append(replace(s, device="host") if offload else s)
        else:
            out.append(t)
        if t.name == "optimizer_states":
            g = gradient_bytes_per_param(shape)
            out += [
                Term("gathered_layers", gathered_layers_bytes(arch, shape), f"{UNSHARDED_LAYERS} x W_layer", "sharding"),
                Term("gathered_tail", gathered_tail_bytes(arch, shape, world, offload),
                     ("1" if offload else "(1 - 1/N)") + " x dtype x (lm_head + norm)", "sharding"),
                Term("layer_gradients", layer_gradients_bytes(p, arch, g), f"{UNSHARDED_LAYERS} x {g:g} B x P / L",
                     "sharding"),
                Term("reduce_scatter", reduce_scatter_bytes(p, arch, g), f"{g:g} B x P / L", "sharding"),
            ]
    return out
