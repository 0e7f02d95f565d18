"""Axolotl configs (`axolotl train config.yml`), read into a plan request and written from a plan.

Keys, meanings and defaults from axolotl 0.19.0 (the wheel on PyPI): `axolotl/utils/schemas/config.py`,
`training.py`, `peft.py`, `fsdp.py`, `loaders/adapter.py`; docs/other-tools.md has the table.
"""

from __future__ import annotations

import os
from typing import Any

from ..facts.options import OPTIMIZERS
from ..planfile.schema import Plan
from . import common

TOOL = "axolotl"
CCE_PLUGIN = "axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"
LIGER_PLUGIN = "axolotl.integrations.liger.LigerPlugin"

# the keys that mark an Axolotl config; `base_model` is its model key, the others are its own spellings
MARKERS = {"base_model", "micro_batch_size", "sequence_len", "lora_target_linear", "sample_packing", "num_epochs",
           "adapter", "val_set_size"}


def detect(keys: set[str]) -> bool:
    return "base_model" in keys or len(keys & MARKERS) >= 2


SPECIFIC_IGNORED = {
    "test_datasets": "evaluation is not planned",
    "batch_size": "deprecated in axolotl (it derives gradient_accumulation_steps): the global batch is "
                  "micro_batch_size x gradient_accumulation_steps x GPUs",
    "lora_modules_to_save": "NOT counted: fully trained copies of these modules would add memory the plan omits",
    "gradient_checkpointing_kwargs": "the plan checkpoints every decoder layer (use_reentrant false)",
    "dataset_prepared_path": "preprocessing cache: no training memory",
    "pad_to_sequence_len": "the activation terms already count full sequence_len rows",
    "lora_fan_in_fan_out": "changes no parameter count",
    "strict": "config validation mode",
}


