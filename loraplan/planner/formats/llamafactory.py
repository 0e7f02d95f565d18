"""LLaMA-Factory train configs (`llamafactory-cli train config.yaml`), read into a plan request and written from a
plan.

Keys, meanings and defaults from llamafactory 0.9.5 (the wheel on PyPI): `llamafactory/hparams/model_args.py`,
`finetuning_args.py`, `data_args.py`, `parser.py` (packing defaults to stage == "pt", line 520),
`model/model_utils/misc.py` (`lora_target: all`), and transformers' TrainingArguments for the trainer keys;
docs/other-tools.md has the table.
"""

from __future__ import annotations

import os
from typing import Any

from ..facts.options import OPTIMIZERS
from ..planfile.schema import Plan
from . import common

TOOL = "llamafactory"
MARKERS = {"finetuning_type", "lora_target", "lora_rank", "cutoff_len", "quantization_bit", "stage", "template",
           "dataset_dir", "disable_gradient_checkpointing"}


def detect(keys: set[str]) -> bool:
    return len(keys & MARKERS) >= 2 or "finetuning_type" in keys


SPECIFIC_IGNORED = {
    "val_size": "the eval split is read, not planned: evaluation holds no optimizer step and the time estimate "
                "covers training",
    "dataset": "LLaMA-Factory names datasets through dataset_info.json (Hub or local); not read for token "
               "statistics: use --dataset or --train-tokens",
    "dataset_dir": "where dataset_info.json lives: not read",
    "overwrite_cache": "preprocessing cache", "preprocessing_num_workers": "preprocessing workers",
    "max_samples": "caps the rows; use --max-steps or --train-tokens for the time estimate",
    "per_device_eval_batch_size": "evaluation is not planned",
    "additional_target": "NOT counted: fully trained copies of these modules would add memory the plan omits",
    "plot_loss": "a picture of the loss", "ddp_timeout": "a timeout",
    "freeze_vision_tower": "the plan adapts the language model only",
    "train_on_prompt": "which tokens carry loss changes no memory",
}


def _fail_unless(cond: bool, message: str) -> None:
    if not cond:
        common.fail(TOOL, message)


