"""Sharded plans (strategy fsdp / fsdp-offload): torch FSDP2 through accelerate's launcher, nothing home-made.

What `run` does for such a plan, in order:
1. `refusal(plan)`: one line for a combination the installed stack is known to break (checked before anything
   is written or launched: a hand-edited plan must not reach a traceback).
2. `accelerate_config(plan, ...)`: the accelerate config that `accelerate launch --config_file` reads, generated
   from `plan.distributed` and `training.dtype`, written to `<output_dir>/accelerate_config.yaml` and passed to the
   launcher, so the file a user sees is the one the run used.
3. In each worker, the Trainer's own Accelerator reads the FSDP settings from the environment the launcher set
   (ACCELERATE_USE_FSDP, FSDP_*), and accelerate's `fsdp2_prepare_model` shards the peft model (`fully_shard` per
   decoder layer, the embeddings, the norm + LM head tail, the root). On a machine without a GPU,
   `enable_fsdp_on_cpu` is the one shim (see its docstring).
4. Checkpoints are accelerate's sharded ones (`pytorch_model_fsdp_0/` and `optimizer_0/`, torch.distributed.
   checkpoint: every rank writes its own shard); `full_adapter_state_dict` gathers the final adapter whole for an
   ordinary PEFT `adapter/`.

Keys follow accelerate 1.15 (`commands/config/cluster.py`, `utils/launch.py::prepare_multi_gpu_env`,
`utils/dataclasses.py::FullyShardedDataParallelPlugin`).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from loraplan.planner.plan import Plan

from .errors import RunError

CONFIG_FILE = "accelerate_config.yaml"
# FSDP2 keeps checkpoints sharded: every rank writes its part through torch.distributed.checkpoint.
STATE_DICT_TYPE = "SHARDED_STATE_DICT"
MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}



def is_sharded(plan: Plan) -> bool:
    """The strategy table says the weights are sharded over the ranks (fsdp, fsdp-offload)."""
    from loraplan.planner.strategies import STRATEGIES

    return STRATEGIES[plan.strategy].sharded


def quant_storage(plan: Plan) -> str:
    """The dtype the 4-bit weights are packed in (bnb_4bit_quant_storage): plan.distributed.quant_storage, else the
    compute dtype. A floating storage dtype is what lets FSDP shard them: with bitsandbytes' default uint8 storage
    accelerate leaves every 4-bit weight unsharded on every rank (accelerate #3983, `fsdp2_prepare_model`)."""
    return plan.distributed.quant_storage or plan.training.dtype


def refusal(plan: Plan) -> Optional[str]:
    """Why this sharded plan cannot run on the installed stack (one line), or None when it can."""
    d, t = plan.distributed, plan.training
    if d.fsdp_version != 2:
        return (f"distributed.fsdp_version {d.fsdp_version} is not run: loraplan runs FSDP2 (torch's fully_shard; "
                f"accelerate deprecates FSDP1); set distributed.fsdp_version: 2")
    from loraplan.planner.strategies import STRATEGIES

    strategy = STRATEGIES[plan.strategy]
    if strategy.offload_params != d.offload_params:
        other = next(s.name for s in STRATEGIES.values() if s.sharded and s.offload_params == d.offload_params)
        return (f"strategy {strategy.name} contradicts distributed.offload_params: {str(d.offload_params).lower()}; "
                f"set it to {str(strategy.offload_params).lower()}, or use strategy {other}")
    broken = strategy.refuses(plan.method, t.optimizer)  # the planner's table
    if broken:
        return broken
    if plan.quantization.enabled:
        from loraplan.planner.options import DTYPES

        storage = quant_storage(plan)
        if storage not in DTYPES:
            return (f"distributed.quant_storage {storage} cannot be sharded: FSDP shards 4-bit weights only when they "
                    f"are packed in a floating dtype ({', '.join(DTYPES)}); with uint8 every rank holds them whole")
    return None


def check_runnable(plan: Plan) -> None:
    why = refusal(plan)
    if why:
        raise RunError(why)


def wrap_class(plan: Plan, model_dir: str) -> Optional[str]:
    """The decoder-layer class each `fully_shard` unit wraps: plan.distributed.wrap_class, else the model class's
    `_no_split_modules` (what accelerate itself falls back to), read from the class without building the model.
    A class name the model's modelling code does not define is refused here rather than inside the workers."""
    named = plan.distributed.wrap_class
    cls = _model_class(plan, model_dir)
    if cls is None:  # remote code or an unknown class: accelerate reads _no_split_modules in the workers
        return named
    if named:
        import sys

        module = sys.modules.get(cls.__module__)
        if module is not None and not hasattr(module, named):
            known = ", ".join(cls._no_split_modules or []) or "none declared"
            raise RunError(f"distributed.wrap_class {named} is not a module class of {cls.__name__} "
                           f"(its decoder layer: {known})")
        return named
    layers = list(getattr(cls, "_no_split_modules", None) or [])
    if not layers:
        raise RunError(f"{cls.__name__} names no decoder-layer class to shard by (_no_split_modules is empty); "
                       f"set distributed.wrap_class to the model's decoder layer class")
    return ",".join(layers)


def _model_class(plan: Plan, model_dir: str):
    if plan.model.trust_remote_code:
        return None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        return AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError, OSError):
        return None


