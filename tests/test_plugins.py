"""A new memory saver or strategy is its table entry (plus, for a saver, its facts in tables/savers.yaml), and
nothing else: the planner, the plan file and `run`'s settings pick it up from the entry.

Each test copies the package, adds one entry the way a contributor would (text appended to the table and its
facts, no other file touched), and plans and reads it back in a fresh interpreter on that copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _copy_package(tmp_path: Path) -> Path:
    dest = tmp_path / "tree"
    shutil.copytree(ROOT / "loraplan", dest / "loraplan", ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _run(tree: Path, code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tree)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _insert_entry(path: Path, before: str, entry: str) -> None:
    text = path.read_text()
    assert text.count(before) == 1, f"{path.name}: the table's end marker moved"
    path.write_text(text.replace(before, entry + before))


def test_a_new_saver_is_its_entry_and_its_facts(tmp_path):
    tree = _copy_package(tmp_path)
    pkg = tree / "loraplan"
    # 1. the entry: a saver that changes no planned memory and reaches the trainer as an SFTConfig field
    _insert_entry(pkg / "planner" / "plugins" / "savers.py", ")}\nassert tuple(SAVERS)",
                  '    Saver("empty_cache", needs_checkpointing=False, applies=_always, reshape=_unchanged,\n'
                  '          gpu_terms=_no_terms, host_terms=_no_host_terms, extra_seconds=_no_seconds, excludes=None,\n'
                  '          needs_cuda=False, library=None, install=None, chosen_automatically=False,\n'
                  '          settings=_on_off),\n')
    # 2. its facts
    facts_path = pkg / "tables" / "savers.yaml"
    facts = yaml.safe_load(facts_path.read_text())
    facts["savers"]["empty_cache"] = {
        "short": "empty-cache", "default": {"fixed": "off", "seq_len_max": "off"},
        "run": {"sft_config": {"torch_empty_cache_steps": 10}},
        "applied_short": "trl SFTConfig torch_empty_cache_steps=10",
        "speed_source": "cited: a test saver", "applied_by": "transformers TrainingArguments.torch_empty_cache_steps",
    }
    facts_path.write_text(yaml.safe_dump(facts, sort_keys=False))

    code = """
import json
from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.planfile.schema import Plan
from loraplan.executor.saver_settings import sft_config_settings
res = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", savers="empty-cache", fit_table=False))
back = Plan.from_dict(res.plan.to_dict())
off = make_plan(PlanRequest(model="llama-3.1-8b", gpu="rtx-4090", fit_table=False))
print(json.dumps({"on": back.savers.on, "settings": sft_config_settings(back),
                  "off_settings": sft_config_settings(off.plan), "chosen": res.to_json()["savers"]["chosen"]}))
"""
    got = _run(tree, code)
    assert got["on"] == got["chosen"] == ["empty_cache"]
    assert got["settings"]["torch_empty_cache_steps"] == 10
    assert got["off_settings"]["torch_empty_cache_steps"] is False  # off: the config says so plainly


def test_a_new_strategy_is_its_entry(tmp_path):
    tree = _copy_package(tmp_path)
    strategies = tree / "loraplan" / "planner" / "plugins" / "strategies.py"
    # a data-parallel strategy like ddp that the decision never picks by itself (auto=False)
    _insert_entry(strategies, ")}\n\n\ndef strategy_for(",
                  '    Strategy("ddp-pinned", lambda hw: False, data_parallel=True, multi_node=True, sharded=False,\n'
                  '             offload_params=False, collective="all-reduce", min_world_size=2, max_world_size=None,\n'
                  '             device="any", auto=False, launcher="accelerate", saves=_RANK0_SAVES, budget=_ddp,\n'
                  '             describe=lambda hw: f"data-parallel over {_where(hw)}, pinned by --strategy"),\n')
    code = """
import json
from loraplan.planner.api import PlanRequest, make_plan
from loraplan.planner.errors import InputError
from loraplan.planner.planfile.schema import Plan
from loraplan.planner.plugins.strategies import STRATEGIES
from loraplan.executor.runner import LAUNCHERS
res = make_plan(PlanRequest(model="llama-3.2-1b", gpu="h100-80gb", num_gpus=2, strategy="ddp-pinned",
                            fit_table=False))
auto = make_plan(PlanRequest(model="llama-3.2-1b", gpu="h100-80gb", num_gpus=2, fit_table=False))
back = Plan.from_dict(res.plan.to_dict())
try:
    make_plan(PlanRequest(model="llama-3.2-1b", gpu="h100-80gb", strategy="ddp-pinned", fit_table=False))
    refused = None
except InputError as exc:
    refused = str(exc)
print(json.dumps({"strategy": back.strategy, "auto": auto.plan.strategy, "refused": refused,
                  "launcher": LAUNCHERS[STRATEGIES[back.strategy].launcher].__name__,
                  "accum": back.training.grad_accum_steps * back.training.micro_batch_size,
                  "global": back.training.global_batch_size}))
"""
    got = _run(tree, code)
    assert got["strategy"] == "ddp-pinned" and got["auto"] != "ddp-pinned"
    assert got["launcher"] == "_accelerate"
    assert got["global"] == 2 * got["accum"]  # the batch divides over the world, as data-parallel entries do
    assert got["refused"] == "--strategy ddp-pinned needs --num-gpus 2 or more"
