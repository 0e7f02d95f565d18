"""The memory model: the peak memory one GPU shows (what nvidia-smi reports) while training, as a sum of terms.

Each term is a small function with its formula in the docstring; `budget()` returns them in report order, as
`Term`s of a `MicroStep` (both defined in planner.memory.step). Throughput (FLOPs per token,
tokens/s) is planner.speed.throughput.
Symbols: T = micro_batch x seq_len tokens per step on one GPU, L layers, h hidden size, kv = kv heads x
head_dim, i intermediate size (for MoE: experts_per_token x expert size), V vocabulary, P trainable (LoRA)
parameters. Bytes throughout; GiB = 2**30 bytes.

The structure is derived from what the training step holds at its peak (see docs/memory-model.md). A few
coefficients that the derivation cannot pin down (how much of the per-layer working set the kernels really
keep, the fused loss's buffers, the caching allocator's fragmentation) are fitted by
`benchmarks/fit_memory.py` on the measured H200 rows in shared/calibration and stored, with that source, in
`tables/memory.yaml`. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from ..architecture.targets import TargetSelection, trainable_params
from ..architecture.types import Architecture
from ..facts import versions
from ..facts.options import DTYPE_BYTES, OPTIMIZERS
from .coefficients import coefficients
from .step import MicroStep, Term

GIB = 2**30


# ---------------------------------------------------------------------------------------------------------
# weights


def quantized_weight_params(arch: Architecture) -> int:
    """Weights bitsandbytes replaces with Linear4bit under QLoRA: every nn.Linear projection (not lm_head).

    Fused MoE expert weights are nn.Parameters, not nn.Linear: transformers' bnb integration leaves them in the
    compute dtype, so they are not counted here.
    """
    return sum(p.weight_params for p in arch.projections if p.quantizable)


def base_weights_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Projection weights: LoRA keeps them in the compute dtype (2 bytes/param in bf16);
    QLoRA packs the nn.Linear ones as NF4, 4 bits = 0.5 byte/param, and keeps fused expert weights in dtype."""
    dt = DTYPE_BYTES[shape.dtype]
    q = quantized_weight_params(arch)
    unq = sum(p.weight_params for p in arch.projections) - q
    if shape.method == "qlora":
        return 0.5 * q + dt * unq
    return dt * (q + unq)


def quant_constants_bytes(arch: Architecture, shape: MicroStep) -> float:
    """NF4 quantization constants, block size b (bitsandbytes; 64 by default):
    without double quantization one fp32 absmax per block: 4/b byte/param;
    with double quantization the absmax are themselves quantized to 8 bits in blocks of 256 with an fp32
    constant each: 1/b + 4/(b x 256) byte/param."""
    if shape.method != "qlora":
        return 0.0
    q = quantized_weight_params(arch)
    b = shape.blocksize
    per_param = (1 / b + 4 / (b * 256)) if shape.double_quant else 4 / b
    return q * per_param


def unquantized_modules_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Embeddings, lm_head (0 when tied), norms, projection biases, routers, q/k norms: dtype bytes each.
    Kept in the compute dtype under both methods (no fp32 upcast: `run` does not call
    prepare_model_for_kbit_training)."""
    dt = DTYPE_BYTES[shape.dtype]
    biases = sum(p.bias_params for p in arch.projections)
    return dt * (
        arch.embedding_params + arch.lm_head_params + arch.norm_params + arch.other_params + biases
    )


# ---------------------------------------------------------------------------------------------------------
# adapter


def adapter_bytes_per_param(shape: MicroStep) -> float:
    """Bytes per LoRA parameter in the adapters' dtype: 4 (peft's fp32), or 2 where trl casts a 4-bit model's
    adapters to bf16 (shape.adapter_dtype, from planner.facts.versions.adapter_dtype: QLoRA with bf16 compute and
    trl >= 0.26). The calibration rows had no cast (their 4-bit layers were swapped in by hand, which does not set
    the `is_loaded_in_4bit` flag trl reads), so they are fp32."""
    return float(DTYPE_BYTES[shape.adapter_dtype])


def lora_weights_bytes(p: int, bytes_per_param: float = 4.0) -> float:
    """LoRA A and B matrices in the adapters' dtype: 4 x P (peft's fp32), 2 x P under trl's QLoRA bf16 cast."""
    return bytes_per_param * p


