"""`loraplan run` end to end on the CPU: LoRA and QLoRA on a tiny random Llama, every dataset format."""

from __future__ import annotations

import json
import os

import pytest

from conftest import build_plan, data_file, planned, requires_run, write_plan

pytestmark = [requires_run, pytest.mark.slow]


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _summary(out):
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_adapter_loads(model_dir, adapter_dir, quantized=False):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs = dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                             bnb_4bit_compute_dtype=torch.float32),
                      device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    model = PeftModel.from_pretrained(base, adapter_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B starts at zero
    return model


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_run_trains_saves_and_reports(method, tiny_model_dir, tmp_path, cli_run):
    """The planner's plan, run as written (only its checkpoint and logging cadence shortened for the test)."""
    out = tmp_path / "out"
    plan = planned(tiny_model_dir, data_file("instruction.jsonl"), str(out), method=method, max_steps=30)
    assert plan.strategy == "cpu" and plan.quantization.enabled == (method == "qlora")
    plan.training.save_steps, plan.training.save_total_limit, plan.training.logging_steps = 10, 2, 3
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    assert "predicted" in result.stdout and "observed" in result.stdout and str(out / "adapter") in result.stdout

    names = set(os.listdir(out))
    assert {"adapter", "plan.yaml", "metrics.jsonl", "summary.json", "checkpoint-20", "checkpoint-30"} <= names
    assert "checkpoint-10" not in names  # save_total_limit 2
    for f in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(out / "adapter" / f)
    for f in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "COMPLETE"):
        assert os.path.exists(out / "checkpoint-30" / f)

    rows = [r for r in _rows(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1] + list(range(3, 31, 3))  # 30 steps: at most every 30 // 10
    for r in rows:
        assert {"step", "loss", "learning_rate", "tokens_per_s", "peak_memory_gib"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["peak_memory_gib"] is None  # no GPU
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"], [r["loss"] for r in rows]

    s = _summary(out)
    assert s["status"] == "completed" and s["steps"] == 30 and s["observed_peak_gib"] is None
    assert s["predicted_peak_gib"] == plan.prediction.per_gpu_gib and s["tokens_per_s"] > 0 and s["wall_s"] > 0
    assert s["truncated_sequences"] == 0 and s["adapter_dir"] == str(out / "adapter")
    assert s["train_loss"] > 0

    with open(out / "adapter" / "adapter_config.json") as f:
        cfg = json.load(f)
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 16 and cfg["base_model_name_or_path"] == tiny_model_dir
    assert sorted(cfg["target_modules"]) == sorted(plan.lora.target_modules)
    _check_adapter_loads(tiny_model_dir, str(out / "adapter"), quantized=method == "qlora")


@pytest.mark.parametrize("name", ["chat.jsonl", "text.csv", "instruction.json", "parquet"])
def test_each_format_and_file_type_trains(name, tiny_model_dir, tmp_path, cli_run):
    if name == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(line) for line in open(data_file("chat.jsonl"), encoding="utf-8")]
        path = str(tmp_path / "chat.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = data_file(name)
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, path, str(out), max_steps=3, logging_steps=1, save_steps=3)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["steps"] == 3 and s["dataset"]["format"] == {"chat.jsonl": "chat", "parquet": "chat"}.get(
        name, "text" if name.startswith("text") else "instruction")


def test_truncation_is_counted_in_the_report(tiny_model_dir, tiny_tokenizer, tmp_path, cli_run):
    from loraplan.executor.data import load_rows, tokenize_rows

    rows, fmt = load_rows(data_file("text.jsonl"), "auto")
    full, _ = tokenize_rows(rows, fmt, tiny_tokenizer, seq_len=10_000, path="x")
    longer = sum(len(ids) > 8 for ids in full["input_ids"])
    assert longer >= 3
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(out), max_steps=2, seq_len=8, save_steps=2)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    assert _summary(out)["truncated_sequences"] == longer
    assert "truncated sequences" in result.stdout


def _first_step(tiny_model_dir, out, loss):
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), loss=loss, max_steps=2,
                      logging_steps=1, save_steps=2)
    from loraplan.executor.runner import execute

    execute(plan)
    with open(out / "checkpoint-2" / "trainer_state.json") as f:
        return json.load(f)["log_history"]


def test_plan_loss_picks_the_loss_path(tiny_model_dir, tmp_path):
    """fused: trl's compute_loss (it logs entropy / token accuracy from the fused head); full: the model's own loss
    over materialized logits (no such metrics). Both give the same loss value at step 1, in one test so neither
    case depends on the other having run first."""
    fused = _first_step(tiny_model_dir, tmp_path / "fused", "fused")
    full = _first_step(tiny_model_dir, tmp_path / "full", "full")
    from loraplan.planner.installed import trl_fused_loss_runs_on

    # trl < 1.16 has no fused loss off Triton: on this CPU the fused plan falls back to the full path (installed.py)
    assert ("mean_token_accuracy" in fused[0]) == trl_fused_loss_runs_on("cpu")
    assert "mean_token_accuracy" not in full[0]
    assert fused[0]["loss"] == pytest.approx(full[0]["loss"], rel=1e-4)


