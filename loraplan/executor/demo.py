"""`loraplan run --demo`: a tiny random-weight Llama trained with LoRA on a shipped dataset, in under a minute on a
CPU, with the same report as a real run. Needs no download or GPU."""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

from loraplan.planner.planfile.schema import Plan

from .errors import RunError

DEMO_NAME = "loraplan-demo"


DEMO_BATCH = 6  # sequences per step, over all processes


def demo_plan(model_dir: str, data_path: str, output_dir: str, max_steps: int = 60, strategy: Optional[str] = None,
              num_processes: int = 1, backend: Optional[str] = None) -> Plan:
    """The demo's plan, made by the planner like any other (LoRA r=8 on every linear layer, on the CPU in fp32,
    a memorizable dataset), with a high learning rate and frequent logging so a minute shows the loss fall.

    num_processes > 1 plans the demo over that many CPU processes (the planner picks ddp: a replica this small fits
    anywhere); strategy fsdp or fsdp-offload asks the planner for a sharded plan instead (`--strategy` of `plan`),
    so its memory terms are the sharded ones. backend: the training backend (planner/plugins/backends.py; default
    hf), planned like `plan --backend`."""
    from loraplan.planner.api import PlanRequest, make_plan
    from loraplan.planner.errors import InputError
    from loraplan.planner.plugins.strategies import STRATEGIES

    chosen = STRATEGIES[strategy] if strategy else None  # None: the planner's default for the process count
    if chosen and chosen.max_world_size is not None and num_processes > chosen.max_world_size:
        others = [n for n, s in STRATEGIES.items() if s.max_world_size is None]
        raise RunError(f"--strategy {strategy} trains in one process; for --num-processes {num_processes} choose "
                       f"{', '.join(others[:-1])} or {others[-1]}")
    if chosen and num_processes < chosen.min_world_size:
        raise RunError(f"--strategy {strategy} needs --num-processes {chosen.min_world_size} or more")
    per_process = max(1, round(DEMO_BATCH / num_processes))
    try:
        result = make_plan(PlanRequest(
            model=model_dir, gpu="cpu", num_gpus=num_processes, method="lora", rank=8, alpha=16, dropout=0.0,
            seq_len=128, batch_size=per_process, global_batch_size=per_process * num_processes, learning_rate=3e-3,
            max_steps=max_steps, dataset=data_path, output_dir=output_dir, fit_table=False,
            strategy=strategy if chosen and chosen.sharded else "auto",  # the default picks cpu or ddp
            **({"backend": backend} if backend else {}),
        ))
    except InputError as exc:
        raise RunError(str(exc)) from None
    plan = result.plan
    plan.model.name = DEMO_NAME
    plan.training = dataclasses.replace(plan.training, warmup_ratio=0.05, logging_steps=5, save_steps=max_steps,
                                        save_total_limit=1)
    plan.reasons["demo"] = "a tiny random-weight model that shows the whole run path on any machine"
    plan.validate()
    return plan


def prepare_demo(output_dir: str, max_steps: int = 60, strategy: Optional[str] = None, num_processes: int = 1,
                 backend: Optional[str] = None) -> Plan:
    """Build the demo model under OUTPUT_DIR/model (once) and return the demo plan."""
    from .run_files import PLAN_FILE
    from .tiny import build_tiny_model, demo_data_path

    saved = os.path.join(output_dir, PLAN_FILE)
    if os.path.exists(saved):
        with open(saved, encoding="utf-8") as f:
            if f"name: {DEMO_NAME}" not in f.read():
                raise RunError(f"output dir {output_dir} holds another plan's run; choose another --output-dir for the demo")
    model_dir = os.path.join(output_dir, "model")
    if not os.path.exists(os.path.join(model_dir, "model.safetensors")):
        build_tiny_model(model_dir, arch="llama", hidden_size=64, num_layers=2, seed=0)
    return demo_plan(os.path.abspath(model_dir), demo_data_path(), output_dir, max_steps=max_steps,
                     strategy=strategy, num_processes=num_processes, backend=backend)