def to_request(cfg: dict, path: str) -> common.Imported:
    imp = common.Imported(TOOL, path)
    req = imp.request
    base_dir = os.path.dirname(os.path.abspath(path))
    if not cfg.get("base_model"):
        common.fail(TOOL, "base_model is not set")
    req["model"] = str(imp.take("base_model", cfg["base_model"]))
    adapter = cfg.get("adapter")
    if adapter is None:
        common.fail(TOOL, "adapter is not set, so axolotl fine-tunes every weight; loraplan plans LoRA and QLoRA "
                     "(adapter: lora or qlora)")
    if adapter not in ("lora", "qlora"):
        common.fail(TOOL, f"adapter: {adapter!r} is not LoRA or QLoRA (lora, qlora)")
    imp.take("adapter", adapter)
    four, eight = common.boolean(TOOL, cfg, "load_in_4bit"), common.boolean(TOOL, cfg, "load_in_8bit")
    if four and eight:
        common.fail(TOOL, "load_in_4bit and load_in_8bit contradict each other: choose one")
    if eight:
        common.fail(TOOL, "load_in_8bit: LoRA on 8-bit weights is not a method loraplan plans (LoRA on 16-bit, or "
                     "QLoRA on 4-bit weights)")
    if adapter == "qlora" and not four:
        common.fail(TOOL, "adapter: qlora needs load_in_4bit: true (axolotl refuses it otherwise)")
    for key in ("load_in_4bit", "load_in_8bit"):
        if key in cfg:
            imp.take(key, cfg[key])
    req["method"] = "qlora" if four else "lora"
    if adapter == "lora" and four:
        imp.notes.append("adapter: lora with load_in_4bit: true trains LoRA on 4-bit weights: planned as QLoRA")
    for key in ("lora_r", "lora_alpha"):
        if cfg.get(key) is None:
            common.fail(TOOL, f"{key} is not set: axolotl has no default for it (peft receives None)")
    req["rank"] = imp.take("lora_r", common.positive_int(TOOL, cfg, "lora_r"))
    req["alpha"] = imp.take("lora_alpha", common.positive_int(TOOL, cfg, "lora_alpha"))
    dropout = common.fraction(TOOL, cfg, "lora_dropout")
    req["dropout"] = imp.take("lora_dropout", 0.0 if dropout is None else dropout)  # axolotl's validator: 0.0
    modules = cfg.get("lora_target_modules") or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    params = cfg.get("lora_target_parameters") or []
    params = [params] if isinstance(params, str) else list(params)
    linear = common.boolean(TOOL, cfg, "lora_target_linear")
    if not (modules or params or linear):
        common.fail(TOOL, "no LoRA targets: set lora_target_modules, lora_target_parameters or lora_target_linear: true")
    for key in ("lora_target_modules", "lora_target_parameters", "lora_target_linear"):
        if key in cfg:
            imp.take(key, cfg[key])
    # lora_target_linear: axolotl's find_all_linear_names, every nn.Linear but the output head (not fused experts)
    req["targets"] = ("linear-modules" if linear else "") + "".join(
        f",{str(p).rsplit('.', 1)[-1]}" for p in modules + params)
    req["targets"] = req["targets"].lstrip(",")
    seq = common.positive_int(TOOL, cfg, "sequence_len")
    req["seq_len"] = imp.take("sequence_len", 512 if seq is None else seq)  # schema default 512
    imp.micro_batch_size = imp.take("micro_batch_size", common.positive_int(TOOL, cfg, "micro_batch_size") or 1)
    imp.grad_accum_steps = imp.take("gradient_accumulation_steps",
                                    common.positive_int(TOOL, cfg, "gradient_accumulation_steps") or 1)
    gc = cfg.get("gradient_checkpointing", False)
    savers = {}
    if gc not in (True, False, None, "offload"):
        common.fail(TOOL, f"gradient_checkpointing: {gc!r} is not planned (true, false, offload)")
    imp.take("gradient_checkpointing", gc)
    req["grad_checkpointing"] = "on" if gc else "off"
    savers["offload-checkpoints"] = gc == "offload"  # checkpointed layer inputs kept in host memory
    req["optimizer"] = common.optimizer(TOOL, imp, "optimizer", cfg.get("optimizer") or "adamw_torch_fused")
    if cfg.get("learning_rate") is not None:
        req["learning_rate"] = imp.take("learning_rate", common.positive_number(TOOL, cfg, "learning_rate"))
    epochs = common.positive_number(TOOL, cfg, "num_epochs")
    req["epochs"] = imp.take("num_epochs", 1.0 if epochs is None else epochs)  # schema default 1.0
    if cfg.get("max_steps") is not None:
        req["max_steps"] = imp.take("max_steps", common.positive_int(TOOL, cfg, "max_steps"))
    packing = common.boolean(TOOL, cfg, "sample_packing")
    imp.take("sample_packing", bool(packing))
    savers["padding-free"] = bool(packing)
    tiled = common.boolean(TOOL, cfg, "tiled_mlp")
    if tiled is not None:
        imp.take("tiled_mlp", tiled)
    savers["mlp-tiling"] = bool(tiled)
    req["savers"] = ",".join(f"{n}={'on' if v else 'off'}" for n, v in savers.items())
    plugins = cfg.get("plugins") or []
    fused = bool(cfg.get("cut_cross_entropy") and CCE_PLUGIN in plugins) or bool(
        cfg.get("liger_fused_linear_cross_entropy") and LIGER_PLUGIN in plugins)
    for key in ("cut_cross_entropy", "liger_fused_linear_cross_entropy"):
        if key in cfg:
            imp.take(key, cfg[key])
    if plugins:
        if set(plugins) <= {CCE_PLUGIN, LIGER_PLUGIN}:
            imp.take("plugins", plugins)
        else:
            imp.ignore("plugins", "not planned: " + ", ".join(p for p in plugins if p not in (CCE_PLUGIN, LIGER_PLUGIN)))
    req["loss"] = "fused" if fused else "full"  # without them, the model's own loss over full fp32 logits
    datasets = cfg.get("datasets") or []
    first = datasets[0] if isinstance(datasets, list) and datasets and isinstance(datasets[0], dict) else {}
    local = common.local_dataset(first.get("path"), base_dir)
    if local:
        req["dataset"] = local
        imp.take("datasets", [d.get("path") for d in datasets if isinstance(d, dict)])
    elif datasets:
        imp.ignore("datasets", f"not a local file ({first.get('path')!r}: a dataset on the Hub is not read "
                               "offline); the time estimate uses --train-tokens or --dataset")
    val = cfg.get("val_set_size")
    if val is not None:  # axolotl holds this share of the dataset out for eval (a count when it is 1 or more)
        if local and isinstance(val, (int, float)) and not isinstance(val, bool) and 0 < val < 1:
            req["eval_fraction"] = imp.take("val_set_size", float(val))
        elif not val:
            imp.take("val_set_size", val)
        else:
            imp.ignore("val_set_size", "a count of rows held out (loraplan holds out a share: --eval-fraction)"
                       if local else "the eval split of a dataset that is not read here")
    if cfg.get("deepspeed"):
        common.deepspeed(TOOL, imp, "deepspeed", cfg["deepspeed"], base_dir)
    if cfg.get("fsdp_config") is not None:
        fc = cfg["fsdp_config"] or {}
        version = cfg.get("fsdp_version", fc.get("fsdp_version"))
        imp.take("fsdp_config", fc)
        if "fsdp_version" in cfg:
            imp.take("fsdp_version", version)
        if str(version or 1) != "2":
            imp.notes.append(f"fsdp_version {version or 1}: planned as FSDP2 (fully_shard), which is what loraplan "
                             "models; FSDP1's flat parameters shard the same weights")
        imp.strategy = "fsdp-offload" if fc.get("offload_params") else "fsdp"
        if fc.get("activation_checkpointing"):
            req["grad_checkpointing"] = "on"
    if cfg.get("output_dir"):
        req["output_dir"] = str(imp.take("output_dir", cfg["output_dir"]))
    common.ignore_rest(imp, cfg, set(), SPECIFIC_IGNORED)
    return imp