def test_eval_split_reports_eval_loss(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), eval_fraction=0.25, max_steps=4,
                      save_steps=2)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["eval_loss"] is not None and s["eval_dataset"]["rows"] == 2
    assert any(r["kind"] == "eval" for r in _rows(out))


def test_qlora_loads_nf4_and_upcasts_nothing(tiny_model_dir, tmp_path):
    """QLoRA: every linear but lm_head in NF4; embeddings, norms and lm_head stay in the plan's dtype (bf16)."""
    import bitsandbytes as bnb
    import torch

    from loraplan.executor.model import load_base_model, wrap_lora

    plan = build_plan(tiny_model_dir, data_file("text.jsonl"), str(tmp_path), method="qlora", dtype="bfloat16")
    model = wrap_lora(plan, load_base_model(plan, tiny_model_dir))
    base = model.get_base_model()
    q = base.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4" and q.weight.quant_state.nested
    assert q.compute_dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert base.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16

    # Still so once SFTTrainer has the model (it would upcast if given a peft_config with a 4-bit model).
    from loraplan.executor.data import prepare_datasets
    from loraplan.executor.model import load_tokenizer
    from loraplan.executor.train import Placement, _trainer_class, sft_config

    tokenizer = load_tokenizer(tiny_model_dir, False)
    train_ds = prepare_datasets(plan, tokenizer)[0]
    trainer = _trainer_class()(model=model, args=sft_config(plan, Placement(1, 0, 0, False), has_eval=False),
                               train_dataset=train_ds, processing_class=tokenizer, plan_loss="fused",
                               keep_checkpoints=1)
    for name, p in trainer.model.named_parameters():
        if "embed" in name or "norm" in name or "lm_head" in name or "lora_" in name:
            assert p.dtype == torch.bfloat16, name  # trl keeps QLoRA adapters in bf16 on bf16 plans


def test_demo_runs_and_the_loss_falls(tmp_path, cli_run):
    out = tmp_path / "demo"
    result = cli_run("--demo", "--output-dir", out)
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["status"] == "completed" and s["final_loss"] < 0.5 * s["first_loss"]
    # running the demo again replaces its own earlier run
    result = cli_run("--demo", "--output-dir", out, "--max-steps", "5")
    assert result.exit_code == 0, result.output
    assert _summary(out)["steps"] == 5


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, tiny_model_dir):
    from loraplan.executor.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-mixtral"), arch="mixtral", seed=0)


@pytest.mark.parametrize(
    "variant",
    [
        dict(packing=True, dataset="text.jsonl"),
        dict(optimizer="adamw-8bit"),
        dict(optimizer="paged-adamw-8bit", method="qlora"),
        dict(method="qlora", dtype="bfloat16", grad_checkpointing=True),
        dict(dtype="bfloat16", grad_checkpointing=True, loss="full"),
        dict(max_steps=-1, num_epochs=1.0),  # 8 rows / micro-batch 4: 2 steps
        dict(moe=True),
    ],
    ids=["packing", "adamw-8bit", "paged-8bit-qlora", "qlora-bf16-ckpt", "bf16-ckpt-full-loss", "epochs", "moe-experts"],
)
def test_plan_variants_train(variant, tiny_model_dir, tiny_moe_dir, tmp_path, cli_run):
    variant = dict(variant)
    model = tiny_model_dir
    extra = {}
    if variant.pop("moe", False):  # LoRA on the fused 3-D expert weights through peft's target_parameters
        model = tiny_moe_dir
        extra = dict(target_modules=["q_proj", "v_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    dataset = data_file(variant.pop("dataset", "instruction.jsonl"))
    settings = dict(max_steps=4, save_steps=4, logging_steps=1)
    settings.update(variant)
    out = tmp_path / "out"
    plan = build_plan(model, dataset, str(out), **extra, **settings)
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    s = _summary(out)
    assert s["status"] == "completed" and s["steps"] == (2 if settings["max_steps"] == -1 else 4)
    assert s["final_loss"] < s["first_loss"]
    if extra:
        with open(out / "adapter" / "adapter_config.json") as f:
            assert sorted(json.load(f)["target_parameters"]) == sorted(extra["target_parameters"])


def test_hub_id_from_the_local_cache_trains_and_merges(tiny_model_dir, tmp_path, cli_run, monkeypatch):
    """model.hub_id is looked up in the local Hugging Face cache only; merge finds the same base there."""
    import shutil

    from click.testing import CliRunner

    from loraplan.executor.cli import merge_command

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (cache / "models--tiny--llama" / "refs").mkdir()
    (cache / "models--tiny--llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    out = tmp_path / "out"
    plan = build_plan("unused", data_file("instruction.jsonl"), str(out), max_steps=2, save_steps=2)
    plan.model.path, plan.model.hub_id, plan.model.source = None, "tiny/llama", "hub-cache"
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output
    with open(out / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "tiny/llama"
    merged = CliRunner().invoke(merge_command, [str(out / "adapter"), "--output", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert os.path.exists(tmp_path / "merged" / "config.json")