def accelerate_config(plan: Plan, *, use_cuda: bool, layer_class: Optional[str], machine_rank: int = 0,
                      main_process_ip: Optional[str] = None, main_process_port: Optional[int] = None) -> dict[str, Any]:
    """The accelerate config (`accelerate launch --config_file`) for this plan on this machine.

    - `num_processes` is the world size over all machines and `num_machines` the plan's nodes (accelerate starts
      num_processes / num_machines per machine); `machine_rank`, `main_process_ip` and `main_process_port` are
      this machine's.
    - FSDP2 from `plan.distributed`; wrapping by decoder-layer class; sharded state dicts for checkpoints;
      `fsdp_activation_checkpointing: false` always, because checkpointing is the trainer's
      (`gradient_checkpointing` with use_reentrant False) and the two must never both be on.
    - `mixed_precision` from `training.dtype` (FSDP's MixedPrecisionPolicy: bf16 parameters and reductions); on a
      machine without a GPU "no", since there FSDP runs in the stored dtype (see `enable_fsdp_on_cpu`).
    """
    d = plan.distributed
    hw = plan.hardware
    fsdp_config: dict[str, Any] = {
        "fsdp_version": d.fsdp_version,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    }
    if layer_class:
        fsdp_config["fsdp_transformer_layer_cls_to_wrap"] = layer_class
    fsdp_config.update({
        "fsdp_offload_params": d.offload_params,
        "fsdp_cpu_ram_efficient_loading": d.cpu_ram_efficient_loading,
        # accelerate's launcher insists on it with cpu_ram_efficient_loading; FSDP2 ignores it (no sync needed)
        "fsdp_sync_module_states": d.cpu_ram_efficient_loading,
        "fsdp_reshard_after_forward": d.reshard_after_forward,
        "fsdp_state_dict_type": STATE_DICT_TYPE,
        "fsdp_activation_checkpointing": False,
    })
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "FSDP",
        "mixed_precision": MIXED_PRECISION[plan.training.dtype] if use_cuda else "no",
        "use_cpu": not use_cuda,
        "debug": False,
        "num_machines": hw.num_nodes,
        "num_processes": hw.world_size,
        "machine_rank": machine_rank,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "gpu_ids": "all",
        "fsdp_config": fsdp_config,
    }
    if main_process_ip:
        config["main_process_ip"] = main_process_ip
    if main_process_port:
        config["main_process_port"] = main_process_port
    return config


