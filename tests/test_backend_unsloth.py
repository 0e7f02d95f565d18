"""The Unsloth backend with the real library, on Unsloth's CPU backend (unsloth_zoo.cpu): run in the environment
`.ci/unsloth-env` builds (`"$(bash .ci/unsloth-env)" -m pytest tests/test_backend_unsloth.py`, as .ci/run does).
Where unsloth is not installed only the missing extra's one-line error is checked.

Each run is a fresh `loraplan run --demo --backend unsloth` process: `import unsloth` must come before trl,
transformers and peft there, as in every run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import subprocess_env

HAVE_UNSLOTH = importlib.util.find_spec("unsloth") is not None
needs_unsloth = pytest.mark.skipif(not HAVE_UNSLOTH, reason="needs unsloth, in its own environment: bash .ci/unsloth-env")

RELOAD = textwrap.dedent('''
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    from peft import PeftModel
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, sys.argv[2])
    b = sum(float(p.abs().sum()) for n, p in model.named_parameters() if "lora_B" in n)
    logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    print("RESULT " + json.dumps({"unsloth": "unsloth" in sys.modules, "lora_B_abs": b,
                                  "finite": bool(torch.isfinite(logits).all())}))
''')


def _demo(out, *extra, steps=24, **kw):
    return subprocess.Popen([sys.executable, "-m", "loraplan.executor.cli", "run", "--demo", "--backend", "unsloth",
                             "--output-dir", str(out), "--max-steps", str(steps), *extra], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc, timeout=600):
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def _losses(out):
    return [r["loss"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["kind"] == "train" and "loss" in r]


def _adapter(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.skipif(HAVE_UNSLOTH, reason="unsloth is installed here; the missing extra is checked where it is not")
def test_a_missing_extra_is_one_line_naming_the_install_command(tmp_path):
    code, _, stderr = _finish(_demo(tmp_path / "out"), timeout=120)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, stderr
    assert "unsloth" in lines[0] and 'pip install "loraplan[unsloth]"' in lines[0]


def test_the_reason_names_the_install_command_without_importing(monkeypatch):
    from loraplan.executor.backends import unsloth as backend

    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    why = backend.why_not_installed()
    assert why is not None and "\n" not in why and 'pip install "loraplan[unsloth]"' in why


@needs_unsloth
@pytest.mark.slow
def test_the_demo_trains_on_unsloth_and_its_adapter_loads_in_plain_peft(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = _finish(_demo(out, steps=30))
    assert code == 0, stderr[-3000:]
    assert "Unsloth" in stdout + stderr  # its CPU backend announced itself: the run went through unsloth
    plan = (out / "plan.yaml").read_text()
    assert "backend: unsloth" in plan
    losses = _losses(out)
    assert len(losses) >= 5 and losses[-1] < losses[0] - 1.0, losses  # the demo's loss falls
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30
    back = subprocess.run([sys.executable, "-c", RELOAD, str(out / "model"), str(out / "adapter")],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert back.returncode == 0, back.stderr[-3000:]
    r = json.loads(next(ln for ln in back.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert r["unsloth"] is False and r["finite"] and r["lora_B_abs"] > 0


@needs_unsloth
@pytest.mark.slow
def test_kill_and_resume_gives_the_same_adapter(tmp_path):
    steps = 40
    ref = tmp_path / "ref"
    code, _, stderr = _finish(_demo(ref, steps=steps))
    assert code == 0, stderr[-3000:]

    out = tmp_path / "out"
    proc = _demo(out, steps=steps)
    deadline = time.time() + 300
    while not any(s >= 10 for s in _steps(out)):  # well into training, before the end
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the demo logged no step 10 in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    code, _, stderr = _finish(proc)
    assert code == 130, stderr[-3000:]
    stopped = json.loads((out / "summary.json").read_text())["steps"]
    assert 10 <= stopped < steps and (out / f"checkpoint-{stopped}" / "COMPLETE").exists()

    code, _, stderr = _finish(_demo(out, "--resume", steps=steps))
    assert code == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps and summary["resumed_from_step"] == stopped
    a, b = _adapter(out), _adapter(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-4, k


def _steps(out):
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r["step"] for r in rows if r.get("kind") == "train"]


@needs_unsloth
@pytest.mark.slow
def test_the_launchers_workers_import_unsloth_first(tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = _finish(_demo(out, "--num-processes", "2", steps=8))
    assert code == 0, stderr[-3000:]
    assert "strategy: ddp" in (out / "plan.yaml").read_text()
    # `import unsloth` announces its CPU backend: once in `loraplan run`, once in each of the two workers
    # (executor/worker.py calls the backend's prepare_process before anything else)
    said = (stdout + stderr).count("no GPU found, training on CPU")
    assert said == 3, (stdout + stderr)[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
