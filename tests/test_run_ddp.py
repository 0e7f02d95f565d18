"""Data-parallel training: two CPU processes over gloo through accelerate's launcher."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import build_plan, data_file, requires_run, write_plan

pytestmark = [requires_run, pytest.mark.slow]


def test_two_process_ddp_on_cpu_produces_an_adapter(tiny_model_dir, tmp_path, cli_run):
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), strategy="ddp", num_gpus=2,
                      micro_batch_size=2, max_steps=6, save_steps=3, logging_steps=1)
    assert plan.training.global_batch_size == 4
    result = cli_run(write_plan(plan, tmp_path / "plan.yaml"))
    assert result.exit_code == 0, result.output + open(out / "launch.log").read()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 6 and summary["status"] == "completed"
    assert os.path.exists(out / "adapter" / "adapter_model.safetensors")
    assert os.path.exists(out / "checkpoint-6" / "COMPLETE")
    # each rank saved its own RNG state: the checkpoint can resume both processes
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-6"))
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))
    # two processes x micro-batch 2 sequences per step
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out / "adapter"))


def test_ddp_qlora_resumes_after_a_save_cut_short(tiny_model_dir, tmp_path, cli_run):
    """QLoRA under DDP (each process holds the whole 4-bit model); a crash during the last save leaves a checkpoint
    without its COMPLETE marker, and --resume continues both processes from the one before."""
    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), method="qlora", strategy="ddp",
                      num_gpus=2, micro_batch_size=2, max_steps=4, save_steps=2, logging_steps=1)
    path = write_plan(plan, tmp_path / "plan.yaml")
    first = cli_run(path)
    assert first.exit_code == 0, first.output + open(out / "launch.log").read()[-3000:]
    os.unlink(out / "checkpoint-4" / "COMPLETE")
    shutil.rmtree(out / "adapter")

    resumed = cli_run(path, "--resume")
    assert resumed.exit_code == 0, resumed.output + open(out / "launch.log").read()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4 and summary["num_processes"] == 2
    assert os.path.exists(out / "checkpoint-4" / "COMPLETE") and os.path.exists(out / "adapter")

    # --max-steps changes the plan (and its learning-rate schedule): resuming under it is refused
    refused = cli_run(path, "--resume", "--max-steps", "6")
    assert refused.exit_code == 2 and "training.max_steps" in refused.stderr