def write_accelerate_config(config: dict[str, Any], path: str, plan_path: str) -> None:
    import yaml

    from loraplan.planner.plan import atomic_write_text

    header = (f"# The accelerate config `loraplan run` generated from {plan_path} and launched this run with\n"
              f"# (accelerate launch --config_file {path} -m loraplan.executor.worker {plan_path}).\n"
              f"# The same settings for another script: accelerate launch --config_file {path} your_script.py\n")
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def enable_fsdp_on_cpu(accelerator) -> bool:
    """The CPU shim: make accelerate's FSDP2 path run on a machine without a GPU. Returns True when it applied.

    Why it exists: accelerate picks FSDP only for GPU-like distributed types. `AcceleratorState.__init__` (accelerate
    1.15, state.py) sets `distributed_type = FSDP` and `fsdp_plugin` inside its `MULTI_GPU / MULTI_XPU / ...` branch;
    on a CPU the launcher's ACCELERATE_USE_FSDP is read, a plugin is built, and then dropped: the run silently becomes
    multi-CPU data parallel (a DDP wrapper), or, without `cpu=True`, no distribution at all. torch's FSDP2 itself runs
    on the CPU (`fully_shard` over gloo), so the shim sets what that branch would have set, on the shared state,
    after the Trainer built its Accelerator and before it prepares the model:
    - `AcceleratorState.fsdp_plugin`: a FullyShardedDataParallelPlugin read from the same FSDP_* environment the
      launcher set from accelerate_config.yaml (the plugin the GPU path builds);
    - `distributed_type = DistributedType.FSDP` on AcceleratorState and PartialState (accelerate keeps the two
      equal: the end of AcceleratorState.__init__).
    What stays as the CPU path made it: the gloo process group (PartialState's MULTI_CPU branch), `cpu=True` (the
    Trainer's use_cpu), and no FSDP MixedPrecisionPolicy (the GPU branch's `set_mixed_precision` is skipped, so
    parameters are gathered and gradients reduced in their stored dtype: "mixed precision no").
    One setting differs: fsdp-offload's CPUOffloadPolicy without pinned memory (pinning needs an accelerator).

    Only when no GPU is visible: on a GPU accelerate chooses FSDP itself and this function does nothing. For tests,
    the demo and laptops; a CPU cannot hold what FSDP is for."""
    import torch

    if torch.cuda.is_available():
        return False
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RunError(f"a sharded plan needs the launcher's processes; this process runs "
                       f"{state.distributed_type.value} (start it through `loraplan run`, not directly)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise RunError("a sharded plan's workers need accelerate's FSDP environment (ACCELERATE_USE_FSDP); "
                       "start them through `loraplan run`")
    plugin = FullyShardedDataParallelPlugin()  # from FSDP_* as the launcher set them
    from torch.distributed.fsdp import CPUOffloadPolicy

    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
        # Pinned host memory needs an accelerator ("Cannot access accelerator device when none is available");
        # on a CPU the offloaded shards are ordinary host memory, as every tensor is.
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def full_adapter_state_dict(model) -> Optional[dict]:
    """The trainable (adapter) tensors gathered whole on rank 0, or None when the model is not FSDP-sharded.

    torch's `get_model_state_dict(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)` all-gathers
    each sharded LoRA tensor to its full shape and keeps the result on rank 0's CPU (the other ranks get an empty
    dict): only the adapter crosses the network, never the base weights. (Not accelerate's `get_state_dict`, which
    gathers the whole model; and not peft's `get_peft_model_state_dict`, which under FSDP2 returns each rank's local
    shard: what saved rank 0's slice only before accelerate PR #4206.) Every rank must call it (a collective)."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def load_sharded_adapter(model, checkpoint: str) -> None:
    """Load a sharded checkpoint's adapter into a model that is not (yet) sharded: every rank reads the whole
    adapter from the checkpoint's torch.distributed.checkpoint folder (DCP reshards on load). Used when resuming
    at the run's last step, where nothing is trained and the model is never wrapped."""
    import torch.distributed.checkpoint as dist_cp
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    folder = os.path.join(checkpoint, "pytorch_model_fsdp_0")
    state = {"model": get_peft_model_state_dict(model, adapter_name=model.active_adapter)}
    dist_cp.load(state_dict=state, storage_reader=dist_cp.FileSystemReader(folder))
    set_peft_model_state_dict(model, state["model"], adapter_name=model.active_adapter)


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this rank holds at rest: its local shard of each FSDP-sharded parameter (DTensor), all
    of an unsharded one. Under FSDP with N ranks about 1/N of the model's (what shows that the 4-bit weights of a
    QLoRA plan were sharded: with uint8 storage they stay whole on every rank)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total


def plugin_summary(accelerator) -> Optional[dict[str, Any]]:
    """The FSDP settings the run's Accelerator actually trained with (its FullyShardedDataParallelPlugin), in the
    accelerate config's terms: what summary.json records, so a reader can check them against accelerate_config.yaml."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        return None
    from torch.distributed.fsdp import CPUOffloadPolicy

    mp = plugin.mixed_precision_policy
    return {
        "distributed_type": accelerator.state.distributed_type.value,
        "fsdp_version": plugin.fsdp_version,
        "fsdp_transformer_layer_cls_to_wrap": ",".join(plugin.transformer_cls_names_to_wrap or []) or None,
        "fsdp_offload_params": isinstance(plugin.cpu_offload, CPUOffloadPolicy),
        "fsdp_cpu_ram_efficient_loading": bool(plugin.cpu_ram_efficient_loading),
        "fsdp_reshard_after_forward": plugin.reshard_after_forward,
        "fsdp_state_dict_type": plugin.state_dict_type.name,
        "fsdp_activation_checkpointing": bool(plugin.activation_checkpointing),
        "param_dtype": str(mp.param_dtype).replace("torch.", "") if mp is not None and mp.param_dtype else None,
    }
