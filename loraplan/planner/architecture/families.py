"""Architecture families: a model's shapes read from its Hugging Face `config.json`.

Pure arithmetic, no torch. Families are a plug-in table (`FAMILIES`): each maps a config to an
`Architecture` (planner.architecture.types), so adding a family is one function, not a subclass. The last resort,
after the table, is a meta-device build by transformers (planner.architecture.meta_build) for any other decoder.

Counting follows transformers' own modeling files (v5): the dense decoders (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3, Phi-3, SmolLM3) build `nn.Linear` projections per layer; the MoE families (Mixtral, Qwen3-MoE, gpt-oss) keep every
expert's weights fused in two 3-D parameters per layer (`mlp.experts.gate_up_proj` of shape
[E, 2*I, H] and `mlp.experts.down_proj` of shape [E, H, I]) which peft targets with `target_parameters`.

"""

from __future__ import annotations

from typing import Any, Callable, Optional

from ..errors import ArchitectureError
from . import meta_build
from .targets import SHORT_NAMES, TargetSelection, default_kinds, select_targets, trainable_params
from .types import Architecture, Projection

__all__ = ["Architecture", "Projection", "TargetSelection", "SHORT_NAMES", "FAMILIES", "default_kinds",
           "family_of", "from_config", "select_targets", "trainable_params"]


# ---------------------------------------------------------------------------------------------------------
# reading configs


def _req(cfg: dict, name: str, family: str) -> Any:
    value = cfg.get(name)
    if value is None:
        raise ArchitectureError(f"config.json for {family} is missing required field '{name}'")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArchitectureError(f"config.json field '{name}' must be a positive integer, got {value!r}")
    return value


def _opt_int(cfg: dict, name: str, default: int) -> int:
    value = cfg.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ArchitectureError(f"config.json field '{name}' must be a positive integer, got {value!r}")
    return value


def _text_config(cfg: dict) -> dict:
    # multimodal wrappers keep the language model under text_config
    if "text_config" in cfg and isinstance(cfg["text_config"], dict) and "hidden_size" not in cfg:
        inner = dict(cfg["text_config"])
        inner.setdefault("model_type", cfg.get("model_type"))
        return inner
    return cfg