def lora_gradients_bytes(p: int, bytes_per_param: float = 4.0) -> float:
    """Gradients of the LoRA weights, in the weights' dtype: 4 x P (fp32), 2 x P (bf16)."""
    return bytes_per_param * p


def optimizer_states_bytes(p: int, optimizer: str, bytes_per_param: float = 4.0) -> float:
    """torch AdamW keeps two moments in the parameter's dtype (`torch.zeros_like(p)`): 8 x P for fp32 adapters,
    4 x P for bf16 ones; bitsandbytes 8-bit AdamW (paged or not) two 8-bit moments whatever the dtype: 2 x P (plus
    per-block constants, negligible). Paged states can spill to host memory under pressure; planned as
    resident."""
    o = OPTIMIZERS[optimizer]
    if o.moments_in_param_dtype:
        return 2 * bytes_per_param * p
    return o.state_bytes_per_param * p


def ddp_buckets_bytes(p: int, num_gpus: int, bytes_per_param: float = 4.0) -> float:
    """DistributedDataParallel's gradient buckets hold a second copy of the trainable gradients, in their dtype,
    for the all-reduce: 4 x P (fp32; 2 x P for bf16 adapters) on each GPU when more than one GPU trains."""
    return bytes_per_param * p if num_gpus > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------
# activations and loss


MLP_KINDS = frozenset({"gate", "up", "down"})


def adapted_projections(arch: Architecture, shape: Optional[MicroStep] = None) -> list:
    """The projections LoRA adapts: shape.targets (peft names), or every projection (the calibration's recipe)."""
    names = None if shape is None else shape.targets
    return [p for p in arch.projections if names is None or p.peft_name in names]


def lora_activation_bytes_per_token(arch: Architecture, shape: Optional[MicroStep] = None,
                                    kinds: Optional[frozenset] = None) -> float:
    """What the LoRA path of the adapted projections saves per token in one layer (of those whose kinds meet
    `kinds`, when given):

        sum over adapted projections of  (c_copy + c_drop) x in_features + c_r x r

    peft's lora.Linear casts the input to the fp32 LoRA dtype (`_cast_input_dtype`) and autocast casts it back to
    bf16 for lora_A, which saves that copy: c_copy = 2 B per input element, also with dropout 0 (peft's
    nn.Identity then; the copy is per projection, so q, k and v, which share an input, save three). With dropout
    the mask of CUDA's fused dropout (bool): c_drop = 1 B, 0 without. lora_B saves lora_A's output: c_r = 2 B x r.
    The frozen base layer saves nothing (its weight needs no gradient). Fused expert weights (peft
    target_parameters, no dropout) see each token experts_per_token times. Counted on the CPU for q,v / MLP /
    all seven, dropout 0 and 0.05, LoRA and QLoRA (benchmarks/saved_tensors.py, tests/test_saved_tensors.py)."""
    c = coefficients().derived
    dropout = True if shape is None else shape.lora_dropout
    r = 16 if shape is None else shape.rank
    # adapters in the compute dtype (trl's QLoRA bf16 cast) with dropout 0: peft casts nothing and nn.Identity
    # copies nothing, so lora_A saves its input itself: the adapted projections that read one input (q, k, v: the
    # first norm's output; gate, up: the second's) share one saved copy, and o's input is a view of sdpa's output,
    # which sdpa saves already (counted on the CPU: 8 h less per layer than fp32 adapters with all seven targets)
    shared = (shape is not None and not dropout and shape.adapter_dtype == shape.dtype)
    inputs_seen: set = set()
    total = 0.0
    for p in adapted_projections(arch, shape):
        if kinds is not None and not set(p.kinds) & kinds:
            continue
        per_layer = p.count / arch.num_layers
        if shared and not p.param:
            group = _shared_input(p.kinds)
            copy = c.lora_copy_bytes_per_input * p.in_features
            if group == "attention_out" or group in inputs_seen:
                copy = 0.0
            if group:
                inputs_seen.add(group)
            total += per_layer * (copy + c.lora_bytes_per_rank * r)
            continue
        if p.param:
            total += per_layer * arch.experts_per_token * (c.lora_copy_bytes_per_input * p.in_features
                                                           + c.lora_bytes_per_rank * r)
        else:
            per_input = c.lora_copy_bytes_per_input + (c.lora_dropout_bytes_per_input if dropout else 0.0)
            total += per_layer * (per_input * p.in_features + c.lora_bytes_per_rank * r)
    return total


