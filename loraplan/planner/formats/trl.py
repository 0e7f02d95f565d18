"""TRL configs (`trl sft --config config.yaml`: the fields of ScriptArguments, SFTConfig and ModelConfig, parsed by
TrlParser), read into a plan request and written from a plan.

Keys, meanings and defaults from trl 1.16.0 (installed here): `trl/trainer/sft_config.py` (SFTConfig),
`trl/trainer/model_config.py` (ModelConfig), `trl/scripts/sft.py` and `trl/trainer/utils.py` (get_peft_config,
get_quantization_config), with transformers 5.24's TrainingArguments for the trainer keys; docs/other-tools.md has
the table. tests/test_formats.py parses every exported file with trl's own TrlParser.
"""

from __future__ import annotations

import os
from typing import Any

from ..facts.options import OPTIMIZERS
from ..planfile.schema import Plan
from . import common

TOOL = "trl"
MARKERS = {"model_name_or_path", "use_peft", "lora_r", "max_length", "dataset_name", "per_device_train_batch_size",
           "lora_target_modules", "load_in_4bit", "packing", "num_train_epochs", "optim"}
OTHER_TOOLS_KEYS = {"finetuning_type", "lora_target", "lora_rank", "cutoff_len", "quantization_bit", "base_model",
                    "micro_batch_size", "sequence_len"}


def detect(keys: set[str]) -> bool:
    return ("use_peft" in keys or ("model_name_or_path" in keys and len(keys & MARKERS) >= 2)) and not (
        keys & OTHER_TOOLS_KEYS)


SPECIFIC_IGNORED = {
    "dataset_name": "a dataset on the Hub (or a loading script) is not read offline: use --dataset or --train-tokens",
    "dataset_config": "dataset loading", "dataset_train_split": "dataset loading",
    "dataset_test_split": "the eval split is read, not planned: evaluation holds no optimizer step",
    "eval_strategy": "evaluation is not planned", "per_device_eval_batch_size": "evaluation is not planned",
    "dataset_text_field": "which column holds text changes no memory",
    "assistant_only_loss": "which tokens carry loss changes no memory",
    "completion_only_loss": "which tokens carry loss changes no memory",
    "lora_modules_to_save": "NOT counted: fully trained copies of these modules would add memory the plan omits",
    "lora_task_type": "CAUSAL_LM is what the plan adapts", "model_revision": "which revision: same shapes assumed",
    "use_rslora": "rank-stabilized scaling: same adapter shapes", "use_dora": "DoRA: planned as LoRA's shapes",
    "bnb_4bit_quant_storage": "the plan stores 4-bit weights as bitsandbytes does (uint8, or the compute dtype "
                              "under FSDP)",
    "use_bnb_nested_quant": "the plan assumes double quantization",
    "model_init_kwargs": "loading arguments: not planned",
}


def _peft_default_targets(model_type: str) -> list[str]:
    """peft's own defaults for `target_modules=None` (what trl passes when lora_target_modules is absent).

    Read from the installed peft's `utils/constants.py` as a literal, without importing peft (which imports
    torch and would make `plan` slow); [] when peft is not installed or the architecture is not in its table.
    """
    import ast
    import importlib.util

    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return []
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "constants.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return []
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
                                                 for t in node.targets)):
            try:
                return list(ast.literal_eval(node.value).get(model_type) or [])
            except ValueError:
                return []
    return []


