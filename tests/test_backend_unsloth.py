"""The Unsloth backend with the real library, on Unsloth's CPU backend (unsloth_zoo.cpu): run these in the
environment `.ci/unsloth-env` builds (`$(bash .ci/unsloth-env) -m pytest tests/test_backend_unsloth.py`); where
unsloth is not installed only the missing-extra error is checked.

Each training run is a fresh process, since `import unsloth` must come before trl, transformers and peft there."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

HAVE_UNSLOTH = importlib.util.find_spec("unsloth") is not None
needs_unsloth = pytest.mark.skipif(not HAVE_UNSLOTH, reason="needs unsloth: bash .ci/unsloth-env")

TRAIN = textwrap.dedent('''
    import dataclasses, json, sys
    from loraplan.executor import backends_unsloth_draft as B
    B.prepare_process()                       # first: before anything imports transformers / trl / peft
    from loraplan.executor.demo import prepare_demo
    from loraplan.executor.data import prepare_datasets
    out, method = sys.argv[1], sys.argv[2]
    plan = prepare_demo(out, max_steps=12)
    if method == "qlora":
        plan.method = "qlora"
        plan.quantization = dataclasses.replace(plan.quantization, enabled=True, compute_dtype=plan.training.dtype)
    model, tok = B.load_model(plan, plan.model.path)
    tok = B.load_tokenizer(model)
    model = B.wrap_adapter(plan, model)
    train_ds, eval_ds, _, _ = prepare_datasets(plan, tok)
    args = B.sft_args(plan, use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = B.build_trainer(plan, model, tok, train_ds, eval_ds, args=args)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    model.save_pretrained(out + "/adapter")
    quant = type(model.get_base_model().model.layers[0].mlp.down_proj.base_layer).__name__
    print("RESULT " + json.dumps({"losses": losses, "trainer": type(trainer).__module__, "base_layer": quant,
                                  "model_dir": plan.model.path}))
''')

RELOAD = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sys.argv[2])
    b = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    print("RESULT " + json.dumps({"unsloth": "unsloth" in sys.modules, "lora_B_abs": b, "finite": bool(torch.isfinite(logits).all())}))
''')


def _run(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_missing_extra_is_one_line_naming_the_install(monkeypatch):
    from loraplan.executor import backends_unsloth_draft as B

    if HAVE_UNSLOTH:
        monkeypatch.setattr(B.importlib.util, "find_spec", lambda name: None)
    why = B.check_installed()
    assert why is not None and "\n" not in why and "pip install" in why and "unsloth" in why


@needs_unsloth
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_unsloth_trains_and_the_adapter_loads_in_plain_peft(tmp_path, method):
    out = str(tmp_path / "run")
    r = _run(TRAIN, out, method)
    losses = r["losses"]
    assert len(losses) >= 10 and losses[-1] < losses[0] - 0.5, losses  # the demo's loss falls
    assert r["trainer"].startswith("trl")  # trl's SFTTrainer, as Unsloth patched it
    assert r["base_layer"] == ("Linear4bit" if method == "qlora" else "Linear")
    back = _run(RELOAD, r["model_dir"], out + "/adapter")
    assert back["unsloth"] is False and back["finite"] and back["lora_B_abs"] > 0