def to_request(cfg: dict, path: str) -> common.Imported:
    imp = common.Imported(TOOL, path)
    req = imp.request
    base_dir = os.path.dirname(os.path.abspath(path))
    _fail_unless(bool(cfg.get("model_name_or_path")), "model_name_or_path is not set")
    req["model"] = str(imp.take("model_name_or_path", cfg["model_name_or_path"]))
    stage = cfg.get("stage", "sft")
    _fail_unless(stage in ("sft", "pt"), f"stage: {stage!r} is not supervised fine-tuning (sft) or pre-training (pt)")
    imp.take("stage", stage)
    ft = cfg.get("finetuning_type", "lora")
    _fail_unless(ft == "lora", f"finetuning_type: {ft!r}: loraplan plans LoRA and QLoRA (finetuning_type: lora)")
    imp.take("finetuning_type", ft)
    for key in ("use_dora", "pissa_init", "use_rslora"):
        if cfg.get(key):
            imp.ignore(key, "a LoRA variant: planned as plain LoRA (same adapter shapes)")
    bits = cfg.get("quantization_bit")
    qmethod = str(cfg.get("quantization_method", "bnb")).lower()
    if bits is not None:
        _fail_unless(bits in (4, 8, 2, 3, 5, 6), f"quantization_bit must be 2-8, got {bits!r}")
        _fail_unless(bits == 4, f"quantization_bit: {bits}: loraplan plans 16-bit LoRA or 4-bit QLoRA (quantization_bit: 4)")
        _fail_unless(qmethod in ("bnb", "bitsandbytes"),
                     f"quantization_method: {qmethod}: loraplan plans bitsandbytes NF4 QLoRA only")
        imp.take("quantization_bit", bits)
        if "quantization_method" in cfg:
            imp.take("quantization_method", cfg["quantization_method"])
        qtype = cfg.get("quantization_type", "nf4")
        _fail_unless(qtype == "nf4", f"quantization_type: {qtype}: loraplan plans NF4")
        if "quantization_type" in cfg:
            imp.take("quantization_type", qtype)
        if "double_quantization" in cfg:
            imp.ignore("double_quantization", "the plan assumes double quantization (LLaMA-Factory's default, "
                                              "bitsandbytes saves 0.4 bit per weight with it)")
    req["method"] = "qlora" if bits == 4 else "lora"
    rank = common.positive_int(TOOL, cfg, "lora_rank")
    req["rank"] = imp.take("lora_rank", 8 if rank is None else rank)  # finetuning_args.py default 8
    alpha = common.positive_int(TOOL, cfg, "lora_alpha")
    req["alpha"] = imp.take("lora_alpha", alpha or req["rank"] * 2)  # default lora_rank * 2 (finetuning_args.py)
    dropout = common.fraction(TOOL, cfg, "lora_dropout")
    req["dropout"] = imp.take("lora_dropout", 0.0 if dropout is None else dropout)
    target = str(cfg.get("lora_target", "all"))
    imp.take("lora_target", target)
    names = [t.strip() for t in target.split(",") if t.strip()]
    # "all": find_all_linear_modules, every Linear but lm_head (fused expert parameters are not Linear)
    req["targets"] = ",".join("linear-modules" if n == "all" else n for n in names)
    seq = common.positive_int(TOOL, cfg, "cutoff_len")
    req["seq_len"] = imp.take("cutoff_len", 2048 if seq is None else seq)  # data_args.py default 2048
    mb = common.positive_int(TOOL, cfg, "per_device_train_batch_size")
    imp.micro_batch_size = imp.take("per_device_train_batch_size", 8 if mb is None else mb)  # TrainingArguments: 8
    imp.grad_accum_steps = imp.take("gradient_accumulation_steps",
                                    common.positive_int(TOOL, cfg, "gradient_accumulation_steps") or 1)
    off = common.boolean(TOOL, cfg, "disable_gradient_checkpointing")
    imp.take("disable_gradient_checkpointing", bool(off))
    req["grad_checkpointing"] = "off" if off else "on"  # LLaMA-Factory checkpoints unless told not to
    if cfg.get("use_unsloth_gc"):
        imp.ignore("use_unsloth_gc", "Unsloth's offloaded checkpointing: planned as plain checkpointing")
    req["optimizer"] = common.optimizer(TOOL, imp, "optim", cfg.get("optim") or "adamw_torch")
    if cfg.get("learning_rate") is not None:
        req["learning_rate"] = imp.take("learning_rate", common.positive_number(TOOL, cfg, "learning_rate"))
    epochs = common.positive_number(TOOL, cfg, "num_train_epochs")
    req["epochs"] = imp.take("num_train_epochs", 3.0 if epochs is None else epochs)  # TrainingArguments: 3.0
    steps = cfg.get("max_steps")
    if steps is not None and steps != -1:
        req["max_steps"] = imp.take("max_steps", common.positive_int(TOOL, cfg, "max_steps"))
    packing = common.boolean(TOOL, cfg, "packing")
    neat = common.boolean(TOOL, cfg, "neat_packing")
    packed = bool(neat) or (packing if packing is not None else stage == "pt")
    imp.take("packing", packed)
    if neat is not None:
        imp.take("neat_packing", neat)
    req["savers"] = f"padding-free={'on' if packed else 'off'}"
    liger = common.boolean(TOOL, cfg, "enable_liger_kernel")
    if liger is not None:
        imp.take("enable_liger_kernel", liger)
    req["loss"] = "fused" if liger else "full"  # Liger's fused linear cross-entropy; else full fp32 logits
    if cfg.get("deepspeed"):
        common.deepspeed(TOOL, imp, "deepspeed", cfg["deepspeed"], base_dir)
    common.hf_fsdp(TOOL, imp, cfg)
    if cfg.get("output_dir"):
        req["output_dir"] = str(imp.take("output_dir", cfg["output_dir"]))
    if cfg.get("use_unsloth"):
        imp.ignore("use_unsloth", "Unsloth's kernels are not planned here: the plan is the standard stack's")
    common.ignore_rest(imp, cfg, set(), SPECIFIC_IGNORED)
    return imp


