"""Architecture: a model's shapes read from its Hugging Face `config.json`, and the modules LoRA can target.

Pure arithmetic, no torch. Families are a plug-in table (`FAMILIES`): each maps a config to an
`Architecture`, so adding a family is one function, not a subclass.

Counting follows transformers' own modeling files (v5): the dense decoders (Llama, Mistral, Qwen2, Qwen3,
Gemma 2, Phi-3) build `nn.Linear` projections per layer; the MoE families (Mixtral, Qwen3-MoE) keep every
expert's weights fused in two 3-D parameters per layer (`mlp.experts.gate_up_proj` of shape
[E, 2*I, H] and `mlp.experts.down_proj` of shape [E, H, I]) which peft targets with `target_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ArchitectureError


@dataclass(frozen=True)
class Projection:
    """One kind of weight LoRA can adapt, repeated `count` times in the model.

    `peft_name` is what goes into LoraConfig (target_modules, or target_parameters when `param=True`).
    `kinds` are the user-facing short names it covers (q, k, v, o, gate, up, down).
    """

    peft_name: str
    in_features: int
    out_features: int
    count: int  # layers x copies
    bias: bool
    kinds: tuple[str, ...]
    experts: int = 1  # >1 for a fused 3-D expert parameter: LoRA A is [E*r, in], B is [out, E*r]
    param: bool = False  # a fused parameter (peft target_parameters), not an nn.Linear
    quantizable: bool = True  # replaced by bnb Linear4bit under QLoRA (nn.Linear only)

    @property
    def weight_params(self) -> int:
        return self.count * self.experts * self.in_features * self.out_features

    @property
    def bias_params(self) -> int:
        return self.count * self.experts * self.out_features if self.bias else 0

    def lora_params(self, r: int) -> int:
        """peft LoRA: A is r x in, B is out x r (per expert for fused experts): r * (in + out)."""
        return self.count * self.experts * r * (self.in_features + self.out_features)


@dataclass
class Architecture:
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    projections: list[Projection]
    # parameters outside the projections, in the compute dtype and never quantized
    embedding_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    norm_params: int
    other_params: int  # routers, q/k norms, ...
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    activation: str = "silu"
    norms_per_layer: int = 2
    max_position_embeddings: Optional[int] = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def attn_implementation(self) -> str:
        """What `run` asks transformers for: sdpa, except where the model cannot use it (Gemma 2's attention
        logit softcapping: transformers marks it `_supports_sdpa = False`), which gets eager attention."""
        if self.family == "gemma2" or self.config.get("attn_logit_softcapping"):
            return "eager"
        return "sdpa"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def projection_params(self) -> int:
        return sum(p.weight_params + p.bias_params for p in self.projections)

    @property
    def total_params(self) -> int:
        return (
            self.projection_params
            + self.embedding_params
            + self.lm_head_params
            + self.norm_params
            + self.other_params
        )

    def kinds(self) -> list[str]:
        out: list[str] = []
        for p in self.projections:
            for k in p.kinds:
                if k not in out:
                    out.append(k)
        return out


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
    vocab, emb, head, tied = _embeddings(cfg, family, h)
    return Architecture(
        family=family,
        hidden_size=h,
        intermediate_size=i,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        projections=projs,
        embedding_params=emb,
        lm_head_params=head,
        norm_params=layers * norms_per_layer * h + h,
        other_params=layers * 2 * head_dim if qk_norm else 0,
        activation=str(cfg.get(activation_key) or cfg.get("hidden_act") or "silu"),
        norms_per_layer=norms_per_layer,
        max_position_embeddings=cfg.get("max_position_embeddings"),
        config=cfg,
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
    vocab, emb, head, tied = _embeddings(cfg, family, h)
    return Architecture(
        family=family,
        hidden_size=h,
        intermediate_size=cfg.get("intermediate_size") or ei,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        projections=projs,
        embedding_params=emb,
        lm_head_params=head,
        norm_params=layers * 2 * h + h,
        other_params=n_sparse * experts * h + (layers * 2 * head_dim if qk_norm else 0),  # router
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=ei,
        activation=str(cfg.get("hidden_act") or "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        config=cfg,
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
    "phi3": lambda c: _dense(c, "phi3", fused=True),
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


def from_config(cfg: dict) -> Architecture:
    """Architecture of a config.json dict of a known family (raises ArchitectureError otherwise)."""
    if not isinstance(cfg, dict):
        raise ArchitectureError("config.json must hold a JSON object")
    cfg = _text_config(cfg)
    family = family_of(cfg)
    if family is None:
        kind = cfg.get("model_type") or (cfg.get("architectures") or ["<none>"])[0]
        from . import generic  # the slow path: a meta-device build by transformers, when installed

        if cfg.get("model_type") and generic.available():
            return generic.from_config(cfg)
        raise ArchitectureError(
            f"unknown architecture {kind!r}: config.json needs a 'model_type' of "
            + ", ".join(sorted(FAMILIES))
            + ("" if cfg.get("model_type") is None else
               " (other model types are counted through transformers: pip install -e '.[run]')")
        )
    return FAMILIES[family](cfg)


# ---------------------------------------------------------------------------------------------------------
# LoRA targets

SHORT_NAMES = {
    "q": "q", "q_proj": "q", "k": "k", "k_proj": "k", "v": "v", "v_proj": "v", "o": "o", "o_proj": "o",
    "gate": "gate", "gate_proj": "gate", "w1": "gate", "up": "up", "up_proj": "up", "w3": "up",
    "down": "down", "down_proj": "down", "w2": "down",
    "qkv": "qkv", "qkv_proj": "qkv", "gate_up": "gate_up", "gate_up_proj": "gate_up",
}
DEFAULT_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class TargetSelection:
    projections: list[Projection]
    target_modules: list[str]  # peft LoraConfig.target_modules
    target_parameters: list[str]  # peft LoraConfig.target_parameters (fused MoE experts)
    note: str = ""


def select_targets(arch: Architecture, spec: Optional[str]) -> TargetSelection:
    """Resolve a user's --targets ("q,k,v,o,gate,up,down", "all-linear", or module names) for `arch`.

    A fused module (Phi-3's qkv_proj, gate_up_proj; MoE experts' gate_up_proj) is adapted whole when any
    of the kinds it carries is asked for: peft adapts a module, not a slice of it.
    """
    by_name = {p.peft_name: set(p.kinds) for p in arch.projections}
    if spec is None or spec.strip() == "":
        wanted = set(DEFAULT_KINDS)
        if not any(wanted & set(p.kinds) for p in arch.projections):  # e.g. gpt_neox's query_key_value, dense
            wanted = set(arch.kinds())
    elif spec.strip() == "all-linear":
        wanted = set(arch.kinds())
    else:
        wanted = set()
        for raw in spec.split(","):
            name = raw.strip()
            if not name:
                continue
            kind = SHORT_NAMES.get(name)
            if name in by_name and kind is None:  # a module name of this architecture
                wanted |= by_name[name]
            elif kind == "qkv":
                wanted |= {"q", "k", "v"}
            elif kind == "gate_up":
                wanted |= {"gate", "up"}
            elif kind is not None:
                wanted.add(kind)
            else:
                raise ArchitectureError(
                    f"target {name!r} matches no module of {arch.family}; choose from "
                    + ", ".join(p.peft_name for p in arch.projections)
                    + " (or q,k,v,o,gate,up,down, or all-linear)"
                )
    chosen = [p for p in arch.projections if wanted & set(p.kinds)]
    if not chosen:
        raise ArchitectureError(f"targets {spec!r} match no module of {arch.family}")
    modules: list[str] = []
    params: list[str] = []
    for p in chosen:
        if p.param:
            name = f"mlp.experts.{p.peft_name}"
            if name not in params:
                params.append(name)
        elif p.peft_name not in modules:
            modules.append(p.peft_name)
    widened = sorted({k for p in chosen for k in p.kinds} - wanted)
    note = f"fused modules also adapt {', '.join(widened)}" if widened else ""
    if (spec is None or not spec.strip()) and not any(set(DEFAULT_KINDS) & set(p.kinds) for p in chosen):
        note = "the architecture has none of q,k,v,o,gate,up,down: every linear layer is adapted"
    return TargetSelection(chosen, modules, params, note)


def trainable_params(selection: TargetSelection, r: int) -> int:
    return sum(p.lora_params(r) for p in selection.projections)
