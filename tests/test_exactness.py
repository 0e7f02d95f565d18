"""Trainable parameter counts equal what PEFT reports for the same LoraConfig, on meta-device models that
transformers builds from the same configs (no weights)."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from benchmarks.calibration import calibration_dir  # noqa: E402
from loraplan.planner.architecture.families import from_config
from loraplan.planner.architecture.targets import select_targets, trainable_params
from loraplan.tables import models  # noqa: E402

CALIBRATION = calibration_dir() / "configs"


def peft_counts(cfg: dict, target_modules: list[str], target_parameters: list[str], r: int) -> tuple[int, int]:
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in model.parameters())
        lora = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                               target_modules=target_modules or None, target_parameters=target_parameters or None)
        wrapped = peft.get_peft_model(model, lora)
        trainable, _ = wrapped.get_nb_trainable_parameters()
    return trainable, total


def _clean(cfg: dict) -> dict:
    # rope_scaling of Llama 3.1 / Phi-3.5 are validated by transformers; the shapes do not depend on them
    return {k: v for k, v in cfg.items() if k not in ("rope_scaling",)}


CATALOG = sorted(models())


@pytest.mark.parametrize("name", CATALOG)
def test_catalog_default_targets_match_peft(name):
    cfg = _clean(models()[name]["config"])
    arch = from_config(cfg)
    sel = select_targets(arch, None)
    got, total = peft_counts(cfg, sel.target_modules, sel.target_parameters, 16)
    assert trainable_params(sel, 16) == got
    assert arch.total_params == total


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b", "gemma-2-2b", "phi-3.5-mini", "mixtral-8x7b", "qwen3-30b-a3b",
                                  "gemma-3-1b", "smollm3-3b", "gpt-oss-20b", "phi-4-mini"])
@pytest.mark.parametrize("spec,r", [("all-linear", 64), ("q,v", 8), ("o,down", 32)])
def test_catalog_other_targets_and_ranks_match_peft(name, spec, r):
    cfg = _clean(models()[name]["config"])
    arch = from_config(cfg)
    sel = select_targets(arch, spec)
    got, _ = peft_counts(cfg, sel.target_modules, sel.target_parameters, r)
    assert trainable_params(sel, r) == got


@pytest.mark.parametrize("name", sorted(p.name for p in CALIBRATION.iterdir()))
def test_calibration_configs_match_peft_and_measurement(name):
    cfg = json.loads((CALIBRATION / name / "config.json").read_text())
    arch = from_config(cfg)
    sel = select_targets(arch, None)
    got, total = peft_counts(cfg, sel.target_modules, sel.target_parameters, 16)
    assert trainable_params(sel, 16) == got
    assert arch.total_params == total
    # and what was measured on the H200 with the same LoraConfig
    rows = [json.loads(line) for line in (CALIBRATION.parent / "plain-step.jsonl").read_text().splitlines() if line]
    measured = {row["trainable_params"] for row in rows if row["model"] == name}
    assert measured == {trainable_params(sel, 16)}


def test_llama_projection_example_from_the_issue():
    # a 4096 x 4096 projection at r=16: 131,072 parameters, 0.78 % of the layer
    arch = from_config(models()["llama-3.1-8b"]["config"])
    q = next(p for p in arch.projections if p.peft_name == "q_proj")
    assert q.lora_params(16) // q.count == 131_072
    assert round(100 * q.lora_params(16) / q.weight_params, 2) == 0.78


GENERIC = {
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "vocab_size": 1000},
    "phi": {"model_type": "phi", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 1000},
    "olmo2": {"model_type": "olmo2", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000},
    # GPT-2 style models build transformers' Conv1D (weight in x out), which peft adapts like nn.Linear
    "gpt2": {"model_type": "gpt2", "n_embd": 128, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 256},
}


@pytest.mark.parametrize("name", sorted(GENERIC))
def test_architectures_outside_the_family_table_are_counted_from_a_meta_build(name):
    """Families planner.architecture.families does not know go through transformers on the meta device (planner/architecture/meta_build.py)."""
    cfg = GENERIC[name]
    arch = from_config(cfg)
    for spec in (None, "all-linear"):
        sel = select_targets(arch, spec)
        got, total = peft_counts(cfg, sel.target_modules, sel.target_parameters, 8)
        assert trainable_params(sel, 8) == got
        assert arch.total_params == total


def test_an_encoder_decoder_config_is_refused_in_words():
    from loraplan.planner.errors import ArchitectureError

    with pytest.raises(ArchitectureError, match="t5 is an encoder-decoder model: loraplan plans decoder-only"):
        from_config({"model_type": "t5", "d_model": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 1000})