def _shared_input(kinds) -> Optional[str]:
    """Which saved tensor an adapted projection's input is: the attention block's normed input (q, k, v), the
    MLP's normed input (gate, up), sdpa's output (o); None for down (act(gate) x up, its own)."""
    k = set(kinds)
    if k <= {"q", "k", "v"}:
        return "attention_in"
    if k <= {"gate", "up"}:
        return "mlp_in"
    if k == {"o"}:
        return "attention_out"
    return None


def layer_activation_bytes_per_token(arch: Architecture, seq_len: int, shape: Optional[MicroStep] = None) -> float:
    """Bytes one decoder layer saves for backward, per token (bf16 autocast, sdpa/flash attention), before the
    fitted scale:

        X = a_norm x h x norms + a_att_h x h + a_att_kv x kv + a_mlp x i + LoRA [+ a_eager x heads x seq_len]

    a_norm = 4 (each RMSNorm keeps its fp32 input), a_att_h = 4 and a_att_kv = 4 (sdpa keeps q and its output,
    2 h each, and k and v, 2 kv each), a_mlp = 6 (gate, up and act(gate), 2 i each; act(gate) x up is kept only
    as the LoRA copy of down's input), LoRA = lora_activation_bytes_per_token (the adapted projections' input
    copies, dropout masks and rank-r outputs; all seven with dropout when `shape` is None, the calibration's
    recipe). Coefficients in tables/memory.yaml (derived), each counted with saved-tensor hooks on the CPU
    (benchmarks/saved_tensors.py). For MoE, i is experts_per_token x expert intermediate size: each token runs
    through its top-k experts. Eager attention (Gemma 2) materializes the scores: a_eager bytes per score,
    heads x seq_len per token.
    """
    c = coefficients().derived
    i = arch.experts_per_token * arch.moe_intermediate_size if arch.is_moe else arch.intermediate_size
    return (
        c.norm_bytes_per_hidden * arch.hidden_size * arch.norms_per_layer
        + c.attention_bytes_per_hidden * arch.hidden_size
        + c.attention_bytes_per_kv * arch.kv_dim
        + c.mlp_bytes_per_intermediate * i
        + lora_activation_bytes_per_token(arch, shape)
        + (c.eager_attention_bytes_per_score * arch.num_heads * seq_len if arch.attn_implementation == "eager" else 0)
    )


def checkpointed_layers(arch: Architecture, shape: MicroStep) -> int:
    """Decoder layers that are checkpointed: all L, or with layer_checkpointing every n-th, ceil(L / n)
    (transformers checkpoints the layers whose index % n == 0); 0 without checkpointing."""
    if not shape.grad_checkpointing:
        return 0
    return math.ceil(arch.num_layers / max(shape.every_n_layers, 1))


