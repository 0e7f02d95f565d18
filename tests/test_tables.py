"""Checks on the data tables: tables/models.yaml, tables/gpus.yaml, tables/hyperparameters.yaml.

The model catalog is checked by building every entry with transformers on the meta device (no
weights, no downloads): the config must be one transformers accepts, its tensor shapes must be the
ones the config says, and its parameter count must land within 3 % of the published count. A wrong
hidden size, layer count, vocabulary or tying flag moves the count by more than that.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from benchmarks.calibration import calibration_dir

TABLES_DIR = Path(__file__).resolve().parents[1] / "loraplan" / "tables"
CALIBRATION_CONFIGS = calibration_dir() / "configs"
RECIPE_CARD = TABLES_DIR / "reference" / "lora-qlora-card.md"  # a copy of shared/reference/lora-qlora-card.md

PARAM_TOLERANCE = 0.03

# The fields that decide parameter counts and tensor shapes for the calibration architectures
# (Llama, Qwen2). The calibration configs were written by transformers 5 from these fields; they
# differ from the published files on fields that change no shape (rms_norm_eps, rope scaling,
# max_window_layers, and for qwen2.5-14b max_position_embeddings), which are not compared.
SHAPE_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
)


def _load(name: str) -> dict:
    with open(TABLES_DIR / name, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and data, f"{name} must be a non-empty mapping"
    return data


MODELS = _load("models.yaml")
GPUS = _load("gpus.yaml")
HYPERPARAMETERS = _load("hyperparameters.yaml")

# PyYAML (YAML 1.1) reads `1e-05` or `2e-4` as a string; a number hiding as a string would be
# passed to transformers or the planner verbatim.
_NUMBER_LIKE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _number_like_strings(value, path=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _number_like_strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _number_like_strings(item, f"{path}[{index}]")
    elif isinstance(value, str) and _NUMBER_LIKE.match(value.strip()):
        yield f"{path} = {value!r}"


@pytest.mark.parametrize("table", ["models.yaml", "gpus.yaml", "hyperparameters.yaml"])
def test_no_number_is_stored_as_a_string(table):
    data = {"models.yaml": MODELS, "gpus.yaml": GPUS, "hyperparameters.yaml": HYPERPARAMETERS}[table]
    # Aliases such as "4090" are names, deliberately strings.
    offenders = [p for p in _number_like_strings(data) if ".aliases[" not in p]
    assert not offenders, f"numbers stored as strings (write floats with a dot, 1.0e-05): {offenders}"


# ------------------------------------------------------------------------------------------ models


def _names(entries: dict) -> list[tuple[str, str]]:
    """(name, owning key) for every key and alias."""
    names = []
    for key, entry in entries.items():
        names.append((key, key))
        for alias in entry.get("aliases") or []:
            names.append((alias, key))
    return names


@pytest.mark.parametrize("key", sorted(MODELS))
def test_model_entry_fields(key):
    entry = MODELS[key]
    assert key == key.lower(), "catalog names are lowercase"
    for field in ("hub_id", "display_name", "source", "params_source", "config"):
        assert entry.get(field), f"{key}: missing {field}"
    assert isinstance(entry["hub_id"], str) and "/" in entry["hub_id"]
    assert entry["source"].startswith(f"https://huggingface.co/{entry['hub_id']}/"), (
        f"{key}: source should be the hub file of {entry['hub_id']}"
    )
    assert isinstance(entry["params_b"], (int, float)) and 0.1 < entry["params_b"] < 2000
    for alias in entry.get("aliases") or []:
        assert isinstance(alias, str) and alias == alias.lower(), f"{key}: alias {alias!r} not lowercase"
    config = entry["config"]
    assert isinstance(config.get("model_type"), str)
    assert isinstance(config.get("architectures"), list) and len(config["architectures"]) == 1
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size"):
        assert isinstance(config.get(field), int) and config[field] > 0, f"{key}: {field}"
    assert isinstance(config.get("tie_word_embeddings"), bool), f"{key}: tie_word_embeddings"
    assert config["num_attention_heads"] % config["num_key_value_heads"] == 0


def test_model_names_and_aliases_are_unique():
    seen: dict[str, str] = {}
    for name, owner in _names(MODELS):
        assert name not in seen, f"{name!r} names both {seen[name]} and {owner}"
        seen[name] = owner


def _build(config: dict):
    """Config object and meta-device model for a catalog config (no weights are allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return cfg, model


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@pytest.mark.parametrize("key", sorted(MODELS))
def test_model_builds_on_meta_with_published_parameter_count(key):
    entry = MODELS[key]
    config = entry["config"]
    cfg, model = _build(config)

    assert type(model).__name__ == config["architectures"][0]
    # parameters() counts a tied embedding once, as the published counts do
    params = sum(p.numel() for p in model.parameters())
    published = entry["params_b"] * 1e9
    assert abs(params - published) / published <= PARAM_TOLERANCE, (
        f"{key}: meta model has {params / 1e9:.3f}B parameters, params_b says {entry['params_b']}B"
    )

    # the shapes are the ones the config states
    embed = model.get_input_embeddings().weight
    assert tuple(embed.shape) == (config["vocab_size"], config["hidden_size"])
    tied = model.get_output_embeddings().weight is embed
    assert tied == config["tie_word_embeddings"], f"{key}: lm_head tying differs from the config"
    layers = model.model.layers
    assert len(layers) == config["num_hidden_layers"]
    head_dim = _head_dim(cfg)
    if "head_dim" in config:
        assert head_dim == config["head_dim"]
    attn = layers[0].self_attn
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if hasattr(attn, "qkv_proj"):  # phi3 fuses q, k and v
        assert attn.qkv_proj.out_features == (heads + 2 * kv_heads) * head_dim
    else:
        assert attn.q_proj.out_features == heads * head_dim
        assert attn.k_proj.out_features == kv_heads * head_dim
        assert attn.v_proj.out_features == kv_heads * head_dim
    assert attn.o_proj.in_features == heads * head_dim
    assert attn.o_proj.out_features == config["hidden_size"]


def _calibration_names() -> list[str]:
    return sorted(p.parent.name for p in CALIBRATION_CONFIGS.glob("*/config.json"))


def test_calibration_architectures_are_in_the_catalog():
    names = _calibration_names()
    assert len(names) >= 4, f"calibration configs missing under {CALIBRATION_CONFIGS}"
    missing = [n for n in names if n not in MODELS]
    assert not missing, f"calibration architectures missing from models.yaml: {missing}"


@pytest.mark.parametrize("name", _calibration_names())
def test_catalog_matches_calibration_config(name):
    if name not in MODELS:
        pytest.skip(f"{name} not in the catalog (reported by the test above)")
    calibration = json.loads((CALIBRATION_CONFIGS / name / "config.json").read_text())
    ours = MODELS[name]["config"]

    # raw values, where both files carry the field
    for field in SHAPE_FIELDS:
        if field in calibration and field in ours:
            assert ours[field] == calibration[field], f"{name}.{field}: {ours[field]!r} vs {calibration[field]!r}"

    # effective values, after transformers fills its defaults
    cal_cfg, cal_model = _build(calibration)
    our_cfg, our_model = _build(ours)
    for field in SHAPE_FIELDS:
        if field == "head_dim":
            assert _head_dim(our_cfg) == _head_dim(cal_cfg)
        else:
            assert getattr(our_cfg, field, None) == getattr(cal_cfg, field, None), field

    # and the same tensors
    ours_shapes = {n: tuple(p.shape) for n, p in our_model.named_parameters()}
    cal_shapes = {n: tuple(p.shape) for n, p in cal_model.named_parameters()}
    assert ours_shapes == cal_shapes


# -------------------------------------------------------------------------------------------- gpus

GPU_REQUIRED = ("name", "vendor", "memory_gib", "memory_basis", "marketed_gb", "bf16",
                "peak_bf16_tflops", "peak_fp16_tflops", "bandwidth_gbs", "aliases", "match", "source")

# get_device_name() strings of real cards -> the entry that must claim them (None: no entry).
DEVICE_NAMES = {
    "Tesla T4": "t4",
    "NVIDIA L4": "l4",
    "NVIDIA A10G": "a10g",
    "NVIDIA GeForce RTX 3090": "rtx-3090",
    "NVIDIA GeForce RTX 4090": "rtx-4090",
    "NVIDIA GeForce RTX 5090": "rtx-5090",
    "NVIDIA RTX A6000": "rtx-a6000",
    "NVIDIA L40S": "l40s",
    "NVIDIA A100-SXM4-40GB": "a100-40gb",
    "NVIDIA A100-PCIE-40GB": "a100-40gb",
    "NVIDIA A100-SXM4-80GB": "a100-80gb",
    "NVIDIA A100 80GB PCIe": "a100-80gb",
    "NVIDIA H100 80GB HBM3": "h100-80gb",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H200": "h200",
    "NVIDIA B200": "b200",
    "AMD Instinct MI300X": "mi300x",
    # cards that must not be mistaken for a catalog entry
    "NVIDIA L40": None,
    "NVIDIA A10": None,
    "NVIDIA GeForce RTX 4090 Laptop GPU": None,
    "NVIDIA RTX 6000 Ada Generation": None,
}


@pytest.mark.parametrize("key", sorted(GPUS))
def test_gpu_entry_fields_and_ranges(key):
    gpu = GPUS[key]
    assert key == key.lower()
    missing = [f for f in GPU_REQUIRED if f not in gpu]
    assert not missing, f"{key}: missing {missing}"
    assert gpu["vendor"] in ("nvidia", "amd")
    assert gpu["memory_basis"] in ("measured", "torch-reported", "rocminfo", "datasheet")
    assert isinstance(gpu["memory_gib"], (int, float)) and 10 <= gpu["memory_gib"] <= 300
    # What a process sees is below the marketed size. Marketed figures mix GB (GDDR cards) and
    # GiB-sized HBM stacks (an "80 GB" H100 shows 79.1 GiB), so bracket rather than convert.
    marketed = gpu["marketed_gb"]
    assert 0.88 * marketed * 1e9 / 2**30 <= gpu["memory_gib"] <= marketed, key
    assert isinstance(gpu["bandwidth_gbs"], (int, float)) and 100 <= gpu["bandwidth_gbs"] <= 10000
    assert isinstance(gpu["bf16"], bool)
    if gpu["bf16"]:
        assert isinstance(gpu["peak_bf16_tflops"], (int, float)) and 20 <= gpu["peak_bf16_tflops"] <= 5000
    else:
        assert gpu["peak_bf16_tflops"] is None
    assert isinstance(gpu["peak_fp16_tflops"], (int, float)) and 20 <= gpu["peak_fp16_tflops"] <= 5000
    assert gpu["match"] and all(isinstance(m, str) and m for m in gpu["match"])
    assert all(isinstance(a, str) and a == a.lower() for a in gpu["aliases"])
    assert isinstance(gpu["source"], str) and len(gpu["source"]) > 20


def test_gpu_names_and_aliases_are_unique():
    seen: dict[str, str] = {}
    for name, owner in _names(GPUS):
        assert name not in seen, f"{name!r} names both {seen[name]} and {owner}"
        seen[name] = owner


def _claimants(device_name: str) -> list[str]:
    return [
        key
        for key, gpu in GPUS.items()
        if any(m in device_name for m in gpu["match"])
        and not any(n in device_name for n in gpu.get("not_match") or [])
    ]


@pytest.mark.parametrize("device_name", sorted(DEVICE_NAMES))
def test_device_name_is_claimed_by_exactly_the_right_card(device_name):
    expected = DEVICE_NAMES[device_name]
    assert _claimants(device_name) == ([expected] if expected else [])


def test_every_gpu_has_a_device_name_check():
    assert set(GPUS) == {v for v in DEVICE_NAMES.values() if v}


# --------------------------------------------------------------------------------- hyperparameters


@pytest.mark.parametrize("key", sorted(HYPERPARAMETERS))
def test_hyperparameter_has_value_and_reason(key):
    entry = HYPERPARAMETERS[key]
    assert "value" in entry, key
    assert isinstance(entry.get("reason"), str) and len(entry["reason"]) > 10, key
    if "range" in entry:
        low, high = entry["range"]
        assert low <= entry["value"] <= high, key


def test_hyperparameter_defaults():
    hp = {k: v["value"] for k, v in HYPERPARAMETERS.items()}
    assert hp["learning_rate"] == pytest.approx(2e-4)
    assert hp["alpha"] == 2 * hp["rank"] and HYPERPARAMETERS["alpha"]["per_rank"] == 2
    assert hp["dropout"] == pytest.approx(0.05)
    assert hp["warmup_ratio"] == pytest.approx(0.03)
    assert hp["lr_scheduler"] == "cosine"
    assert hp["weight_decay"] == 0.0 and hp["max_grad_norm"] == 1.0
    assert hp["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert hp["method"] == "auto" and hp["gradient_checkpointing"] == "auto"


def _card_table() -> dict[str, str]:
    """Rows of the card's "Key Hyperparameters" table: parameter -> recommended."""
    rows, in_table = {}, False
    for line in RECIPE_CARD.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_table = line.strip() == "## Key Hyperparameters"
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_table and len(cells) >= 2 and cells[0] not in ("Parameter", "") and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1]
    return rows


def test_hyperparameters_agree_with_the_recipe_card():
    card = _card_table()
    assert card, "the card's Key Hyperparameters table was not found"

    def span(text: str) -> list[int]:
        return [int(x) for x in text.split("-")]

    hp = HYPERPARAMETERS
    assert float(card["Learning rate"]) == pytest.approx(hp["learning_rate"]["value"])
    assert span(card["Epochs"]) == hp["num_epochs"]["range"]
    assert span(card["LoRA r"]) == hp["rank"]["range"]
    assert card["LoRA alpha"].replace(" ", "") == "2xr" and hp["alpha"]["per_rank"] == 2
    # the card's per-device batch (4-8) is not a default: the planner takes the largest micro-batch that fits
    assert span(card["Batch size"])[1] <= hp["global_batch_size"]["value"]
    assert float(card["Warmup"].rstrip("%")) / 100 == pytest.approx(hp["warmup_ratio"]["value"])
