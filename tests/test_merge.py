"""`loraplan merge`: the merged model's logits match the base + adapter's."""

from __future__ import annotations

import json
import os

import pytest

from conftest import build_plan, data_file, requires_run, write_plan

pytestmark = [requires_run, pytest.mark.slow]


@pytest.fixture()
def cli_merge():
    from click.testing import CliRunner

    from loraplan.executor.cli import merge_command

    return lambda *args: CliRunner().invoke(merge_command, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_merged_logits_match_the_adapter(method, tiny_model_dir, tmp_path, cli_run, cli_merge):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), method=method, max_steps=6,
                      save_steps=6)
    assert cli_run(write_plan(plan, tmp_path / "plan.yaml")).exit_code == 0
    merged_dir = tmp_path / "merged"
    result = cli_merge(out / "adapter", "--output", merged_dir, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert os.path.exists(merged_dir / "config.json") and os.path.exists(merged_dir / "tokenizer.json")
    assert not any(name.startswith("adapter") for name in os.listdir(merged_dir))

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids = tok(["### Instruction:\nCount to three.\n\n### Response:\n"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = reference(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (a - plain).abs().max() > 1e-3  # the adapter changed something


def test_merge_errors(tmp_path, cli_merge):
    result = cli_merge(tmp_path / "nope", "--output", tmp_path / "m")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    (tmp_path / "a").mkdir()
    result = cli_merge(tmp_path / "a", "--output", tmp_path / "m")
    assert result.exit_code == 2 and "no adapter_config.json" in result.stderr
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    result = cli_merge(tmp_path / "a", "--output", tmp_path / "m")
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the output folder and faults from the environment -----------------------------------------------------------


@pytest.fixture()
def adapter_dir(tiny_model_dir, tmp_path):
    """A real (untrained) LoRA adapter on the tiny model, saved by peft: what merge reads, without a training run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    path = tmp_path / "adapter"
    model.save_pretrained(str(path))
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_model_dir
    return path


@pytest.fixture()
def no_model_load(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the output folder was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _one_line(result, code, *fragments):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_merge_checks_its_output_folder_before_loading(adapter_dir, tmp_path, cli_merge, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for folder, cause in ((blocker / "merged", "is a file, not a folder"), ("/proc/loraplan-test/merged", "/proc")):
        _one_line(cli_merge(adapter_dir, "--output", folder), 2, f"cannot create output dir {folder}", cause)
    _one_line(cli_merge(adapter_dir, "--output", blocker), 2, "exists and is not a directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_line(cli_merge(adapter_dir, "--output", full), 2, f"output dir {full} is not empty")
    assert os.listdir(full) == ["keep.txt"]
    assert not os.path.exists(str(full) + ".tmp")


def test_merge_with_missing_adapter_weights_names_the_file_and_stays_offline(adapter_dir, tmp_path, cli_merge,
                                                                            monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    os.unlink(adapter_dir / "adapter_model.safetensors")
    line = _one_line(cli_merge(adapter_dir, "--output", tmp_path / "merged"), 2, "holds no adapter weights",
                     str(adapter_dir / "adapter_model.safetensors"))
    assert "Name or service" not in line
    assert not (tmp_path / "merged").exists()


def test_merge_names_truncated_base_weights(adapter_dir, tiny_model_dir, tmp_path, cli_merge):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
    weights = base / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    _one_line(cli_merge(adapter_dir, "--output", tmp_path / "merged"), 2, f"weights file {weights} is truncated")
    assert not (tmp_path / "merged").exists()


def test_merge_into_a_folder_another_merge_holds_is_refused(adapter_dir, tmp_path, cli_merge):
    """The lock is the same one `run` takes: held here by a real second process."""
    import subprocess
    import sys
    import time

    from conftest import subprocess_env

    merged = tmp_path / "merged"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom loraplan.executor.outputs import lock_output_dir\n"
         "with lock_output_dir(sys.argv[1], 'loraplan merge elsewhere', flag='--output'):\n"
         "    print('held', flush=True); time.sleep(60)\n", str(merged)],
        env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _one_line(cli_merge(adapter_dir, "--output", merged), 2, f"output dir {merged} is in use by",
                  "loraplan merge elsewhere", f"pid {holder.pid}", "--output")
    finally:
        holder.kill()
        holder.wait()
    t0 = time.time()
    result = cli_merge(adapter_dir, "--output", merged, "--dtype", "fp32")  # the killed holder's lock file: no block
    assert result.exit_code == 0, result.output
    assert (merged / "model.safetensors").exists() and not (merged / ".loraplan.lock").exists()
    assert not os.path.exists(str(merged) + ".tmp") and time.time() - t0 < 120