def checkpointed_inputs_bytes(arch: Architecture, shape: MicroStep) -> float:
    """With gradient checkpointing each checkpointed layer keeps its input hidden states, bf16: dtype x Lc x h x T,
    Lc = checkpointed_layers (L unless layer_checkpointing). That is all torch's non-reentrant checkpoint saves
    outside its regions (counted with saved-tensor hooks on the CPU: dtype x h per token and checkpointed layer,
    benchmarks/saved_tensors.py). With an offload saver these tensors are what save_on_cpu / trl's hooks take to
    pinned host memory (the same count: everything kept per layer moves), so nothing of this term stays on the GPU
    (planner.plugins.savers; the inputs brought back are offload_resident_bytes). The caching allocator's reserve around
    the resident checkpoints is checkpoint_reserve_bytes, in allocator_reserve."""
    if not shape.grad_checkpointing or shape.checkpoints_offloaded:
        return 0.0
    return DTYPE_BYTES[shape.dtype] * checkpointed_layers(arch, shape) * arch.hidden_size * shape.tokens


def resident_checkpoints(arch: Architecture, shape: MicroStep) -> int:
    """Checkpointed layer inputs on the GPU at the peak: Lc, or with an offload the k brought back / in flight."""
    if not shape.grad_checkpointing:
        return 0
    return shape.offload_resident_inputs if shape.checkpoints_offloaded else checkpointed_layers(arch, shape)


def checkpoint_reserve_bytes(arch: Architecture, shape: MicroStep) -> float:
    """What the caching allocator reserves beyond the resident checkpointed inputs: c_ckpt x n x h x T, n =
    resident_checkpoints (Lc; k under an offload). c_ckpt (fitted, about 0.8 B per hidden element and token) is no
    tensor: refitted on the calibration rows' peak allocated memory it is 0, on peak reserved (and on what
    nvidia-smi shows) 0.8: each checkpoint is a long-lived block allocated between the layer's transients, so the
    segments they free cannot be handed to the backward's larger requests. An offload frees each checkpoint on the
    GPU as soon as it is copied, so only the k resident inputs hold segments."""
    return coefficients().fitted.checkpoint_extra_bytes * resident_checkpoints(arch, shape) * arch.hidden_size * shape.tokens