def _attention(cfg: dict, family: str, layers: int, qkv_bias: bool, o_bias: bool, fused_qkv: bool = False):
    h = _req(cfg, "hidden_size", family)
    heads = _req(cfg, "num_attention_heads", family)
    kv_heads = _opt_int(cfg, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise ArchitectureError(
            f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    if cfg.get("head_dim") is not None:
        head_dim = _opt_int(cfg, "head_dim", 0)
    else:
        if h % heads:
            raise ArchitectureError(
                f"hidden_size ({h}) is not divisible by num_attention_heads ({heads}) and head_dim is missing"
            )
        head_dim = h // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    if fused_qkv:
        projs = [Projection("qkv_proj", h, q + 2 * kv, layers, qkv_bias, ("q", "k", "v"))]
    else:
        projs = [
            Projection("q_proj", h, q, layers, qkv_bias, ("q",)),
            Projection("k_proj", h, kv, layers, qkv_bias, ("k",)),
            Projection("v_proj", h, kv, layers, qkv_bias, ("v",)),
        ]
    projs.append(Projection("o_proj", q, h, layers, o_bias, ("o",)))
    return h, heads, kv_heads, head_dim, projs


def _dense_mlp(h: int, i: int, layers: int, bias: bool, fused_gate_up: bool = False) -> list[Projection]:
    if fused_gate_up:
        return [
            Projection("gate_up_proj", h, 2 * i, layers, bias, ("gate", "up")),
            Projection("down_proj", i, h, layers, bias, ("down",)),
        ]
    return [
        Projection("gate_proj", h, i, layers, bias, ("gate",)),
        Projection("up_proj", h, i, layers, bias, ("up",)),
        Projection("down_proj", i, h, layers, bias, ("down",)),
    ]


def _embeddings(cfg: dict, family: str, h: int) -> tuple[int, int, int, bool]:
    vocab = _req(cfg, "vocab_size", family)
    tied = bool(cfg.get("tie_word_embeddings", False))
    return vocab, vocab * h, 0 if tied else vocab * h, tied


def _architecture(cfg: dict, family: str, layers: int, attention: tuple, projs: list, **fields) -> Architecture:
    """The fields every family fills the same way: the attention's shape (`_attention`'s h, heads, kv_heads,
    head_dim), the embeddings (`_embeddings`), the projections and the config; `fields`, the family's own."""
    h, heads, kv_heads, head_dim = attention
    vocab, emb, head, tied = _embeddings(cfg, family, h)
    return Architecture(family=family, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=head_dim, vocab_size=vocab, tie_word_embeddings=tied, projections=projs,
                        embedding_params=emb, lm_head_params=head, config=cfg, **fields)


def _dense(
    cfg: dict,
    family: str,
    *,
    qkv_bias: Optional[bool] = None,
    norms_per_layer: int = 2,
    qk_norm: bool = False,
    fused: bool = False,
    activation_key: str = "hidden_act",
    tie_default: Optional[bool] = None,
) -> Architecture:
    layers = _req(cfg, "num_hidden_layers", family)
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_b = attn_bias if qkv_bias is None else qkv_bias
    o_b = attn_bias if qkv_bias is None else False  # qwen2: q/k/v carry a bias, o_proj does not
    h, heads, kv_heads, head_dim, projs = _attention(cfg, family, layers, qkv_b, o_b, fused_qkv=fused)
    i = _req(cfg, "intermediate_size", family)
    projs += _dense_mlp(h, i, layers, bool(cfg.get("mlp_bias", False)), fused_gate_up=fused)
    if tie_default is not None and "tie_word_embeddings" not in cfg:
        cfg = {**cfg, "tie_word_embeddings": tie_default}
    return _architecture(
        cfg, family, layers, (h, heads, kv_heads, head_dim), projs,
        intermediate_size=i,
        norm_params=layers * norms_per_layer * h + h,
        other_params=layers * 2 * head_dim if qk_norm else 0,
        activation=str(cfg.get(activation_key) or cfg.get("hidden_act") or "silu"),
        norms_per_layer=norms_per_layer,
    )


def _moe(cfg: dict, family: str, experts_key: str, expert_size_key: str, qk_norm: bool) -> Architecture:
    layers = _req(cfg, "num_hidden_layers", family)
    attn_bias = bool(cfg.get("attention_bias", False))
    h, heads, kv_heads, head_dim, projs = _attention(cfg, family, layers, attn_bias, attn_bias)
    experts = _req(cfg, experts_key, family)
    top_k = _req(cfg, "num_experts_per_tok", family)
    ei = _req(cfg, expert_size_key, family)
    # Qwen3-MoE may keep some layers dense: mlp_only_layers, or every layer not a multiple of decoder_sparse_step
    sparse_step = cfg.get("decoder_sparse_step", 1) or 1
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    sparse_layers = [
        n for n in range(layers) if n not in mlp_only and (n + 1) % sparse_step == 0
    ]
    n_sparse = len(sparse_layers)
    n_dense = layers - n_sparse
    if n_sparse:
        projs += [
            Projection("gate_up_proj", h, 2 * ei, n_sparse, False, ("gate", "up"), experts, True, False),
            Projection("down_proj", ei, h, n_sparse, False, ("down",), experts, True, False),
        ]
    if n_dense:
        projs += _dense_mlp(h, _req(cfg, "intermediate_size", family), n_dense, False)
    return _architecture(
        cfg, family, layers, (h, heads, kv_heads, head_dim), projs,
        intermediate_size=cfg.get("intermediate_size") or ei,
        norm_params=layers * 2 * h + h,
        other_params=n_sparse * experts * h + (layers * 2 * head_dim if qk_norm else 0),  # router
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=ei,
        activation=str(cfg.get("hidden_act") or "silu"),
    )


def _gpt_oss(cfg: dict) -> Architecture:
    """gpt-oss (transformers `GptOssForCausalLM`): every layer MoE, biases everywhere, attention sinks.

    Per layer: q/k/v/o with bias; experts fused as `gate_up_proj` [E, H, 2I] + bias [E, 2I] and `down_proj`
    [E, I, H] + bias [E, H] (peft's target_parameters; LoRA's count E*r*(in+out) does not depend on the
    orientation); a router `nn.Linear(H, E)` with bias; `sinks` [heads]; two RMSNorms.
    """
    family = "gpt_oss"
    layers = _req(cfg, "num_hidden_layers", family)
    bias = bool(cfg.get("attention_bias", True))
    h, heads, kv_heads, head_dim, projs = _attention(cfg, family, layers, bias, bias)
    experts = _req(cfg, "num_local_experts", family)
    top_k = _req(cfg, "num_experts_per_tok", family)
    ei = _req(cfg, "intermediate_size", family)
    projs += [
        Projection("gate_up_proj", h, 2 * ei, layers, True, ("gate", "up"), experts, True, False),
        Projection("down_proj", ei, h, layers, True, ("down",), experts, True, False),
    ]
    return _architecture(
        cfg, family, layers, (h, heads, kv_heads, head_dim), projs,
        intermediate_size=ei, norm_params=layers * 2 * h + h,
        other_params=layers * (experts * h + experts + heads),  # router weight and bias, attention sinks
        num_experts=experts, experts_per_token=top_k, moe_intermediate_size=ei,
        activation=str(cfg.get("hidden_act") or "silu"),
    )


FAMILIES: dict[str, Callable[[dict], Architecture]] = {
    "llama": lambda c: _dense(c, "llama"),
    "mistral": lambda c: _dense(c, "mistral"),
    "qwen2": lambda c: _dense(c, "qwen2", qkv_bias=True),
    "qwen3": lambda c: _dense(c, "qwen3", qk_norm=True),
    "gemma": lambda c: _dense(c, "gemma", activation_key="hidden_activation", tie_default=True),
    "gemma2": lambda c: _dense(
        c, "gemma2", norms_per_layer=4, activation_key="hidden_activation", tie_default=True
    ),
    # Gemma 3's language model: four norms per layer as Gemma 2, plus per-head q_norm/k_norm
    "gemma3_text": lambda c: _dense(
        c, "gemma3_text", norms_per_layer=4, qk_norm=True, activation_key="hidden_activation", tie_default=True
    ),
    "phi3": lambda c: _dense(c, "phi3", fused=True),
    "smollm3": lambda c: _dense(c, "smollm3"),  # Llama's layout; NoPE layers change no parameter
    "gpt_oss": _gpt_oss,
    "mixtral": lambda c: _moe(c, "mixtral", "num_local_experts", "intermediate_size", qk_norm=False),
    "qwen3_moe": lambda c: _moe(c, "qwen3_moe", "num_experts", "moe_intermediate_size", qk_norm=True),
}

# transformers model classes named in config["architectures"], for configs that lack model_type
ARCHITECTURE_CLASSES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3_text",
    "SmolLM3ForCausalLM": "smollm3",
    "GptOssForCausalLM": "gpt_oss",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def family_of(cfg: dict) -> Optional[str]:
    cfg = _text_config(cfg)
    family = cfg.get("model_type")
    if family in FAMILIES:
        return family
    for cls in cfg.get("architectures") or []:
        if cls in ARCHITECTURE_CLASSES:
            return ARCHITECTURE_CLASSES[cls]
    return None


def _known_family(cfg: dict) -> Optional[Architecture]:
    family = family_of(cfg)
    return FAMILIES[family](cfg) if family else None


def _meta_device_build(cfg: dict) -> Optional[Architecture]:
    """The slow path: a meta-device build by transformers, when installed and the config names a model_type."""
    return meta_build.from_config(cfg) if cfg.get("model_type") and meta_build.available() else None


# Tried in order; the first that returns an Architecture wins. The meta-device build is the last resort.
RESOLVERS: list[Callable[[dict], Optional[Architecture]]] = [_known_family, _meta_device_build]


def from_config(cfg: dict) -> Architecture:
    """Architecture of a config.json dict (raises ArchitectureError when no resolver can count it)."""
    if not isinstance(cfg, dict):
        raise ArchitectureError("config.json must hold a JSON object")
    cfg = _text_config(cfg)
    for resolver in RESOLVERS:
        arch = resolver(cfg)
        if arch is not None:
            return arch
    kind = cfg.get("model_type") or (cfg.get("architectures") or ["<none>"])[0]
    raise ArchitectureError(
        f"unknown architecture {kind!r}: config.json needs a 'model_type' of "
        + ", ".join(sorted(FAMILIES))
        + ("" if cfg.get("model_type") is None else
           " (other model types are counted through transformers: pip install -e '.[run]')")
    )
