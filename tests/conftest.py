"""Shared fixtures: tiny random-weight models (built once per session) and plans built from the dataclasses.

Plans are built directly (not through the planner) so executor tests pin every field they depend on; the e2e
tests also go through `planner.api.make_plan` when it exists.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# every process the tests start (accelerate's workers included) imports `loraplan` from this tree, not from an
# installed copy that may be another checkout's (an editable install points at one worktree only)
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(ROOT):
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _have_run_stack() -> bool:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


requires_run = pytest.mark.skipif(not _have_run_stack(), reason='needs the [run] extra: pip install -e ".[run]"')


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains a model or starts processes (seconds to a minute); runs by default")


def one_line_error(result, code=2, *fragments):
    """Assert a CLI result is exit `code` with exactly one stderr line, "Error: ...", naming each fragment."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def wait_for_file(path, proc, timeout: float) -> None:
    """Wait until `path` exists while the subprocess `proc` runs; fail if it ends first or time runs out."""
    import time

    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear within {timeout:.0f} s"
        time.sleep(0.01)


def data_file(name: str) -> str:
    return str(DATA / name)


def build_plan(model_dir: str, dataset: str, output_dir: str, *, method: str = "lora", strategy: str = "cpu",
               num_gpus: int = 1, num_nodes: int = 1, fmt: str = "auto", r: int = 8, eval_path=None,
               eval_fraction: float = 0.0, target_modules=None, target_parameters=None, distributed=None, **training):
    """A plan for a tiny model on the CPU: float32, LoRA on every linear layer, few steps, high learning rate.

    num_gpus is per node (processes on the CPU); every data-parallel strategy (ddp, fsdp, fsdp-offload) takes
    micro_batch_size sequences per process, so global_batch_size = micro x accum x num_gpus x num_nodes.
    distributed: planner.planfile.schema.Distributed fields to set (fsdp-offload gets offload_params True by default)."""
    from loraplan.planner.planfile.schema import (
        Dataset,
        Distributed,
        LoraSettings,
        Plan,
        Prediction,
        Quantization,
        Training,
    )
    from loraplan.planner.facts.hardware import Hardware
    from loraplan.planner.facts.model_ref import ModelRef
    from loraplan.planner.plugins.strategies import STRATEGIES

    t = dict(seq_len=64, micro_batch_size=4, grad_accum_steps=1, learning_rate=5e-3, max_steps=12,
             warmup_ratio=0.0, lr_scheduler="constant", logging_steps=2, save_steps=6, save_total_limit=2,
             dtype="float32", loss="fused", seed=0)
    t.update(training)
    data_parallel = num_gpus * num_nodes if STRATEGIES[strategy].data_parallel else 1
    t["global_batch_size"] = t["micro_batch_size"] * t["grad_accum_steps"] * data_parallel
    dist = {"offload_params": strategy == "fsdp-offload", **(distributed or {})}
    plan = Plan(
        model=ModelRef(name="tiny", source="directory", family="llama", path=model_dir),
        hardware=Hardware(gpu="cpu", gpu_name="CPU", memory_gib=16.0, num_gpus=num_gpus, bf16=False,
                          num_nodes=num_nodes),
        method=method,
        quantization=Quantization(enabled=method == "qlora", compute_dtype=t["dtype"]),
        lora=LoraSettings(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                          target_modules=list(TARGETS if target_modules is None else target_modules),
                          target_parameters=list(target_parameters or [])),
        training=Training(**t),
        prediction=Prediction(per_gpu_gib=1.0, terms={"weights": 1.0}, margin=0.1),
        strategy=strategy,
        dataset=Dataset(path=dataset, format=fmt, eval_path=eval_path, eval_fraction=eval_fraction),
        distributed=Distributed(**dist),
        output_dir=output_dir,
    )
    plan.validate()
    return plan


def planned(model_dir: str, dataset: str, output_dir: str, *, method: str = "lora", **request):
    """The planner's own plan (planner.api.make_plan) for a CPU run of a tiny model."""
    from loraplan.planner.api import PlanRequest, make_plan

    req = dict(gpu="cpu", method=method, rank=8, seq_len=64, batch_size=4, global_batch_size=4,
               learning_rate=5e-3, max_steps=30)
    req.update(request)
    return make_plan(PlanRequest(model=model_dir, dataset=dataset, output_dir=output_dir, **req)).plan


def write_plan(plan, path) -> str:
    plan.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide random Llama with a byte-level BPE tokenizer (no chat template)."""
    if not _have_run_stack():
        pytest.skip('needs the [run] extra: pip install -e ".[run]"')
    import torch

    # Tiny matrices: one thread is faster than two, and far faster when other work shares the cores.
    torch.set_num_threads(1)
    from loraplan.executor.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def cli_run():
    """Invoke `run` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from loraplan.executor.cli import run_command

    def invoke(*args):
        return CliRunner().invoke(run_command, [str(a) for a in args], catch_exceptions=False)

    return invoke


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
