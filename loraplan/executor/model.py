"""The base model's files: where the plan's weights are (a folder, or the local Hugging Face cache), that they are
whole before anything loads them, the one-line error of a model that fails to load, and the dtype names. Loading
and wrapping the model is the training backend's (executor/backends/hf.py)."""

from __future__ import annotations

import json
import os
from typing import Optional

from loraplan.planner.architecture.model_source import find_in_hf_cache, has_weights
from loraplan.planner.errors import first_line

from .errors import RunError


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def stay_offline() -> None:
    """Nothing is downloaded: every from_pretrained here is local_files_only, and peft's adapter loader, which
    goes to the Hub when a local file is missing, reads huggingface_hub's offline switch at call time."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from here (launcher workers) and later imports
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
    from loraplan.planner.facts.paths import symlink_loop

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
