"""The memory terms of the Unsloth backend: what its GPU path holds at the peak, term by term, each from its source.

Read in the installed source of unsloth and unsloth_zoo 2026.10.9 (site-packages; file:line at that version):

    offloaded_checkpoints  unsloth_zoo/gradient_checkpointing.py:1390-1408, 1325-1331
    copy_back_buffers      unsloth_zoo/gradient_checkpointing.py:1305-1313, 1428-1445, 1470-1497; :67 (headroom)
    chunked_loss           unsloth_zoo/fused_losses/cross_entropy_loss.py:225-229, 246-252, 260-300, 366-393;
                           unsloth_zoo/tiled_mlp.py:91-94; unsloth/models/llama.py:2122
    activations            unsloth/kernels/fast_lora.py:86, 416-448, 800-845, 1049-1073 (what the fused kernels
                           save); unsloth/models/llama.py:5333-5337 (when they replace peft's forward)
    dequantize_buffer      unsloth/kernels/utils.py:974-975, 1788 (one scratch weight per device)
    pinned host memory     unsloth_zoo/gradient_checkpointing.py:64-66 (pool), 197-216 (power-of-two blocks),
                           1453-1467 (one slot per offloaded layer)

Pure arithmetic on planner.memory.terms's MicroStep and Term; nothing here imports torch. The weights, the adapter (Unsloth
upcasts the trainable LoRA parameters to fp32: unsloth_zoo/training_utils.py:449-454, as the standard budget already
counts 4 B x P), the optimizer states, misc and the CUDA context are the standard budget's terms, kept as they are.

Symbols as in planner/memory/terms.py: T = micro_batch x seq_len, L layers, h hidden, kv = kv heads x head_dim, i
intermediate, V vocabulary; dt = bytes of the compute dtype (2 for bf16).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from ..architecture.types import Architecture
from ..facts.options import DTYPE_BYTES
from .coefficients import coefficients
from .step import GIB, MicroStep, Term

MIB = 2**20

# unsloth_zoo/gradient_checkpointing.py
MINIMUM_OFFLOAD_BYTES = 2 * MIB  # :1326 MINIMUM_SIZE: a layer input this size or smaller is not offloaded
HOST_POOL_BUFFERS = 200  # :66 INITIAL_CPU_BUFFER_COUNT
HOST_POOL_NUMEL = 128 * 1024  # :64 INITIAL_CPU_BUFFER_SIZE, elements of the compute dtype
DOUBLE_BUFFER_HEADROOM = 512 * MIB  # :67 the second copy-back buffer needs this much free after the first step
# unsloth_zoo/fused_losses/cross_entropy_loss.py
CE_BYTES_PER_LOGIT = 16.0  # :225 fp32 logits + upcast + saved log-softmax + gradient
CE_TARGET_CAP = 4 * GIB  # :229 the chunk target never exceeds 4 GiB; else half the free memory (tiled_mlp.py:94)


def _pow2_ceil(n: float) -> int:
    """torch's CachingHostAllocator block for n bytes: the next power of two (unsloth_zoo/gradient_checkpointing.py
    :214-216 `_pinned_block_bytes`, which mirrors aten's PowerOf2Ceil)."""
    n = int(math.ceil(n))
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def layer_input_bytes(arch: Architecture, shape: MicroStep) -> float:
    """One decoder layer's input hidden states: dt x h x T."""
    return DTYPE_BYTES[shape.dtype] * arch.hidden_size * shape.tokens


def offloaded_layers(arch: Architecture, shape: MicroStep) -> int:
    """Layers whose input goes to pinned host memory: all but the last (gradient_checkpointing.py:1390-1408: the
    first step counts the layers, LAST_GC_INDEX, and later steps keep the last one on the GPU), and none when one
    input is at most 2 MiB (MINIMUM_SIZE, :1326) or checkpointing is off."""
    if not shape.grad_checkpointing or layer_input_bytes(arch, shape) <= MINIMUM_OFFLOAD_BYTES:
        return 0
    return max(arch.num_layers - 1, 0)


def offloaded_checkpoints_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Checkpointed inputs left on the GPU under use_gradient_checkpointing="unsloth": (L - offloaded) x dt x h x T,
    which is the last layer's input alone once inputs exceed 2 MiB (offloaded_layers). Unsloth's own checkpoint
    function saves only the layer input (UnslothCheckpointFunction), so the standard model's fitted c_ckpt, measured
    on torch's checkpoint, is not carried over."""
    if not shape.grad_checkpointing:
        return 0.0
    return (arch.num_layers - offloaded_layers(arch, shape)) * layer_input_bytes(arch, shape)