# loraplan's advice (planner.decision.suggest) -> the same change in Axolotl's keys
SUGGESTION_KEYS = {
    r"--method (auto|qlora)": lambda m: "`adapter: qlora` and `load_in_4bit: true`",
    r"--grad-checkpointing (auto|on)": lambda m: "`gradient_checkpointing: true`",
    r"drop --batch-size": lambda m: "`micro_batch_size: 1` (raise `gradient_accumulation_steps` to keep the global batch)",
    r"--optimizer adamw-8bit": lambda m: "`optimizer: adamw_bnb_8bit`",
    r"--seq-len (\d+)": lambda m: f"`sequence_len: {m.group(1)}`",
    r"--savers auto": lambda m: "`sample_packing: true`, `gradient_checkpointing: offload`, `tiled_mlp: true` "
                                "(the savers axolotl has)",
}


def export(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    """(the config, what Axolotl cannot express from the plan)."""
    t, lora, sv = plan.training, plan.lora, plan.savers
    cfg: dict[str, Any] = {"base_model": plan.model.hub_id or plan.model.path or plan.model.name}
    cfg["adapter"] = plan.method
    if plan.method == "qlora":
        cfg["load_in_4bit"] = True
    cfg.update(lora_r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
               lora_target_modules=list(lora.target_modules))
    if lora.target_parameters:
        cfg["lora_target_parameters"] = list(lora.target_parameters)
    cfg.update(sequence_len=t.seq_len, micro_batch_size=t.micro_batch_size,
               gradient_accumulation_steps=t.grad_accum_steps,
               gradient_checkpointing="offload" if "offload_checkpoints" in sv.on else bool(t.grad_checkpointing),
               optimizer=_hf_optim(t.optimizer), learning_rate=t.learning_rate, num_epochs=t.num_epochs)
    if t.max_steps and t.max_steps > 0:
        cfg["max_steps"] = t.max_steps
    cfg["sample_packing"] = "padding_free" in sv.on
    if "mlp_tiling" in sv.on:
        cfg["tiled_mlp"] = True
    if t.loss == "fused":
        cfg["plugins"] = [CCE_PLUGIN]
        cfg["cut_cross_entropy"] = True
    cfg["bf16"] = t.dtype == "bfloat16"
    cfg["fp16"] = t.dtype == "float16"
    if "padding_free" in sv.on:
        cfg["attn_implementation"] = "flash_attention_2"  # axolotl 0.19 deprecates flash_attention: true
    if plan.dataset.path:
        cfg["datasets"] = [{"path": plan.dataset.path, "ds_type": plan.dataset.path.rsplit(".", 1)[-1].replace("jsonl", "json")}]
    if plan.dataset.eval_fraction:
        cfg["val_set_size"] = plan.dataset.eval_fraction
    cfg["output_dir"] = plan.output_dir
    if plan.strategy in ("fsdp", "fsdp-offload"):
        cfg["fsdp_version"] = 2
        cfg["fsdp_config"] = {"offload_params": plan.strategy == "fsdp-offload",
                              "cpu_ram_efficient_loading": plan.distributed.cpu_ram_efficient_loading,
                              "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                              "reshard_after_forward": plan.distributed.reshard_after_forward}
    cannot = []
    if sv.every_n_layers > 1:
        cannot.append(f"checkpointing every {sv.every_n_layers}th layer only (axolotl checkpoints every layer)")
    if "offload_activations" in sv.on:
        cannot.append("offloading every activation to the host (trl's activation_offloading)")
    if plan.dataset.path:
        cannot.append("the dataset's row format: set `type:` under datasets (alpaca, chat_template, completion, ...)")
    else:
        cannot.append("a dataset: the plan names none; add `datasets:`")
    return cfg, cannot


def _hf_optim(name: str) -> str:
    return OPTIMIZERS[name].hf_name
