"""Throughput: the training FLOPs per token of a shape and the tokens/s a card is expected to reach with them
(MFU measured per method on the H200 calibration rows, tables/memory.yaml). The savers' copies over the host link
are added by planner.plugins.savers, communication by planner.speed.communication. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Optional

from ..architecture.types import Architecture
from ..memory.coefficients import coefficients
from ..memory.step import MicroStep
from ..memory.terms import checkpointed_layers


def flops_per_token(arch: Architecture, shape: MicroStep) -> float:
    """Training FLOPs per token for LoRA: forward 2N, backward through frozen weights (input gradients only)
    2N, plus 2N more to recompute the forward under gradient checkpointing; N = parameters a token touches
    (for MoE: attention + top-k experts), plus the LM head (2 x h x V each pass) and attention scores
    (4 x L x seq x q_dim forward, twice that backward)."""
    active = 0
    for p in arch.projections:
        per = p.weight_params // max(p.experts, 1) if p.experts > 1 else p.weight_params
        mult = arch.experts_per_token if p.experts > 1 else 1
        active += per * mult
    head = arch.vocab_size * arch.hidden_size
    # the recompute runs the checkpointed layers' forward again: all of them, or ceil(L/n) of L
    recompute = checkpointed_layers(arch, shape) / arch.num_layers if shape.grad_checkpointing else 0
    passes = 2 + recompute
    attn = 4 * arch.num_layers * shape.seq_len * arch.q_dim * (1 + 2 + recompute)
    # MLP tiling recomputes the MLP's forward once more in the backward (Liger-Kernel tiled_mlp.py)
    mlp = 2 * mlp_params_per_token(arch) if shape.mlp_tile_tokens else 0
    return 2 * active * passes + 2 * head * 2 + attn / 2 + mlp  # causal: half the score matrix


def mlp_params_per_token(arch: Architecture) -> int:
    """The MLP weights a token runs through (gate, up, down; top-k experts for MoE)."""
    total = 0
    for p in arch.projections:
        if not set(p.kinds) & {"gate", "up", "down"}:
            continue
        per = p.weight_params // max(p.experts, 1) if p.experts > 1 else p.weight_params
        total += per * (arch.experts_per_token if p.experts > 1 else 1)
    return total


def tokens_per_second(arch: Architecture, shape: MicroStep, peak_tflops: Optional[float]) -> Optional[float]:
    """Expected tokens/s per GPU: MFU x peak bf16 FLOP/s / FLOPs per token, MFU measured per method on the
    calibration rows (tables/memory.yaml). None when the card's peak is unknown."""
    if not peak_tflops:
        return None
    mfu = coefficients().throughput.mfu(shape.method)
    return mfu * peak_tflops * 1e12 / flops_per_token(arch, shape)