def copy_back_buffers(arch: Architecture, shape: MicroStep, free_after_first_step: Optional[float] = None) -> int:
    """GPU staging buffers the offloaded inputs come back through, each dt x h x T: GPU_BUFFERS, plus GPU_BUFFERS_B
    when double buffering switches on after the first step, which it does only when more than 512 MiB are free
    then (gradient_checkpointing.py:1305-1313, 1428-1445). Unknown free memory: two (the larger)."""
    if offloaded_layers(arch, shape) == 0:
        return 0
    if free_after_first_step is not None and free_after_first_step <= DOUBLE_BUFFER_HEADROOM:
        return 1
    return 2


def copy_back_bytes(arch: Architecture, shape: MicroStep, free_after_first_step: Optional[float] = None) -> float:
    """k x dt x h x T, k = copy_back_buffers (1 or 2)."""
    return copy_back_buffers(arch, shape, free_after_first_step) * layer_input_bytes(arch, shape)


def loss_target_bytes(free_at_first_loss: Optional[float]) -> float:
    """The chunked loss's budget: min(4 GiB, half the free memory), read once, at the first call
    (cross_entropy_loss.py:229, 246-257 `_measured_target_gb` is functools.cache'd; tiled_mlp.py:91-94)."""
    if free_at_first_loss is None:
        return CE_TARGET_CAP
    return max(min(CE_TARGET_CAP, 0.5 * free_at_first_loss), 0.0)


def loss_chunks(arch: Architecture, shape: MicroStep, target: float) -> int:
    """How many chunks the T rows are cut into (cross_entropy_loss.py:260-300 `get_chunk_size`): the fixed
    allocation, the bf16 gradient of the hidden states (dt x h x T, :366-387), comes out of the target first when it
    is smaller; then n = ceil(16 x T x V / target / 4) x 4 (multiples of 4), or 1 when one chunk fits; at most T."""
    t, v = shape.tokens, arch.vocab_size
    fixed = DTYPE_BYTES[shape.dtype] * arch.hidden_size * t
    if 0 < fixed < target:
        target -= fixed
    if target <= 0:
        return t
    exact = t * v * CE_BYTES_PER_LOGIT / target
    if exact <= 1.0 + 1e-9:
        return 1
    return min(math.ceil(exact / 4 - 1e-9) * 4, t)


def chunked_loss_bytes(arch: Architecture, shape: MicroStep, free_at_first_loss: Optional[float] = None) -> float:
    """Unsloth's chunked cross-entropy (unsloth/models/llama.py:2122 calls unsloth_fused_ce_loss): the gradient of
    the hidden states, computed in the forward and kept for the backward, dt x h x T, plus one chunk's fp32
    transient, 16 B x (T / n) x V with n = loss_chunks; the logits never exist whole."""
    target = loss_target_bytes(free_at_first_loss)
    n = loss_chunks(arch, shape, target)
    return DTYPE_BYTES[shape.dtype] * arch.hidden_size * shape.tokens + CE_BYTES_PER_LOGIT * shape.tokens * arch.vocab_size / n


def fused_layer_bytes_per_token(arch: Architecture, dropout: bool) -> float:
    """What one decoder layer saves for backward per token when Unsloth's fused LoRA kernels run it (derived from
    the save_for_backward calls, not fitted): the two RMSNorms' inputs and outputs (fast_rms_layernorm saves its
    input, rms_layernorm.py:981; QKV and MLP save the normed input, fast_lora.py:448, 845): 4 x 2h; attention's q
    and output (2h each) and k, v (2 kv each); the MLP's gate and up outputs e, g (2i each, fast_lora.py:448):

        12 h + 4 kv + 4 i   (dropout 0)

    With dropout > 0 the kernels draw it themselves (UNSLOTH_FUSED_LORA_DROPOUT, on by default, fast_lora.py:86) and
    save only a bool mask per dropped input, 1 B per element: q, k, v, o, gate, up (h each) and down (i):

        18 h + 4 kv + 5 i   (dropout > 0)
    """
    h, kv, i = arch.hidden_size, arch.kv_dim, arch.intermediate_size
    if arch.is_moe:
        i = arch.experts_per_token * arch.moe_intermediate_size
    x = 12 * h + 4 * kv + 4 * i
    if dropout:
        x += 6 * h + i
    return x


