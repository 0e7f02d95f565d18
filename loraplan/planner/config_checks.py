"""What transformers refuses in a `config.json`, checked without importing it (the catalog path stays arithmetic).

Each check mirrors one of transformers' own (v5.24, read in site-packages), so that `plan` refuses in one line what
`run` would later fail on deep inside loading:
- field types: configs are `@strict` dataclasses (huggingface_hub.dataclasses.strict), so `rms_norm_eps: float`
  refuses a string (`TypeError: Field 'rms_norm_eps' expected float`). A NaN or infinite value passes that check
  but no model trains from it, so it is refused here too.
- `initializer_range`: LlamaConfig declares it `interval(min=0.0, max=1.0)` (utils/type_validators.py), which
  refuses NaN; other families only type-check it.
- `validate_architecture` (models/llama/configuration_llama.py, models/gemma2/configuration_gemma2.py): the hidden
  size must be a multiple of the attention heads, even when head_dim is given.
- RoPE (modeling_rope_utils.py, RotaryEmbeddingConfigMixin): `rope_scaling` / `rope_parameters` must be a dict
  (`convert_rope_params_to_dict` calls `.setdefault` on it); `validate_rope` requires each rope_type's keys
  (`_check_received_keys`: KeyError "Missing required keys in `rope_parameters`") and an even rotary dimension
  (head_dim > 4 and odd, fully rotated: ValueError "RoPE requires an even rotary dimension").
- `max_position_embeddings` must be a positive integer: transformers accepts 0, but a model with no positions
  trains nothing (and every default length would be beyond it).
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InputError

# Float fields transformers' strict dataclasses type-check (LlamaConfig and the families of planner.arch).
FLOAT_FIELDS = ("rms_norm_eps", "initializer_range", "rope_theta", "attention_dropout", "partial_rotary_factor")

# model_type -> the families whose config class has `validate_architecture` with hidden_size % num_attention_heads.
HIDDEN_DIVISIBLE_BY_HEADS = ("llama", "gemma2")

# model_type -> fields declared with an interval (min, max), as in their configuration_*.py.
INTERVALS: dict[str, dict[str, tuple[float, float]]] = {"llama": {"initializer_range": (0.0, 1.0)}}

# rope_type -> keys transformers requires (an unknown type passes its validation with a warning, then fails building
# the model: ROPE_INIT_FUNCTIONS[rope_type] is a KeyError beyond default, axial and these) (RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters); rope_theta
# is filled in from the config when missing (convert_rope_params_to_dict), so it is not required here.
ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "default": (), "axial": (), "linear": ("factor",), "dynamic": ("factor",),
    "yarn": ("factor",),  # original_max_position_embeddings defaults to max_position_embeddings
    "longrope": ("short_factor", "long_factor"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "proportional": (),
}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_config(cfg: dict, where: str) -> None:
    """One-line InputError naming the config field transformers (or training) would refuse; None when it loads."""
    cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg else cfg
    model_type = str(cfg.get("model_type") or "")
    for name in FLOAT_FIELDS:
        value = cfg.get(name)
        if value is None:
            continue
        if not _number(value):
            raise InputError(f"{where}: config field '{name}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InputError(f"{where}: config field '{name}' must be finite, got {value!r}")
    for name, (lo, hi) in INTERVALS.get(model_type, {}).items():
        value = cfg.get(name)
        if value is not None and not lo <= value <= hi:
            raise InputError(f"{where}: config field '{name}' must be in [{lo:g}, {hi:g}] for {model_type}, got {value!r}")
    mpe = cfg.get("max_position_embeddings")
    if mpe is not None and (isinstance(mpe, bool) or not isinstance(mpe, int) or mpe <= 0):
        raise InputError(f"{where}: config field 'max_position_embeddings' must be a positive integer, got {mpe!r}")
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if model_type in HIDDEN_DIVISIBLE_BY_HEADS and isinstance(hidden, int) and isinstance(heads, int) and heads > 0 \
            and hidden % heads:
        raise InputError(f"{where}: config field 'hidden_size' ({hidden}) must be a multiple of num_attention_heads "
                         f"({heads}) for {model_type} (transformers' validate_architecture)")
    _check_rope(cfg, where)


def _check_rope(cfg: dict, where: str) -> None:
    for name in ("rope_scaling", "rope_parameters"):
        rope = cfg.get(name)
        if rope is None or rope == {}:
            continue
        if not isinstance(rope, dict):
            raise InputError(f"{where}: config field '{name}' must be a dict such as "
                             f"{{\"rope_type\": \"linear\", \"factor\": 2.0}}, got {rope!r}")
        nested = [v for v in rope.values() if isinstance(v, dict)]  # per layer type (Gemma 3 and later)
        for params in nested if nested and all(isinstance(v, (dict, type(None))) for v in rope.values()) else [rope]:
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type not in ROPE_REQUIRED:
                raise InputError(f"{where}: config field '{name}' has rope_type {rope_type!r}; transformers knows "
                                 + ", ".join(ROPE_REQUIRED))
            missing = [k for k in ROPE_REQUIRED[rope_type] if k not in params]
            if missing:
                raise InputError(f"{where}: config field '{name}' (rope_type {rope_type!r}) is missing "
                                 + ", ".join(repr(k) for k in missing))
    head_dim = cfg.get("head_dim")
    if head_dim is None and isinstance(cfg.get("hidden_size"), int) and isinstance(cfg.get("num_attention_heads"), int) \
            and cfg["num_attention_heads"] > 0:
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    partial = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(head_dim, int) and head_dim > 4 and head_dim % 2 and _number(partial) \
            and int(head_dim * partial) == head_dim:
        raise InputError(f"{where}: config field 'head_dim' ({head_dim}) must be even: RoPE rotates pairs of dimensions "
                         "(transformers' validate_rope)")