def offload_resident_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Offloaded checkpointed inputs that are on the GPU at the backward's peak: the input brought back for the
    layer being recomputed (and, with trl's second stream, the next one prefetched): k x dtype x h x T,
    k = resident_inputs in tables/savers.yaml (1 for transformers' blocking copies, 2 for trl's streams)."""
    if not shape.checkpoints_offloaded:
        return 0.0
    return shape.offload_resident_inputs * DTYPE_BYTES[shape.dtype] * arch.hidden_size * shape.tokens


def mlp_untiled_bytes_per_token(arch: Architecture, shape: Optional[MicroStep] = None) -> float:
    """What one layer's MLP saves for backward per token, which MLP tiling no longer keeps for the whole
    sequence: the MLP's own a_mlp x i (gate, up, act(gate)) and the LoRA path of the adapted gate, up and down
    (their input copies and dropout masks: lora_activation_bytes_per_token over the MLP's kinds)."""
    c = coefficients().derived
    return (c.mlp_bytes_per_intermediate * arch.intermediate_size
            + lora_activation_bytes_per_token(arch, shape, MLP_KINDS))


def mlp_tiled_bytes_per_token(arch: Architecture) -> float:
    """What a tiled MLP keeps per token instead: its input x, saved by the tiling function (2 h), and in the
    backward the full-length input gradient it accumulates the tiles into (2 h): 4 h
    (Liger-Kernel liger_kernel/ops/tiled_mlp.py: ctx.save_for_backward(x); x_grad = torch.zeros_like(x))."""
    return 4 * arch.hidden_size


def mlp_tile_bytes(arch: Architecture, shape: MicroStep) -> float:
    """MLP tiling's working set: one tile's untiled MLP activations, recomputed in the backward:
    (s + s_rc) x M_mlp x tile_tokens (M_mlp = mlp_untiled_bytes_per_token), tile_tokens = micro-batch x ceil(seq / shards) with Liger's default
    shards = ceil(seq / h), so about micro-batch x h tokens (derived, not measured)."""
    if not shape.mlp_tile_tokens:
        return 0.0
    f = coefficients().fitted
    s = f.activation_scale if shape.loss == "full" else f.fused_activation_scale
    return (s + f.recompute_scale) * mlp_untiled_bytes_per_token(arch, shape) * shape.mlp_tile_tokens


def _activations_device_bytes(arch: Architecture, shape: MicroStep) -> float:
    f = coefficients().fitted
    x = layer_activation_bytes_per_token(arch, shape.seq_len, shape)
    if shape.mlp_tile_tokens:
        x += mlp_tiled_bytes_per_token(arch) - mlp_untiled_bytes_per_token(arch, shape)
    if shape.grad_checkpointing:
        # the recompute frame: trl's has its own scale (there it sets the peak; in the plain recipe the logits do)
        s = f.activation_scale if shape.loss == "full" else f.fused_activation_scale
        kept = arch.num_layers - checkpointed_layers(arch, shape)  # layers that are not checkpointed keep theirs
        return (s + f.recompute_scale) * x * shape.tokens + f.activation_scale * x * kept * shape.tokens
    # the forward saves the same tensors through trl's SFTTrainer as in a plain call (counted with a real
    # SFTTrainer step, tests/test_step_peaks.py): one scale for both recipes
    return f.activation_scale * x * arch.num_layers * shape.tokens


def _loss_device_bytes(arch: Architecture, shape: MicroStep) -> float:
    f = coefficients().fitted
    t, v = shape.tokens, arch.vocab_size
    if shape.loss == "full":
        per = f.full_loss_bytes_per_logit
        if arch.tie_word_embeddings:
            per += f.full_loss_tied_extra_bytes_per_logit
        if arch.config.get("final_logit_softcapping"):
            per += coefficients().derived.softcap_bytes_per_logit
        return per * t * v
    return fused_loss_bytes(arch, shape)


def fused_loss_bytes(arch: Architecture, shape: MicroStep) -> float:
    """trl's fused LM head + cross-entropy (trl 1.16 `add_fused_lm_head`, kernels/chunked_logprob.py
    `ChunkedLogProbFunction`), at its peak in the loss's backward, derived from the source (not fitted):

        c_tok x h x T + dtype x min(T, 4096) x min(V, 32768)

    c_tok = 12 B: the final RMSNorm's fp32 input (4 h, saved), the bf16 `hidden_states[mask]` copy the function
    saves (2 h), the fp32 `grad_hidden` it accumulates the tiles' gradient GEMMs into (4 h) and its cast back to
    bf16 on return (2 h). The tile buffer `mm_buf` is TOKEN_CHUNK_SIZE (4096) tokens x chunk_size (32768)
    vocabulary entries in the compute dtype, one at a time (the forward's is freed before the backward's). The
    per-token statistics for the loss and the metrics trl logs (log_z, entropy, is_top1: `outputs=("log_probs",
    "entropy", "is_top1")`) are fp32 scalars per token, and `num_tokens` is a Python int: left out.
    With torch < 2.8 (no `addmm(out_dtype=float32)`) the backward upcasts each tile and weight chunk to fp32:
    + 4 x (tile + 32768 x h); the plan reads torch's version (planner.facts.versions) and says which it assumed."""
    c = coefficients().derived
    t, v, h = shape.tokens, arch.vocab_size, arch.hidden_size
    tile_t, tile_v = min(t, c.fused_loss_tile_tokens), min(v, c.fused_loss_tile_vocab)
    total = c.fused_loss_bytes_per_token_hidden * h * t + DTYPE_BYTES[shape.dtype] * tile_t * tile_v
    if not versions.torch_has_mm_out_dtype():
        total += 4 * (tile_t * tile_v + tile_v * h)
    return total


def activations_bytes(arch: Architecture, shape: MicroStep) -> float:
    """Saved activations, as allocated (the allocator's share is in `allocator_reserve`).
    Without checkpointing every layer's saved tensors live at the end of the forward:
        (1 - rho_act) x s x X x L x T.
    With checkpointing one layer is recomputed at a time in the backward:
        (1 - rho_act) x (s + s_rc) x X x T,
    plus, with layer_checkpointing, s x X x (L - Lc) x T for the layers that are not checkpointed.
    X = layer_activation_bytes_per_token; s = activation_scale, fitted, one for both recipes (trl's SFTTrainer
    step saves exactly what a plain forward saves, counted: benchmarks/step_peaks.py); s_rc the backward's
    extra working set while a layer is recomputed, fitted; with checkpointing trl's recompute frame has its own
    scale, fused_activation_scale (s_trl: there the frame sets the peak, in the plain recipe the logits do).
    MLP tiling replaces the MLP's share of X, 6 i + its LoRA path, by 4 h (mlp_untiled_bytes_per_token,
    mlp_tiled_bytes_per_token)."""
    rho = coefficients().fitted.reserve_share_of_activations
    return (1 - rho) * _activations_device_bytes(arch, shape)


def logits_bytes(arch: Architecture, shape: MicroStep) -> float:
    """The loss, as allocated (the allocator's share is in `allocator_reserve`).
    full (the model's own loss): the logits exist whole: bf16 out of the LM head, the fp32 upcast, the
    log-softmax output and its gradient in fp32; what is alive at the peak is (1 - rho_loss) x c_full x T x V,
    c_full fitted (the derivation gives 10-14 B: 2 + 4 + 4 (+ 4) depending on what is freed before the peak;
    tied embeddings measure slightly more, c_tied); final-logit softcapping (Gemma 2) adds the tanh's saved
    output and bf16 copies: + c_softcap x T x V (derived).
    fused (trl's chunked LM head + cross-entropy): the logits never exist; what remains is derived from trl's
    source: c_tok x h x T + one tile buffer (fused_loss_bytes)."""
    rho = coefficients().fitted.reserve_share_of_loss
    return (1 - rho) * _loss_device_bytes(arch, shape)


def misc_bytes() -> float:
    """Small allocations present at the peak whatever the shape: autocast's cache of bf16 LoRA weight copies,
    RNG and optimizer bookkeeping, cuBLAS handles, the allocator's smallest segments (fitted constant)."""
    return coefficients().fitted.misc_bytes


def allocator_reserve_bytes(arch: Architecture, shape: MicroStep) -> float:
    """The caching allocator holds more than it hands out: freed blocks of transient tensors that no later
    request fits (fragmentation). It grows with the size of the transients, so it is a share of each:
        rho_loss x loss + rho_act x activations   (before the split; shares fitted on reserved - allocated)
    plus, with checkpointing, c_ckpt x resident checkpoints x h x T (checkpoint_reserve_bytes)."""
    f = coefficients().fitted
    return (
        f.reserve_share_of_loss * _loss_device_bytes(arch, shape)
        + f.reserve_share_of_activations * _activations_device_bytes(arch, shape)
        + checkpoint_reserve_bytes(arch, shape)
    )


def cuda_context_bytes() -> float:
    """CUDA context plus cuBLAS/cuDNN workspaces: device memory used that torch's allocator does not count
    (measured on an H200: used - reserved after training, tables/memory.yaml)."""
    return coefficients().measured.cuda_context_gib * GIB


# ---------------------------------------------------------------------------------------------------------


def budget(arch: Architecture, selection: TargetSelection, shape: MicroStep,
           saver_terms: Sequence[Term] = ()) -> list[Term]:
    """All terms for one GPU holding the whole model, in report order. Their sum is the predicted peak (what
    nvidia-smi shows). `saver_terms` are what the memory savers add (planner.plugins.savers), placed after the activations;
    a distributed strategy then turns the list into one rank's (planner.plugins.strategies `budget`)."""
    p = trainable_params(selection, shape.rank)
    dt = DTYPE_BYTES[shape.dtype]
    a = adapter_bytes_per_param(shape)
    adapter = "fp32" if shape.adapter_dtype == "float32" else "bf16: trl's QLoRA cast"
    terms = []
    if shape.method == "qlora":
        terms.append(Term("nf4_weights", base_weights_bytes(arch, shape), "0.5 B x quantized params (+ dtype x expert params)", "weights"))
        b = shape.blocksize
        dq = f"1/{b} + 4/{b * 256}" if shape.double_quant else f"4/{b}"
        terms.append(Term("quant_constants", quant_constants_bytes(arch, shape), f"({dq}) B x quantized params", "weights"))
    else:
        terms.append(Term("base_weights", base_weights_bytes(arch, shape), f"{dt} B x projection params", "weights"))
    terms += [
        Term("unquantized_modules", unquantized_modules_bytes(arch, shape), f"{dt} B x (embeddings + lm_head + norms + biases)", "weights"),
        Term("lora_weights", lora_weights_bytes(p, a), f"{a:g} B x P ({adapter})", "adapter"),
        Term("lora_gradients", lora_gradients_bytes(p, a), f"{a:g} B x P ({adapter})", "adapter"),
        Term("optimizer_states", optimizer_states_bytes(p, shape.optimizer, a),
             f"{optimizer_states_bytes(1, shape.optimizer, a):g} B x P", "adapter"),
    ]
    if shape.grad_checkpointing:
        layers = "L" if checkpointed_layers(arch, shape) == arch.num_layers else "ceil(L/n)"
        formula = "0: in pinned host memory" if shape.checkpoints_offloaded else f"{dt} B x {layers} x h x T"
        terms.append(Term("checkpointed_inputs", checkpointed_inputs_bytes(arch, shape), formula, "activations"))
    act_formula = "(1-rho) (s + s_rc) x X x T" if shape.grad_checkpointing else "(1-rho) s x X x L x T"
    if shape.grad_checkpointing and checkpointed_layers(arch, shape) < arch.num_layers:
        act_formula += " + (1-rho) s x X x (L - ceil(L/n)) x T"
    if shape.mlp_tile_tokens:
        act_formula += "; X less the MLP's 6i + LoRA, plus 4h"
    terms += [Term("activations", activations_bytes(arch, shape), act_formula, "activations")]
    terms += list(saver_terms)
    terms += [
        Term(
            "logits" if shape.loss == "full" else "fused_loss",
            logits_bytes(arch, shape),
            "(1-rho) c_full x T x V" if shape.loss == "full" else "(1-rho) (12 B x h x T + dt x min(T,4096) x min(V,32768))",
            "loss",
        ),
        Term("misc", misc_bytes(), "constant", "runtime"),
    ]
    if shape.device == "cuda":
        terms += [
            Term("allocator_reserve", allocator_reserve_bytes(arch, shape),
                 "rho_loss x loss + rho_act x activations" + (" + c_ckpt x resident ckpts x h x T" if shape.grad_checkpointing else ""),
                 "runtime"),
            Term("cuda_context", cuda_context_bytes(), "context + library workspaces", "runtime"),
        ]
    return terms


def peak_bytes(arch: Architecture, selection: TargetSelection, shape: MicroStep) -> float:
    return Term.sum_gib(budget(arch, selection, shape)) * GIB


def loaded_bytes(arch: Architecture, selection: TargetSelection, shape: MicroStep) -> float:
    """What torch.cuda.memory_allocated() shows after loading and wrapping: weights + LoRA weights."""
    p = trainable_params(selection, shape.rank)
    return (
        base_weights_bytes(arch, shape)
        + quant_constants_bytes(arch, shape)
        + unquantized_modules_bytes(arch, shape)
        + lora_weights_bytes(p, adapter_bytes_per_param(shape))
    )