def fused_kernels_apply(arch: Architecture, bias: str = "none", own_model: bool = True) -> Optional[str]:
    """None when Unsloth replaces peft's forward by its fused kernels for this model (llama.py:5333-5337: bias "none",
    16-bit or 4-bit base weights, no FSDP1 wrap; fast_lora.py:86: dropout runs inside them), else why not.
    own_model False: a family FastLanguageModel delegates to FastModel (loader.py:1861), whose LoRA layers keep
    peft's forward."""
    if not own_model:
        return f"{arch.family} is delegated to Unsloth's FastModel, which keeps peft's LoRA forward"
    if bias != "none":
        return f"bias {bias!r}: Unsloth fuses LoRA only with bias 'none'"
    if any(p.bias_params for p in arch.projections):
        return f"{arch.family} has projection biases, which the fused kernels do not take"
    if arch.is_moe:
        return "MoE experts are not run by the fused LoRA kernels"
    return None


def activations_bytes(arch: Architecture, shape: MicroStep, fused: bool, dropout: bool) -> float:
    """The one layer recomputed at a time in the backward (checkpointing on) or every layer (off), with the
    standard model's fitted scales, since no Unsloth measurement exists yet:
        fused kernels:    (s + s_rc) x X_u x T        (s x X_u x L x T without checkpointing)
        peft's forward:   the standard term (planner.memory.terms.activations_bytes), passed in by unsloth_budget
    X_u = fused_layer_bytes_per_token; s_rc = recompute_scale; s = fused_activation_scale (trl's recompute frame)
    with checkpointing, activation_scale without it (the one scale of a forward's saved tensors, trl's or not:
    planner.memory.terms._activations_device_bytes).
    Assumption to measure: these scales were fitted on peft's forward, not on Unsloth's kernels."""
    f = coefficients().fitted
    x = fused_layer_bytes_per_token(arch, dropout) if fused else 0.0
    if shape.grad_checkpointing:
        return (f.fused_activation_scale + f.recompute_scale) * x * shape.tokens
    return f.activation_scale * x * arch.num_layers * shape.tokens


def dequantize_buffer_bytes(arch: Architecture, shape: MicroStep) -> float:
    """QLoRA's fused kernels dequantize each NF4 weight into one scratch buffer per device, reused and sized to the
    largest (unsloth/kernels/utils.py:974-975, 1788): dt x the largest quantized projection's parameters."""
    if shape.method != "qlora":
        return 0.0
    return DTYPE_BYTES[shape.dtype] * arch.largest_projection_params(quantizable_only=True)


