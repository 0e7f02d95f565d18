"""`loraplan merge`: fold a LoRA adapter into its base model and save a plain model directory.

A QLoRA adapter merges into the unquantized base, loaded in the merge dtype: merging into 4-bit weights would
round the result to NF4 again.
"""

from __future__ import annotations

import json
import os
import shutil

from loraplan.planner.errors import first_line

from .errors import RunError, TrainingFailed, require_run_extra
from .run_files import LOCK_FILE

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


def check_adapter_weights(adapter_dir: str) -> None:
    """The adapter's weights are here and whole (peft would otherwise look for them on the Hub)."""
    from .model import check_safetensors

    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.exists(weights):
        check_safetensors(weights)
    elif not os.path.exists(os.path.join(adapter_dir, "adapter_model.bin")):
        raise RunError(f"adapter dir {adapter_dir} holds no adapter weights ({weights} is missing)")


def merge_adapter(adapter_dir: str, output_dir: str, dtype: str = "bf16", trust_remote_code: bool = False) -> str:
    """Merge ADAPTER_DIR into its base model; write the merged model and tokenizer to OUTPUT_DIR.

    Everything that can be checked is, before the base model is loaded: the adapter, the base, and that the
    output folder can be made and written (it is created and held with loraplan's lock, and the model is written
    to OUTPUT_DIR.tmp beside it, then swapped in, so a merge cut short leaves no half-written model)."""
    from . import library_log
    from .folder_lock import lock_output_dir, make_output_dir
    from .model import load_error, resolve_model_dir, stay_offline
    from .run_files import LOCK_FILE

    library_log.quiet_library_logs()
    stay_offline()
    require_run_extra()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .model import torch_dtype
    from .train import quiet_libraries

    quiet_libraries()

    if dtype not in MERGE_DTYPES:
        raise RunError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}")
    base, _ = base_model_of(adapter_dir)
    # A hub id is "org/name"; anything else (absolute, relative, deeper) is a local folder.
    local = os.path.exists(os.path.expanduser(base)) or base.startswith(("/", ".", "~")) or base.count("/") > 1
    base_dir = resolve_model_dir(base if local else None, None if local else base, what="base model")
    check_adapter_weights(adapter_dir)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RunError(f"output dir {output_dir} exists and is not a directory")
    if os.path.isdir(output_dir) and [e for e in os.listdir(output_dir) if e != LOCK_FILE]:
        raise RunError(f"output dir {output_dir} is not empty")  # before the lock: nothing new in the user's folder
    created = not os.path.exists(output_dir)
    tmp = os.path.normpath(output_dir) + ".tmp"
    done = False
    try:
        with lock_output_dir(output_dir, f"loraplan merge {adapter_dir}", flag="--output"):
            if [e for e in os.listdir(output_dir) if e != LOCK_FILE]:
                raise RunError(f"output dir {output_dir} is not empty")
            shutil.rmtree(tmp, ignore_errors=True)
            make_output_dir(tmp, "merge folder")  # the parent must take the temporary folder too
            with library_log.library_log_file(os.path.join(tmp, "merge.log")):
                _merge_into(tmp, adapter_dir, base_dir, dtype, trust_remote_code, torch, PeftModel,
                            AutoModelForCausalLM, AutoTokenizer, torch_dtype, load_error)
            done = True  # the merged model exists: whatever happens now, it is not deleted
            _swap_in(tmp, output_dir)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            if created and os.path.isdir(output_dir) and not os.listdir(output_dir):
                os.rmdir(output_dir)
    return output_dir


def _merge_into(tmp, adapter_dir, base_dir, dtype, trust_remote_code, torch, PeftModel, AutoModelForCausalLM,
                AutoTokenizer, torch_dtype, load_error) -> None:
    from .disk import format_bytes, is_disk_full

    try:
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch_dtype(MERGE_DTYPES[dtype]), trust_remote_code=trust_remote_code,
            local_files_only=True,
        )
    except Exception as exc:
        error = load_error(exc, base_dir)
        if error is None:
            raise
        raise error from None
    try:
        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False, local_files_only=True)
    except Exception as exc:
        first = first_line(exc)
        raise RunError(f"cannot load adapter {adapter_dir} onto {base_dir}: {first}") from None
    with torch.no_grad():
        merged = model.merge_and_unload()
    tok_src = adapter_dir if os.path.exists(os.path.join(adapter_dir, "tokenizer_config.json")) else base_dir
    try:
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(tok_src, trust_remote_code=trust_remote_code,
                                      local_files_only=True).save_pretrained(tmp)
        from .merge_facts import apply_umask_modes

        apply_umask_modes(tmp)  # safetensors' file is written 0600 through a temporary file
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        free = format_bytes(shutil.disk_usage(os.path.dirname(os.path.abspath(tmp))).free)
        raise TrainingFailed(f"the disk is full: saving the merged model to {tmp} failed ({free} free); "
                             f"nothing was written to the output folder") from None


def _swap_in(tmp: str, output_dir: str) -> None:
    """OUTPUT_DIR (empty but for the held lock file) becomes TMP. The lock file moves with the folder, so the
    lock is held until the merged model is in place."""
    from .run_files import LOCK_FILE

    lock = os.path.join(output_dir, LOCK_FILE)
    moved = os.path.exists(lock)
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a few renames: a Ctrl-C now would leave it half-swapped
    try:
        _swap(tmp, output_dir, lock, moved)
    finally:
        signal.signal(signal.SIGINT, previous)


def _swap(tmp: str, output_dir: str, lock: str, moved: bool) -> None:
    if moved:
        os.replace(lock, os.path.join(tmp, LOCK_FILE))
    try:
        os.rmdir(output_dir)
    except OSError:
        if moved:
            os.replace(os.path.join(tmp, LOCK_FILE), lock)
        raise RunError(f"output dir {output_dir} is no longer empty (something wrote to it during the merge); "
                       f"the merged model is in {tmp}") from None
    os.replace(tmp, output_dir)
