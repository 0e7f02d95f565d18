"""How `run` applies a plan's savers: each saver's `run` entry in tables/savers.yaml says what it sets, read here
the same way for every saver (planner/savers.py is the table):

    checkpointing: {...}   keys of transformers' activation checkpointing kwargs (TrainingArguments)
    sft_config: {...}      fields of trl's SFTConfig
    model_patch: NAME      a function of MODEL_PATCHES, applied to the adapted model

The value `setting` stands for the saver's setting in the plan (savers.every_n_layers for layer_checkpointing).
Nothing here imports torch at module level.
"""

from __future__ import annotations

from typing import Any, Callable

from loraplan.planner.plan import Plan
from loraplan.planner.savers import SAVERS

from .errors import RunError


def _resolved(plan: Plan, values: dict) -> dict:
    return {k: (plan.savers.every_n_layers if v == "setting" else v) for k, v in values.items()}


def checkpointing_settings(plan: Plan) -> dict[str, Any]:
    """The savers' share of the checkpointing kwargs (every_n_layers, offload)."""
    out: dict[str, Any] = {}
    for name in plan.savers.names:
        out.update(_resolved(plan, SAVERS[name].run.get("checkpointing", {})))
    return out


def sft_config_settings(plan: Plan) -> dict[str, Any]:
    """The savers' SFTConfig fields (activation_offloading, padding_free), False for every saver that is off, so
    that the config says what the plan leaves out as plainly as what it uses."""
    out: dict[str, Any] = {}
    for name, saver in SAVERS.items():
        for key, value in saver.run.get("sft_config", {}).items():
            out[key] = _resolved(plan, {key: value})[key] if name in plan.savers.on else False
    return out


def apply_model_patches(plan: Plan, model) -> list[str]:
    """Apply each on saver's model patch to the adapted model; returns the patches applied."""
    applied = []
    for name in plan.savers.names:
        patch = SAVERS[name].run.get("model_patch")
        if patch:
            MODEL_PATCHES[patch](model)
            applied.append(patch)
    return applied


def liger_tiled_mlp(model) -> int:
    """The mlp_tiling saver: Liger-Kernel's tiled gated MLP, bound onto each decoder layer's MLP as Liger
    documents for an already-built MLP (LigerTiledGLUMLP), so the peft-wrapped gate/up/down projections stay;
    shards = ceil(seq_len / hidden_size), Liger's default. Returns how many MLPs it tiled."""
    import types

    from liger_kernel.transformers.tiled_mlp import LigerTiledGLUMLP

    tiled = 0
    for module in model.modules():
        if all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            module.num_shards = None
            module._mlp_forward = types.MethodType(LigerTiledGLUMLP._mlp_forward, module)
            module.forward = types.MethodType(LigerTiledGLUMLP.forward, module)
            tiled += 1
    if not tiled:
        raise RunError("the plan's saver mlp_tiling found no gated MLP (gate_proj, up_proj, down_proj) to tile")
    return tiled


MODEL_PATCHES: dict[str, Callable] = {"liger_tiled_mlp": liger_tiled_mlp}
