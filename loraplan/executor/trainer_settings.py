"""Plan to trainer settings: the one place where plan fields become trl's SFTConfig and transformers' options
(the logging interval, activation checkpointing, the optimizer's name); the savers' share of them comes from
executor/saver_settings.py."""

from __future__ import annotations

from typing import Optional

from loraplan.planner.facts import options
from loraplan.planner.facts.options import OPTIMIZERS
from loraplan.planner.planfile.schema import Plan

from . import trackers
from .device import Placement
from .saver_settings import checkpointing_settings, sft_config_settings


def effective_logging_steps(plan_logging_steps: int, max_steps: int) -> int:
    """At least ~10 logs over a short run, the plan's interval on a long one: the planner's rule."""
    return options.logging_interval(max_steps, plan_logging_steps)


def optimizer_name(plan: Plan) -> str:
    """plan.training.optimizer -> transformers' `optim` name (the planner's OPTIMIZERS table carries it)."""
    return OPTIMIZERS[plan.training.optimizer].hf_name


def checkpointing_kwargs(plan: Plan) -> Optional[dict]:
    """What transformers' activation_checkpointing_enable gets (through TrainingArguments): non-reentrant (the
    backend's checkpointing mode), and the plan's savers' settings (executor/saver_settings.py: every_n_layers,
    offload)."""
    if not plan.training.grad_checkpointing:
        return None
    from loraplan.planner.plugins.backends import BACKENDS

    # non-reentrant unless the plan's backend checkpoints otherwise (planner/plugins/backends.py)
    reentrant = BACKENDS[plan.training.backend].checkpointing == "reentrant"
    return {"use_reentrant": reentrant, **checkpointing_settings(plan)}


def sft_config(plan: Plan, place: Placement, has_eval: bool):
    """SFTConfig from the plan: every training setting comes from here."""
    from trl import SFTConfig

    t = plan.training
    return SFTConfig(
        output_dir=plan.output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        warmup_steps=t.warmup_ratio if 0 < t.warmup_ratio < 1 else 0,  # a float in (0, 1) is a ratio of all steps
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=optimizer_name(plan),
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        gradient_checkpointing=t.grad_checkpointing,
        gradient_checkpointing_kwargs=checkpointing_kwargs(plan),
        max_length=t.seq_len,
        packing=t.packing,
        **sft_config_settings(plan),  # the savers': activation_offloading, padding_free (tables/savers.yaml `run`)
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotated by PlanTrainer only after the newest checkpoint is marked complete
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.save_steps if has_eval else None,
        include_num_input_tokens_seen="non_padding",
        **trackers.trainer_settings(plan),  # report_to, run_name (executor/trackers.py)
        disable_tqdm=True,
        use_cpu=not place.use_cuda,
        ddp_find_unused_parameters=False if place.world_size > 1 else None,
        dataloader_num_workers=0,
    )
