"""Load the base model exactly as the plan says, and wrap it with the plan's LoRA adapter.

QLoRA follows the recipe the memory model was calibrated on: every linear layer but the LM head in NF4 with
double quantization, compute in the plan's dtype, and nothing upcast to fp32 (no prepare_model_for_kbit_training),
wrapped with get_peft_model here so SFTTrainer never sees a peft_config (it would upcast).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from loraplan.planner.catalog import find_in_hf_cache, has_weights
from loraplan.planner.errors import first_line

from .errors import RunError
from .fsdp import is_sharded, quant_storage


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def stay_offline() -> None:
    """Nothing is downloaded: every from_pretrained here is local_files_only, and peft's adapter loader, which
    goes to the Hub when a local file is missing, reads huggingface_hub's offline switch at call time."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here (ddp workers) and later imports
    import sys

    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # already imported: the flag was read from the environment then
        constants.HF_HUB_OFFLINE = True


def check_safetensors(path: str) -> None:
    """A .safetensors file whose length is what its header says: an 8-byte little-endian header length, the JSON
    header, then the tensors' bytes up to the largest data_offsets end. Catches a copy or download cut short in
    milliseconds, before anything is loaded."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from None
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise RunError(f"weights file {path} is truncated or corrupt ({size:,} bytes, no readable safetensors "
                       f"header); copy or download it again")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and isinstance(v.get("data_offsets"), list)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise RunError(f"weights file {path} is truncated ({size:,} of the {need:,} bytes its header describes); "
                       f"copy or download it again")


def check_weights(folder: str) -> None:
    """Every shard the index names is there, and every .safetensors file is whole."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        except (OSError, ValueError) as exc:
            raise RunError(f"{index} is not valid JSON: {first_line(exc)}") from None
        missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
        if missing:
            raise RunError(f"weights file {os.path.join(folder, missing[0])} is missing (named in {index}"
                           f"{f', with {len(missing) - 1} more' if len(missing) > 1 else ''})")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(folder, name))


def check_model_dir(folder: str, what: str) -> str:
    from loraplan.planner.plan_paths import symlink_loop

    if symlink_loop(folder):
        raise RunError(f"{what} {folder} is a symlink loop (a link that leads back to itself)")
    if not os.path.exists(folder):
        raise RunError(f"{what} {folder} does not exist")
    if not os.path.isdir(folder):
        raise RunError(f"{what} {folder} is not a directory")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise RunError(f"{what} {folder} holds no model (no config.json)")
    if not has_weights(folder):
        raise RunError(f"{what} {folder} holds no model weights (no *.safetensors or *.bin files)")
    check_weights(folder)
    return folder


def load_error(exc: BaseException, model_dir: str) -> Optional[RunError]:
    """The one-line error for a model that fails to load from MODEL_DIR, or None for a failure that is a bug."""
    if isinstance(exc, ImportError):
        return RunError(f"cannot load the model from {model_dir}: {exc}")
    if isinstance(exc, (OSError, ValueError, KeyError)) or type(exc).__name__ == "SafetensorError":
        return RunError(f"cannot load the model from {model_dir}: {first_line(exc)}")
    if isinstance(exc, RuntimeError) and ("zip archive" in str(exc) or "PytorchStreamReader" in str(exc)):
        return RunError(f"cannot load the model from {model_dir}: a weights file is truncated or corrupt "
                        f"({first_line(exc)})")
    return None


def resolve_model_dir(path: Optional[str], hub_id: Optional[str] = None, what: str = "model path") -> str:
    """A local folder holding config + weights: `path` itself, else `hub_id`'s snapshot in the local HF cache."""
    if path:
        return check_model_dir(os.path.expanduser(path), what)
    repo = hub_id
    if not repo:
        raise RunError("the plan names no model weights (model.path and model.hub_id are both empty); "
                       "plan from a model directory or a Hugging Face id already in the local cache")
    folder = find_in_hf_cache(repo)  # the lookup `plan` made, so plan and run agree on the snapshot
    if folder is None:
        raise RunError(f"model {repo} is not in the local Hugging Face cache and nothing is downloaded; "
                       f"download it first or set model.path to a directory")
    return check_model_dir(str(folder), f"cached model {repo} at")


def plan_model_dir(plan) -> str:
    return resolve_model_dir(plan.model.path, plan.model.hub_id)


def load_tokenizer(model_dir: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        first = first_line(exc)
        raise RunError(f"cannot load a tokenizer from {model_dir}: {first}") from None
    if tok.pad_token is None:  # batches need padding; the EOS token is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(plan):
    """bitsandbytes 4-bit config from plan.quantization (blocksize is bitsandbytes' fixed 64)."""
    from transformers import BitsAndBytesConfig

    q = plan.quantization
    if q.blocksize != 64:  # transformers' bitsandbytes integration has no blocksize setting: it is always 64
        raise RunError(f"quantization.blocksize {q.blocksize} cannot be run: bitsandbytes through transformers "
                       f"quantizes in blocks of 64")
    extra = {}
    if is_sharded(plan):  # packed in a floating dtype so that FSDP shards the 4-bit weights (executor/fsdp.py)
        extra["bnb_4bit_quant_storage"] = torch_dtype(quant_storage(plan))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        **extra,
    )


def load_dtype(plan) -> str:
    """The dtype the weights load in: training.dtype; for QLoRA under FSDP the 4-bit storage dtype, so that every
    parameter of an FSDP unit (packed 4-bit weights, norms, embeddings) has one dtype (peft's FSDP + QLoRA recipe:
    `dtype` = `bnb_4bit_quant_storage`)."""
    if plan.quantization.enabled and is_sharded(plan):
        return quant_storage(plan)
    return plan.training.dtype


def load_base_model(plan, model_dir: str, device_map: Optional[dict] = None):
    """The base model in the plan's dtype, 4-bit when the plan says qlora. Nothing is upcast."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(load_dtype(plan)),
        trust_remote_code=plan.model.trust_remote_code,
        local_files_only=True,
        attn_implementation=plan.training.attn_implementation,
    )
    if plan.quantization.enabled:
        kwargs["quantization_config"] = quantization_config(plan)
        kwargs["device_map"] = device_map or {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        error = load_error(exc, model_dir)
        if error is None:
            raise
        raise error from None
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def lora_config(plan):
    from peft import LoraConfig

    lo = plan.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=list(lo.target_modules) or None,
        target_parameters=list(lo.target_parameters) or None,
        bias=lo.bias,
        task_type=lo.task_type,
    )


def wrap_lora(plan, model):
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(plan))
    except ValueError as exc:
        first = first_line(exc)
        raise RunError(f"cannot add the plan's LoRA adapter: {first}") from None