def to_request(cfg: dict, path: str) -> common.Imported:
    imp = common.Imported(TOOL, path)
    req = imp.request
    base_dir = os.path.dirname(os.path.abspath(path))
    if not cfg.get("model_name_or_path"):
        common.fail(TOOL, "model_name_or_path is not set")
    req["model"] = str(imp.take("model_name_or_path", cfg["model_name_or_path"]))
    if not common.boolean(TOOL, cfg, "use_peft"):
        common.fail(TOOL, "use_peft is not true, so trl fine-tunes every weight (ModelConfig default use_peft: false); "
                     "loraplan plans LoRA and QLoRA")
    imp.take("use_peft", True)
    four, eight = common.boolean(TOOL, cfg, "load_in_4bit"), common.boolean(TOOL, cfg, "load_in_8bit")
    if four and eight:
        common.fail(TOOL, "load_in_4bit and load_in_8bit contradict each other: choose one")
    if eight:
        common.fail(TOOL, "load_in_8bit: LoRA on 8-bit weights is not a method loraplan plans")
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in cfg:
            imp.take(key, cfg[key])
    if four and str(cfg.get("bnb_4bit_quant_type", "nf4")) != "nf4":
        common.fail(TOOL, f"bnb_4bit_quant_type: {cfg['bnb_4bit_quant_type']}: loraplan plans NF4")
    if "bnb_4bit_quant_type" in cfg:
        imp.take("bnb_4bit_quant_type", cfg["bnb_4bit_quant_type"])
    req["method"] = "qlora" if four else "lora"
    rank, alpha = common.positive_int(TOOL, cfg, "lora_r"), common.positive_int(TOOL, cfg, "lora_alpha")
    req["rank"] = imp.take("lora_r", 16 if rank is None else rank)  # ModelConfig defaults: 16, 32, 0.05
    req["alpha"] = imp.take("lora_alpha", 32 if alpha is None else alpha)
    dropout = common.fraction(TOOL, cfg, "lora_dropout")
    req["dropout"] = imp.take("lora_dropout", 0.05 if dropout is None else dropout)
    modules = cfg.get("lora_target_modules")
    params = cfg.get("lora_target_parameters") or []
    imp.take("lora_target_modules", modules)
    if params:
        imp.take("lora_target_parameters", params)
    if modules is None:
        req["targets"] = "peft-default"  # peft's per-architecture default, resolved once the model is known
    elif modules == "all-linear" or modules == ["all-linear"]:
        req["targets"] = "linear-modules"  # peft's all-linear: every Linear but the output head
    else:
        names = [modules] if isinstance(modules, str) else list(modules)
        req["targets"] = ",".join(str(n) for n in names)
    if params:
        req["targets"] = ",".join([req["targets"]] + [str(p).rsplit(".", 1)[-1] for p in params])
    seq = common.positive_int(TOOL, cfg, "max_length")
    req["seq_len"] = imp.take("max_length", 1024 if seq is None else seq)  # SFTConfig default 1024
    mb = common.positive_int(TOOL, cfg, "per_device_train_batch_size")
    imp.micro_batch_size = imp.take("per_device_train_batch_size", 8 if mb is None else mb)
    imp.grad_accum_steps = imp.take("gradient_accumulation_steps",
                                    common.positive_int(TOOL, cfg, "gradient_accumulation_steps") or 1)
    gc = common.boolean(TOOL, cfg, "gradient_checkpointing")
    imp.take("gradient_checkpointing", True if gc is None else gc)
    req["grad_checkpointing"] = "off" if gc is False else "on"  # SFTConfig default: true
    req["optimizer"] = common.optimizer(TOOL, imp, "optim", cfg.get("optim") or "adamw_torch_fused")
    if cfg.get("learning_rate") is not None:
        req["learning_rate"] = imp.take("learning_rate", common.positive_number(TOOL, cfg, "learning_rate"))
    epochs = common.positive_number(TOOL, cfg, "num_train_epochs")
    req["epochs"] = imp.take("num_train_epochs", 3.0 if epochs is None else epochs)
    steps = cfg.get("max_steps")
    if steps is not None and steps != -1:
        req["max_steps"] = imp.take("max_steps", common.positive_int(TOOL, cfg, "max_steps"))
    packing, free = common.boolean(TOOL, cfg, "packing"), common.boolean(TOOL, cfg, "padding_free")
    offload = common.boolean(TOOL, cfg, "activation_offloading")
    for key, value in (("packing", packing), ("padding_free", free), ("activation_offloading", offload)):
        if value is not None:
            imp.take(key, value)
    if packing and not free and str(cfg.get("packing_strategy", "bfd")) == "wrapped":
        imp.notes.append("packing_strategy: wrapped packs with padding: planned as padding-free packing")
    if "packing_strategy" in cfg:
        imp.take("packing_strategy", cfg["packing_strategy"])
    req["savers"] = (f"padding-free={'on' if (packing or free) else 'off'},"
                     f"offload-activations={'on' if offload else 'off'}")
    loss_type = str(cfg.get("loss_type", "nll"))
    if loss_type not in ("nll", "chunked_nll"):
        common.fail(TOOL, f"loss_type: {loss_type!r}: loraplan plans trl's nll loss (its chunked LM head + cross-entropy)")
    if "loss_type" in cfg:
        imp.take("loss_type", loss_type)
    if "use_liger_kernel" in cfg:
        imp.take("use_liger_kernel", cfg["use_liger_kernel"])
    req["loss"] = "fused"  # trl's SFTTrainer computes the loss through the LM head in chunks (or Liger's fused CE)
    if cfg.get("deepspeed"):
        common.deepspeed(TOOL, imp, "deepspeed", cfg["deepspeed"], base_dir)
    common.hf_fsdp(TOOL, imp, cfg)
    if cfg.get("output_dir"):
        req["output_dir"] = str(imp.take("output_dir", cfg["output_dir"]))
    local = common.local_dataset(cfg.get("dataset_name"), base_dir)
    if local:
        req["dataset"] = local
        imp.take("dataset_name", cfg["dataset_name"])
    common.ignore_rest(imp, cfg, set(), SPECIFIC_IGNORED)
    return imp


