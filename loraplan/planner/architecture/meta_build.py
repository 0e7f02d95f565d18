"""Architectures outside planner.architecture.families's families, counted from a meta-device build by transformers.

The slow path, taken only for a config.json whose model_type the family table does not know: transformers
(when installed) builds the model on the meta device (shapes, no memory), and every nn.Linear but the output
head becomes a Projection keyed by its leaf name, as peft's target_modules sees it. Known families never come
here, so `plan` on them stays arithmetic.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections import OrderedDict

from ..errors import ArchitectureError, first_line
from .targets import SHORT_NAMES
from .types import Architecture, Projection


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch") is not None


def _field(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ArchitectureError(f"config.json for {config.model_type} is missing required field '{names[0]}'")


def _build_on_meta(cfg: dict, family: str):
    """(text config, the causal LM built on the meta device), or ArchitectureError in words a user can act on."""
    import torch
    import transformers

    if family not in transformers.CONFIG_MAPPING:
        raise ArchitectureError(f"unknown architecture {family!r}: neither loraplan's families nor transformers "
                                f"{transformers.__version__} know this model_type")
    transformers.logging.set_verbosity_error()  # its config warnings are about the checkpoint, not the plan
    try:
        config = transformers.AutoConfig.for_model(**cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchitectureError(f"transformers cannot read this config.json ({family}): {first_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise ArchitectureError(f"{family} is an encoder-decoder model: loraplan plans decoder-only causal language "
                                "models (what AutoModelForCausalLM builds), and `run` trains those only")
    # transformers fills any missing field with its defaults; a planner must not count a default model
    for names in (("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"),
                  ("num_attention_heads", "n_head"), ("vocab_size",)):
        if not any(cfg.get(n) for n in names):
            raise ArchitectureError(f"config.json for {family} is missing required field '{names[0]}'")
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return config, transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # transformers raises many kinds for configs it cannot build
        first = first_line(exc)
        raise ArchitectureError(f"transformers cannot build a causal LM from this config.json ({family}): {first}") from None


def _adaptable(module, nn) -> "tuple[int, int] | None":
    """(in, out) of a layer peft's LoRA adapts: nn.Linear, or transformers' Conv1D (GPT-2 style, weight in x out,
    which peft adapts with fan_in_fan_out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None and module.weight.dim() == 2:
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return None


def _projections(model, family: str) -> list[Projection]:
    from torch import nn

    head = model.get_output_embeddings()
    groups: "OrderedDict[tuple, int]" = OrderedDict()
    for name, module in model.named_modules():
        dims = None if module is head else _adaptable(module, nn)
        if dims:
            leaf = name.rsplit(".", 1)[-1]
            key = (leaf, dims[0], dims[1], getattr(module, "bias", None) is not None)
            groups[key] = groups.get(key, 0) + 1
    projections = [
        Projection(leaf, fin, fout, count, bias, (SHORT_NAMES.get(leaf, leaf),))
        for (leaf, fin, fout, bias), count in groups.items()
    ]
    if not projections:
        raise ArchitectureError(f"{family}: the model has no linear (or Conv1D) layers for LoRA to adapt")
    return projections


def from_config(cfg: dict) -> Architecture:
    """Architecture of any decoder transformers can build (raises ArchitectureError otherwise)."""
    family = str(cfg.get("model_type"))
    config, model = _build_on_meta(cfg, family)
    projections = _projections(model, family)
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    lm_head = 0 if tied or head is None else head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)
    proj = sum(p.weight_params + p.bias_params for p in projections)
    h = _field(config, "hidden_size", "n_embd", "d_model")
    heads = _field(config, "num_attention_heads", "n_head")
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    return Architecture(
        family=family,
        hidden_size=h,
        intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h,
        num_layers=_field(config, "num_hidden_layers", "n_layer", "num_layers"),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=_field(config, "vocab_size"),
        tie_word_embeddings=tied,
        projections=projections,
        embedding_params=emb,
        lm_head_params=lm_head,
        norm_params=0,
        other_params=total - proj - emb - lm_head,  # norms, position embeddings, ...
        activation=str(getattr(config, "hidden_act", "silu")),
        config=cfg,
    )