SUGGESTION_KEYS = {
    r"--method (auto|qlora)": lambda m: "`quantization_bit: 4`",
    r"--grad-checkpointing (auto|on)": lambda m: "`disable_gradient_checkpointing: false`",
    r"drop --batch-size": lambda m: "`per_device_train_batch_size: 1` (raise `gradient_accumulation_steps` to keep "
                                    "the global batch)",
    r"--optimizer adamw-8bit": lambda m: "`optim: adamw_bnb_8bit`",
    r"--seq-len (\d+)": lambda m: f"`cutoff_len: {m.group(1)}`",
    r"--savers auto": lambda m: "`packing: true` (the only saver LLaMA-Factory has)",
}


def export(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    t, lora, sv = plan.training, plan.lora, plan.savers
    cfg: dict[str, Any] = {"model_name_or_path": plan.model.hub_id or plan.model.path or plan.model.name,
                           "stage": "sft", "do_train": True, "finetuning_type": "lora",
                           "lora_rank": lora.r, "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
                           "lora_target": ",".join(lora.target_modules)}
    if plan.method == "qlora":
        cfg.update(quantization_bit=4, quantization_method="bnb", quantization_type="nf4",
                   double_quantization=bool(plan.quantization.double_quant))
    cfg.update(cutoff_len=t.seq_len, per_device_train_batch_size=t.micro_batch_size,
               gradient_accumulation_steps=t.grad_accum_steps, disable_gradient_checkpointing=not t.grad_checkpointing,
               optim=OPTIMIZERS[t.optimizer].hf_name, learning_rate=t.learning_rate, num_train_epochs=t.num_epochs)
    if t.max_steps and t.max_steps > 0:
        cfg["max_steps"] = t.max_steps
    cfg["packing"] = "padding_free" in sv.on
    if "padding_free" in sv.on:
        cfg["neat_packing"] = True  # packed rows kept apart (block-diagonal attention), as padding-free trl does
    cfg["enable_liger_kernel"] = t.loss == "fused"
    cfg["bf16"] = t.dtype == "bfloat16"
    cfg["fp16"] = t.dtype == "float16"
    cfg["output_dir"] = plan.output_dir
    if plan.dataset.eval_fraction:
        cfg["val_size"] = plan.dataset.eval_fraction
    if plan.strategy in ("fsdp", "fsdp-offload"):
        cfg["fsdp"] = "full_shard auto_wrap" + (" offload" if plan.strategy == "fsdp-offload" else "")
        cfg["fsdp_config"] = {"fsdp_version": 2, "reshard_after_forward": plan.distributed.reshard_after_forward,
                              "cpu_ram_efficient_loading": plan.distributed.cpu_ram_efficient_loading}
    cannot = []
    if lora.target_parameters:
        cannot.append("LoRA on fused MoE expert parameters (" + ", ".join(lora.target_parameters)
                      + "): lora_target names modules only, so the experts stay frozen")
    if sv.every_n_layers > 1:
        cannot.append(f"checkpointing every {sv.every_n_layers}th layer only")
    if "offload_checkpoints" in sv.on or "offload_activations" in sv.on:
        cannot.append("offloading checkpoints or activations to the host")
    if "mlp_tiling" in sv.on:
        cannot.append("tiled MLP")
    cannot.append("the dataset: register " + (plan.dataset.path or "your data") + " in dataset_info.json and set "
                  "`dataset:` and `template:`")
    return cfg, cannot