def pinned_host_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Pinned host memory one process holds: the initial pool, 200 buffers of 128 Ki elements (50 MiB in bf16,
    gradient_checkpointing.py:64-66, 1293-1298), which stays cached once the per-layer slots grow past it, plus one
    slot per layer the first step offloads (all L: the last is recognised only then, :1390-1398), each a
    power-of-two block (:197-216):
        200 x 2^ceil(log2(dt x 128 Ki)) + L x 2^ceil(log2(dt x h x T))."""
    if not shape.grad_checkpointing:
        return 0.0
    dt = DTYPE_BYTES[shape.dtype]
    pool = HOST_POOL_BUFFERS * _pow2_ceil(dt * HOST_POOL_NUMEL)
    if offloaded_layers(arch, shape) == 0:
        return float(pool)
    return float(pool + arch.num_layers * _pow2_ceil(layer_input_bytes(arch, shape)))


def dropout_mask_bytes(arch: Architecture, shape: MicroStep, bias: str = "none", own_model: bool = True) -> float:
    """What a LoRA dropout above 0 adds under Unsloth's fused kernels: the bool masks they save, 1 B per dropped
    element, (6h + i) x T for the layer recomputed at a time, (1 - rho_act) of it counted as activations and the rest
    as the allocator's share (the difference of activations_bytes with and without dropout). 0 where the kernels do
    not run (peft's forward then keeps its own dropout outputs, which the standard term already counts)."""
    if fused_kernels_apply(arch, bias, own_model) is not None:
        return 0.0
    return activations_bytes(arch, shape, True, True) - activations_bytes(arch, shape, True, False)


def unsloth_host_terms(arch: Architecture, shape: MicroStep, processes: int = 1) -> list[Term]:
    """Pinned host memory on the machine under Unsloth's checkpointing: per process, times the processes."""
    per = pinned_host_bytes(arch, shape)
    if not per:
        return []
    where = f" x {processes} processes" if processes > 1 else ""
    return [Term("pinned_checkpoints", per * processes,
                 f"200 x 2^ceil(log2(dt x 128Ki)) + L x 2^ceil(log2(dt x h x T)){where}", "host", device="host")]


_REPLACED = ("checkpointed_inputs", "activations", "fused_loss", "logits", "allocator_reserve")


def unsloth_budget(arch: Architecture, shape: MicroStep, base_terms: Sequence[Term], dropout: float = 0.0,
                   bias: str = "none", card_bytes: Optional[float] = None, own_model: bool = True) -> list[Term]:
    """The standard budget (planner.memory.terms.budget, BASE_TERMS) turned into Unsloth's: the weights, adapter,
    optimizer, misc and CUDA context stay; the checkpointed inputs, activations, loss and allocator reserve are
    replaced by the terms above, in the same report order.

    card_bytes (the card's memory) sets what Unsloth measures at run time: the free memory at the first loss call
    (the card less everything else but the optimizer states, which AdamW allocates at the first step, after it)
    and after the first step (double buffering). None: the 4 GiB cap and two copy-back buffers.
    The allocator reserve keeps the standard model's fitted shares of the loss and activations (rho_loss, rho_act)."""
    by_name = {t.name: t for t in base_terms}
    fused = fused_kernels_apply(arch, bias, own_model) is None
    if fused:
        act = activations_bytes(arch, shape, True, dropout > 0)
        act_formula = ("(s + s_rc) x X_u x T" if shape.grad_checkpointing else "s x X_u x L x T") + (
            "; X_u = 18h + 4kv + 5i (fused, dropout masks)" if dropout > 0 else "; X_u = 12h + 4kv + 4i (fused)")
    else:
        std = by_name.get("activations")
        act = std.bytes / (1 - coefficients().fitted.reserve_share_of_activations) if std else 0.0
        act_formula = "the standard term (peft's forward: " + str(fused_kernels_apply(arch, bias, own_model)) + ")"
    rho = coefficients().fitted
    kept_terms = [t for t in base_terms if t.name not in _REPLACED]
    before_loss = [t for t in kept_terms if t.group in ("weights", "adapter") and t.name != "optimizer_states"]
    gpu_ckpt = offloaded_checkpoints_bytes(arch, shape)
    dq = dequantize_buffer_bytes(arch, shape) if fused else 0.0
    free_first_loss = free_first_step = None
    if card_bytes is not None:
        held = sum(t.bytes for t in before_loss) + by_name.get("cuda_context", Term("", 0, "", "")).bytes
        held += by_name.get("misc", Term("", 0, "", "")).bytes + gpu_ckpt + dq + (1 - rho.reserve_share_of_activations) * act
        free_first_loss = card_bytes - held
        free_first_step = free_first_loss - by_name.get("optimizer_states", Term("", 0, "", "")).bytes
    loss = chunked_loss_bytes(arch, shape, free_first_loss)
    cb = copy_back_bytes(arch, shape, free_first_step)
    new: list[Term] = []
    for t in kept_terms:
        new.append(t)
        if t.name == "optimizer_states":
            if shape.grad_checkpointing:
                kept = arch.num_layers - offloaded_layers(arch, shape)
                new.append(Term("offloaded_checkpoints", gpu_ckpt, f"{kept} x dt x h x T (the rest in pinned host memory)",
                                "activations"))
                new.append(Term("copy_back_buffers", cb, f"{copy_back_buffers(arch, shape, free_first_step)} x dt x h x T",
                                "activations"))
            new.append(Term("activations", (1 - rho.reserve_share_of_activations) * act, "(1-rho) " + act_formula,
                            "activations"))
            if dq:
                new.append(Term("dequantize_buffer", dq, "dt x largest quantized projection", "activations"))
            target = loss_target_bytes(free_first_loss)
            n = loss_chunks(arch, shape, target)
            new.append(Term("chunked_loss", (1 - rho.reserve_share_of_loss) * loss,
                            f"(1-rho) (dt x h x T + 16 B x T x V / {n}); target min(4 GiB, free/2) = {target / GIB:.2f} GiB",
                            "loss"))
    if shape.device == "cuda":
        reserve = rho.reserve_share_of_loss * loss + rho.reserve_share_of_activations * act
        idx = next((k for k, t in enumerate(new) if t.name == "cuda_context"), len(new))
        new.insert(idx, Term("allocator_reserve", reserve, "rho_loss x loss + rho_act x activations", "runtime"))
    return new
