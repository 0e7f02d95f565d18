"""The names people type resolve offline (planner.facts.model_names): instruct/chat variants, Unsloth mirrors,
pre-quantized repos (planned as QLoRA), derived repositories; near misses still suggest the closest name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.architecture.model_source import resolve_model
from loraplan.planner.errors import InputError


@pytest.mark.parametrize("typed,key", [
    ("unsloth/Meta-Llama-3.1-8B", "llama-3.1-8b"),  # the design card's own example
    ("meta-llama/Llama-3.1-8B-Instruct", "llama-3.1-8b"),
    ("Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("google/gemma-3-4b-it", "gemma-3-4b"),
    ("google/gemma-3-1b-it", "gemma-3-1b"),
    ("mistralai/Mistral-Small-24B-Instruct-2501", "mistral-small-24b"),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "qwen3-30b-a3b"),
    ("Qwen/Qwen3-14B", "qwen3-14b"),
    ("unsloth/Qwen3-14B", "qwen3-14b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama-3.1-8b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2.5-32b"),
    ("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama-3.3-70b"),
    ("HuggingFaceTB/SmolLM3-3B", "smollm3-3b"),
    ("microsoft/Phi-4-mini-instruct", "phi-4-mini"),
    ("openai/gpt-oss-120b", "gpt-oss-120b"),
    ("llama-3.1-8b-instruct", "llama-3.1-8b"),
])
def test_typed_names_resolve_to_their_catalog_architecture(typed, key):
    from loraplan.tables import models

    m = resolve_model(typed)
    assert m.ref.source == "catalog"
    assert m.config == models()[key]["config"]
    if "/" in typed:
        assert m.ref.hub_id == typed  # the repository typed is what `run` loads


def test_a_prequantized_repo_is_planned_as_qlora_and_says_so():
    res = make_plan(PlanRequest(model="unsloth/Llama-3.2-1B-Instruct-bnb-4bit", gpu="h100-80gb", fit_table=False))
    assert res.plan.method == "qlora"
    assert res.plan.model.hub_id == "unsloth/Llama-3.2-1B-Instruct-bnb-4bit"
    assert any("pre-quantized" in w for w in res.warnings)
    base = make_plan(PlanRequest(model="unsloth/Llama-3.2-1B-Instruct", gpu="h100-80gb", fit_table=False))
    assert base.plan.method == "lora"  # the same model unquantized fits as LoRA on this card


def test_lora_on_a_prequantized_repo_is_refused():
    with pytest.raises(InputError, match="4-bit weights"):
        make_plan(PlanRequest(model="unsloth/Llama-3.2-1B-Instruct-bnb-4bit", gpu="h100-80gb", method="lora",
                              fit_table=False))


def test_unknown_orgs_and_near_misses_are_refused_with_a_suggestion():
    with pytest.raises(InputError, match="not in the catalog"):
        resolve_model("someone/Llama-3.1-8B")  # a stranger's fine-tune may change the shapes
    with pytest.raises(InputError, match="did you mean qwen2.5-7b"):
        resolve_model("qwen2.5-7b-instrukt")


def test_multimodal_and_mxfp4_families_say_what_is_planned():
    g = make_plan(PlanRequest(model="google/gemma-3-12b-it", gpu="h100-80gb", fit_table=False))
    assert any("language model" in w and "vision" in w for w in g.warnings)
    o = make_plan(PlanRequest(model="openai/gpt-oss-20b", gpu="h100-80gb", fit_table=False))
    assert any("MXFP4" in w for w in o.warnings)
    assert o.plan.lora.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def test_cli_json_names_the_typed_repo():
    out = subprocess.run([sys.executable, "-m", "loraplan.cli", "plan", "unsloth/Meta-Llama-3.1-8B", "--gpu",
                          "h100-80gb", "--no-fit-table", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["model"]["hub_id"] == "unsloth/Meta-Llama-3.1-8B"
    assert data["architecture"]["num_layers"] == 32
