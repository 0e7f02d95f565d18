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

    from executor.cli import merge_command

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