SUGGESTION_KEYS = {
    r"--method (auto|qlora)": lambda m: "`load_in_4bit: true`",
    r"--grad-checkpointing (auto|on)": lambda m: "`gradient_checkpointing: true`",
    r"drop --batch-size": lambda m: "`per_device_train_batch_size: 1` (raise `gradient_accumulation_steps` to keep "
                                    "the global batch)",
    r"--optimizer adamw-8bit": lambda m: "`optim: adamw_bnb_8bit`",
    r"--seq-len (\d+)": lambda m: f"`max_length: {m.group(1)}`",
    r"--savers auto": lambda m: "`packing: true` with `padding_free: true`, `activation_offloading: true` "
                                "(the savers trl has)",
}


def export(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    t, lora, sv = plan.training, plan.lora, plan.savers
    cfg: dict[str, Any] = {"model_name_or_path": plan.model.hub_id or plan.model.path or plan.model.name,
                           "dtype": t.dtype, "use_peft": True, "lora_r": lora.r, "lora_alpha": lora.lora_alpha,
                           "lora_dropout": lora.lora_dropout, "lora_target_modules": list(lora.target_modules)}
    if lora.target_parameters:
        cfg["lora_target_parameters"] = list(lora.target_parameters)
    if plan.method == "qlora":
        cfg.update(load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=bool(plan.quantization.double_quant))
    cfg.update(max_length=t.seq_len, per_device_train_batch_size=t.micro_batch_size,
               gradient_accumulation_steps=t.grad_accum_steps, gradient_checkpointing=bool(t.grad_checkpointing),
               optim=OPTIMIZERS[t.optimizer].hf_name, learning_rate=t.learning_rate, num_train_epochs=t.num_epochs,
               max_steps=t.max_steps if t.max_steps and t.max_steps > 0 else -1,
               packing="padding_free" in sv.on, padding_free="padding_free" in sv.on,
               activation_offloading="offload_activations" in sv.on,
               bf16=t.dtype == "bfloat16", fp16=t.dtype == "float16", output_dir=plan.output_dir)
    if plan.strategy in ("fsdp", "fsdp-offload"):
        cfg["fsdp"] = "full_shard auto_wrap" + (" offload" if plan.strategy == "fsdp-offload" else "")
        cfg["fsdp_config"] = {"version": 2, "reshard_after_forward": plan.distributed.reshard_after_forward,
                              "cpu_ram_efficient_loading": plan.distributed.cpu_ram_efficient_loading}
    cannot = []
    if t.loss == "full":
        cannot.append("the model's own loss over full fp32 logits: trl's SFTTrainer always chunks the LM head "
                      "(a plan with --loss full predicts more memory than trl uses)")
    if sv.every_n_layers > 1:
        cannot.append(f"checkpointing every {sv.every_n_layers}th layer only")
    if "offload_checkpoints" in sv.on:
        cannot.append("offloading checkpoints only (trl's activation_offloading offloads every activation)")
    if "mlp_tiling" in sv.on:
        cannot.append("tiled MLP")
    cannot.append("the dataset: set `dataset_name:` (a Hub id, or a local folder `load_dataset` reads)"
                  + (f"; the plan's is {plan.dataset.path}" if plan.dataset.path else ""))
    return cfg, cannot
