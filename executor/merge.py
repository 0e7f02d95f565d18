"""`loraplan merge`: fold a LoRA adapter into its base model and save a plain model directory.

A QLoRA adapter merges into the unquantized base, loaded in the merge dtype: merging into 4-bit weights would
round the result to NF4 again.
"""

from __future__ import annotations

import json
import os

from planner.errors import first_line

from .errors import RunError, require_run_extra

MERGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def base_model_of(adapter_dir: str) -> tuple[str, dict]:
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isdir(adapter_dir):
        raise RunError(f"adapter dir {adapter_dir} does not exist")
    if not os.path.exists(cfg_path):
        raise RunError(f"{adapter_dir} holds no adapter (no adapter_config.json)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunError(f"{cfg_path} is not valid JSON: {exc}") from None
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise RunError(f"{cfg_path} names no base model (base_model_name_or_path)")
    return base, cfg


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str = "bf16", trust_remote_code: bool = False) -> str:
    """Merge ADAPTER_DIR into its base model; write the merged model and tokenizer to OUTPUT_DIR."""
    require_run_extra()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import resolve_model_dir, torch_dtype
    from .train import quiet_libraries

    quiet_libraries()

    if dtype not in MERGE_DTYPES:
        raise RunError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}")
    base, _ = base_model_of(adapter_dir)
    # A hub id is "org/name"; anything else (absolute, relative, deeper) is a local folder.
    local = os.path.exists(os.path.expanduser(base)) or base.startswith(("/", ".", "~")) or base.count("/") > 1
    base_dir = resolve_model_dir(base if local else None, None if local else base, what="base model")
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise RunError(f"output dir {output_dir} is not empty")
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch_dtype(MERGE_DTYPES[dtype]), trust_remote_code=trust_remote_code, local_files_only=True
    )
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    except Exception as exc:
        first = first_line(exc)
        raise RunError(f"cannot load adapter {adapter_dir} onto {base_dir}: {first}") from None
    with torch.no_grad():
        merged = model.merge_and_unload()
    tmp = output_dir.rstrip("/") + ".tmp"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tok_src = adapter_dir if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")) else base_dir
    AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code, local_files_only=True).save_pretrained(tmp)
    if os.path.exists(output_dir):
        os.rmdir(output_dir)  # empty, checked above
    os.replace(tmp, output_dir)
    return output_dir
