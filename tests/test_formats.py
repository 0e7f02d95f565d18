"""`loraplan plan --from` on Axolotl, LLaMA-Factory and TRL configs (planner/formats/), and `loraplan export`.

The configs under tests/data/formats/ were written for these tests in each tool's schema. Every exported config
plans back to the same plan, and the TRL export parses through trl's own argument parser; the Axolotl and
LLaMA-Factory schema checks run where those packages import (see docs/other-tools.md for what ran here)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplan.planner import formats
from loraplan.planner.api import PlanRequest, make_plan

DATA = Path(__file__).parent / "data" / "formats"
SECTIONS = ("method", "quantization", "lora", "training", "strategy", "distributed", "savers", "prediction", "hardware")


def plan_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loraplan.cli", "plan", "--no-fit-table", *args],
                          capture_output=True, text=True)


def plan_json(*args: str) -> dict:
    out = plan_cli(*args, "--json")
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name,gpus,expect", [
    ("axolotl_lora.yaml", 1, dict(method="lora", r=32, alpha=64, dropout=0.05, targets=ALL7, seq=2048, mb=2,
                                 accum=8, gc=True, opt="adamw", loss="full", packing=False, strategy="single")),
    ("axolotl_qlora.yaml", 2, dict(method="qlora", r=16, alpha=32, dropout=0.0, targets=ALL7, seq=4096, mb=1,
                                  accum=4, gc=True, opt="adamw", loss="full", packing=False, strategy="fsdp")),
    ("llamafactory_lora.yaml", 1, dict(method="lora", r=16, alpha=32, dropout=0.0, targets=ALL7, seq=2048, mb=2,
                                      accum=4, gc=True, opt="adamw", loss="full", packing=False, strategy="single")),
    ("llamafactory_qlora.yaml", 4, dict(method="qlora", r=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"],
                                       seq=1024, mb=4, accum=2, gc=True, opt="adamw", loss="full", packing=False,
                                       strategy="fsdp")),
    ("trl_lora.yaml", 1, dict(method="lora", r=32, alpha=16, dropout=0.05, targets=ALL7, seq=2048, mb=4, accum=4,
                             gc=True, opt="adamw", loss="fused", packing=False, strategy="single")),
    # no lora_target_modules: trl hands peft None, and peft's default for qwen2 is q_proj, v_proj
    pytest.param("trl_qlora.yaml", 1, dict(method="qlora", r=16, alpha=32, dropout=0.05, targets=["q_proj", "v_proj"],
                                           seq=4096, mb=2, accum=8, gc=True, opt="adamw-8bit", loss="fused",
                                           packing=True, strategy="single"),
                 marks=pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                          reason="peft's default targets are read from the installed peft")),
])
def test_each_tools_lora_and_qlora_configs_plan_as_written(name, gpus, expect):
    d = plan_json("--from", str(DATA / name), "--gpu", "h100-80gb", "--num-gpus", str(gpus))
    p, t = d["plan"], d["plan"]["training"]
    got = dict(method=p["method"], r=p["lora"]["r"], alpha=p["lora"]["lora_alpha"], dropout=p["lora"]["lora_dropout"],
               targets=p["lora"]["target_modules"], seq=t["seq_len"], mb=t["micro_batch_size"],
               accum=t["grad_accum_steps"], gc=t["grad_checkpointing"], opt=t["optimizer"], loss=t["loss"],
               packing=t["packing"], strategy=p["strategy"])
    assert got == expect
    assert t["global_batch_size"] == expect["mb"] * expect["accum"] * gpus
    assert d["from_config"]["tool"] == name.split("_")[0]


def test_every_key_not_taken_into_account_is_named_with_a_reason(tmp_path):
    cfg = yaml.safe_load((DATA / "axolotl_lora.yaml").read_text())
    cfg["my_made_up_key"] = 3
    path = tmp_path / "a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d = plan_json("--from", str(path), "--gpu", "h100-80gb")
    fc = d["from_config"]
    assert set(fc["read"]) | set(fc["ignored"]) == set(cfg)  # nothing dropped silently
    assert "Hub" in fc["ignored"]["datasets"]
    assert "template" in fc["ignored"]["chat_template"]
    assert "not a axolotl key loraplan knows" in fc["ignored"]["my_made_up_key"]
    human = plan_cli("--from", str(path), "--gpu", "h100-80gb")
    assert "my_made_up_key" in human.stdout and "chat_template" in human.stdout


def test_flags_given_on_the_command_line_override_the_config():
    d = plan_json("--from", str(DATA / "axolotl_lora.yaml"), "--gpu", "h100-80gb", "--rank", "8", "--seq-len", "1024",
                  "--batch-size", "1")
    p = d["plan"]
    assert p["lora"]["r"] == 8 and p["lora"]["lora_alpha"] == 64  # alpha still the config's
    assert p["training"]["seq_len"] == 1024
    # the micro-batch changed; the config's global batch (2 x 8) is kept
    assert p["training"]["micro_batch_size"] == 1 and p["training"]["global_batch_size"] == 16
    d2 = plan_json("--from", str(DATA / "axolotl_lora.yaml"), "--gpu", "h100-80gb", "--method", "qlora")
    assert d2["plan"]["method"] == "qlora"


def test_what_would_fit_is_phrased_in_the_tools_keys():
    out = plan_cli("--from", str(DATA / "axolotl_lora.yaml"), "--gpu", "rtx-4090", "--json")
    assert out.returncode == 1  # LoRA on a 24 GB card does not fit as written
    d = json.loads(out.stdout)
    phrased = d["from_config"]["tool_suggestions"]
    assert any("`adapter: qlora`" in s["axolotl"] for s in phrased)
    out = plan_cli("--from", str(DATA / "llamafactory_lora.yaml"), "--gpu", "t4", "--json")
    phrased = json.loads(out.stdout)["from_config"]["tool_suggestions"]
    assert any("`quantization_bit: 4`" in s["llamafactory"] for s in phrased)


@pytest.mark.parametrize("ds,gpus,strategy,words", [
    ("ds_z3.json", 4, "fsdp", "ZeRO-3"),
    ("ds_z3_offload.json", 4, "fsdp-offload", "ZeRO-3"),
    ("ds_z2.json", 4, "ddp", "upper bound"),
])
def test_deepspeed_zero_is_planned_as_its_equivalent_and_says_so(tmp_path, ds, gpus, strategy, words):
    cfg = yaml.safe_load((DATA / "llamafactory_qlora.yaml").read_text())
    cfg["deepspeed"] = str(DATA / ds)
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    d = plan_json("--from", str(path), "--gpu", "h100-80gb", "--num-gpus", str(gpus))
    assert d["plan"]["strategy"] == strategy
    assert any(words in n for n in d["from_config"]["notes"])


BAD = [
    ("not: [valid", None, "is not valid YAML"),
    ("- a\n- list\n", None, "must hold a YAML mapping"),
    ("foo: 1\nbar: 2\n", None, "cannot tell which tool"),
    ("base_model: nobody/no-such-model\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n", None,
     "not in the catalog"),
    ("base_model: meta-llama/Llama-3.2-1B\nadapter: qlora\nload_in_4bit: true\nload_in_8bit: true\nlora_r: 8\n"
     "lora_alpha: 16\nlora_target_linear: true\n", None, "contradict"),
    ("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nlora_r: 0\nlora_alpha: 16\nlora_target_linear: true\n", None,
     "lora_r must be a positive integer"),
    ("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: lora\nlora_dropout: 1.5\n", None,
     "lora_dropout must be in [0, 1)"),
    ("model_name_or_path: meta-llama/Llama-3.2-1B\nfinetuning_type: full\nstage: sft\n", None, "finetuning_type"),
    ("model_name_or_path: meta-llama/Llama-3.2-1B\nmax_length: 512\nper_device_train_batch_size: 2\n", "trl",
     "use_peft is not true"),
    ("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
     "optimizer: lion_8bit\n", None, "not an optimizer loraplan plans"),
    ("base_model: meta-llama/Llama-3.2-1B\nadapter: lora\nlora_r: 8\nlora_alpha: 16\nlora_target_linear: true\n"
     "deepspeed: missing.json\n", None, "missing.json not found"),
]


@pytest.mark.parametrize("text,forced,message", BAD)
def test_bad_configs_get_one_line_and_exit_2(tmp_path, text, forced, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    out = plan_cli("--from", str(path), "--gpu", "h100-80gb", *(["--from-format", forced] if forced else []))
    assert out.returncode == 2, out.stdout + out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


# plans to export: dense LoRA under FSDP on 2 GPUs; QLoRA with padding-free packing on one; LoRA at a fixed batch
ROUND_TRIP = [
    ["llama-3.2-1b", "--gpu", "h100-80gb", "--num-gpus", "2", "--strategy", "fsdp", "--seq-len", "2048"],
    ["qwen2.5-7b", "--gpu", "rtx-4090", "--method", "qlora", "--savers", "padding-free", "--seq-len", "1024"],
    ["llama-3.1-8b", "--gpu", "a100-80gb", "--batch-size", "2", "--rank", "64", "--optimizer", "adamw-8bit",
     "--grad-checkpointing", "on", "--epochs", "2"],
]


@pytest.mark.parametrize("tool", formats.FORMAT_NAMES)
@pytest.mark.parametrize("args", ROUND_TRIP, ids=["fsdp", "qlora-packing", "fixed-batch"])
def test_export_then_plan_from_gives_the_same_plan(tmp_path, tool, args):
    plan_file, exported, again = tmp_path / "plan.yaml", tmp_path / f"{tool}.yaml", tmp_path / "again.yaml"
    out = plan_cli(*args, "-o", str(plan_file))
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "loraplan.cli", "export", str(plan_file), "--to", tool, "-o",
                          str(exported)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = exported.read_text()
    assert text.startswith("#") and "cannot express" in text
    hw = yaml.safe_load(plan_file.read_text())["hardware"]
    out = plan_cli("--from", str(exported), "--gpu", hw["gpu"], "--num-gpus", str(hw["num_gpus"]), "-o", str(again))
    assert out.returncode == 0, out.stderr
    a, b = yaml.safe_load(plan_file.read_text()), yaml.safe_load(again.read_text())
    for section in SECTIONS:
        assert a[section] == b[section], section


def test_exported_trl_config_parses_with_trls_own_parser(tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import HfArgumentParser

    for args in ROUND_TRIP[:2]:
        plan_file, exported = tmp_path / "plan.yaml", tmp_path / "trl.yaml"
        assert plan_cli(*args, "-o", str(plan_file)).returncode == 0
        from loraplan.planner.planfile.schema import Plan

        exported.write_text(formats.export_text(Plan.load(str(plan_file)), "trl", str(plan_file), "trl.yaml"))
        parser = HfArgumentParser((trl.ScriptArguments, trl.SFTConfig, trl.ModelConfig))
        cfg = yaml.safe_load(exported.read_text())
        if cfg.get("fsdp"):  # TrainingArguments refuses FSDP outside a distributed launch; check the rest
            cfg.pop("fsdp"), cfg.pop("fsdp_config")
        cfg["use_cpu"] = True  # this machine has no GPU: TrainingArguments refuses bf16 without one otherwise
        exported.write_text(yaml.safe_dump(cfg))
        script, sft, model = parser.parse_yaml_file(str(exported), allow_extra_keys=False)  # unknown keys raise
        assert model.use_peft and model.lora_r == cfg["lora_r"]
        assert sft.max_length == cfg["max_length"] and sft.per_device_train_batch_size == cfg["per_device_train_batch_size"]
        assert sft.optim == cfg["optim"] and model.load_in_4bit == bool(cfg.get("load_in_4bit"))


@pytest.mark.skipif(importlib.util.find_spec("axolotl") is None, reason="axolotl is not installed here")
@pytest.mark.parametrize("source", ["export", "axolotl_lora.yaml", "axolotl_qlora.yaml"])
def test_axolotl_configs_validate_against_axolotls_schema(tmp_path, source):
    from axolotl.utils.schemas.config import AxolotlInputConfig

    if source == "export":
        plan_file = tmp_path / "plan.yaml"
        assert plan_cli(*ROUND_TRIP[0], "-o", str(plan_file)).returncode == 0
        from loraplan.planner.planfile.schema import Plan

        cfg = yaml.safe_load(formats.export_text(Plan.load(str(plan_file)), "axolotl", "p", "a.yaml"))
        cfg["datasets"] = [{"path": "train.jsonl", "type": "alpaca", "ds_type": "json"}]
    else:
        cfg = yaml.safe_load((DATA / source).read_text())
    AxolotlInputConfig(**cfg)  # raises on a key or value axolotl rejects


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None, reason="llamafactory is not installed here")
@pytest.mark.parametrize("source", ["export", "llamafactory_lora.yaml"])
def test_llamafactory_configs_parse_with_llamafactorys_dataclasses(tmp_path, source):
    from transformers import HfArgumentParser
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments
    from llamafactory.hparams.training_args import TrainingArguments

    if source == "export":
        plan_file = tmp_path / "plan.yaml"
        assert plan_cli(*ROUND_TRIP[1], "-o", str(plan_file)).returncode == 0
        from loraplan.planner.planfile.schema import Plan

        cfg = yaml.safe_load(formats.export_text(Plan.load(str(plan_file)), "llamafactory", "p", "lf.yaml"))
    else:
        cfg = yaml.safe_load((DATA / source).read_text())
    cfg.update(dataset="alpaca_en_demo", template="qwen", use_cpu=True)  # use_cpu: no GPU here for bf16
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, FinetuningArguments,
                               GeneratingArguments))
    path = tmp_path / "lf.yaml"
    path.write_text(yaml.safe_dump(cfg))
    parser.parse_yaml_file(str(path), allow_extra_keys=False)  # unknown keys raise


def test_plan_from_keeps_the_planner_torch_free(tmp_path):
    code = ("import sys; from loraplan.planner import formats; from loraplan.planner.api import make_plan, PlanRequest;"
            f"fmt, imp = formats.load({str(DATA / 'axolotl_lora.yaml')!r});"
            "kw = formats.request(imp, dict(model=None, gpu='h100-80gb', fit_table=False), set());"
            "make_plan(PlanRequest(**kw)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_python_api_merge_matches_the_cli():
    fmt, imp = formats.load(str(DATA / "trl_lora.yaml"))
    kw = formats.request(imp, dict(model=None, gpu="h100-80gb", fit_table=False), set())
    res = make_plan(PlanRequest(**kw))
    assert fmt.name == "trl" and res.plan.lora.r == 32 and res.plan.training.seq_len == 2048


def test_axolotls_eval_split_is_the_plans_and_exports_back(tmp_path):
    """val_set_size: the share of a local dataset axolotl holds out for eval is the plan's eval_fraction (what `run`
    holds out); exported back to val_set_size (axolotl) and val_size (LLaMA-Factory). A count, or the split of a
    dataset on the Hub, is named with its reason."""
    data = Path(__file__).parent / "data" / "instruction.jsonl"
    cfg = yaml.safe_load((DATA / "axolotl_lora.yaml").read_text())
    cfg["datasets"] = [{"path": str(data), "type": "alpaca"}]
    cfg["val_set_size"] = 0.1
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    plan_file = tmp_path / "plan.yaml"
    out = plan_cli("--from", str(path), "--gpu", "h100-80gb", "-o", str(plan_file))
    assert out.returncode == 0, out.stderr
    plan = yaml.safe_load(plan_file.read_text())
    assert plan["dataset"]["eval_fraction"] == 0.1 and plan["dataset"]["path"] == str(data)
    for tool, key in (("axolotl", "val_set_size"), ("llamafactory", "val_size")):
        exported = tmp_path / f"{tool}.yaml"
        out = subprocess.run([sys.executable, "-m", "loraplan.cli", "export", str(plan_file), "--to", tool, "-o",
                              str(exported)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert yaml.safe_load(exported.read_text())[key] == 0.1
    cfg["val_set_size"] = 200  # rows, not a share
    path.write_text(yaml.safe_dump(cfg))
    j = plan_json("--from", str(path), "--gpu", "h100-80gb")
    assert "--eval-fraction" in j["from_config"]["ignored"]["val_set_size"]
    assert j["plan"]["dataset"]["eval_fraction"] == 0.0
