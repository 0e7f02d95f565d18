"""What the installed training libraries can do, read from their package metadata without importing them (the
planner never imports torch, transformers or trl; the executor asks the same questions before it builds a config).

Two differences matter between the releases loraplan runs on (the main environment: transformers 5.24, trl 1.16;
the Unsloth environment, capped by unsloth 2026.10.9: transformers 5.17, trl 1.15):
- trl's SFTTrainer computes its loss through a fused, chunked LM head. In trl 1.15 that kernel is Triton only
  (trl/kernels/chunked_logprob.py; trl/trainer/utils.py `_fused_forward` calls it on any device), so on a CPU it
  fails with "0 active drivers"; trl 1.16 added a torch path (trl/kernels/chunked_logprob.py, "torch ops on devices without" Triton). Unsloth's CPU backend routes it to torch itself
  (unsloth_zoo/cpu/ops.py `patch_trl_fused_lm_head`).
- transformers 5.24 names checkpointing `activation_checkpointing` / `activation_checkpointing_kwargs` and keeps
  `gradient_checkpointing*` as deprecated aliases (training_args.py:1538); 5.17 has only `gradient_checkpointing*`
  (which already takes every_n_layers and offload: trainer.py pops them before calling gradient_checkpointing_enable).
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Optional

TRL_TORCH_FUSED_LOSS = (1, 16)  # first trl whose fused LM-head loss runs without Triton
# 5.17 lacks activation_checkpointing*, 5.24 has it; the releases between were not checked (5.18 assumed). The
# executor does not rely on this: executor/compat.py reads SFTConfig's own fields.
TRANSFORMERS_ACTIVATION_CHECKPOINTING = (5, 18)


def version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(dist: str) -> Optional[tuple[int, ...]]:
    """(major, minor, patch) of an installed distribution; None when it is not installed."""
    v = version(dist)
    if v is None:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", v.split("+")[0])[:3])


def trl_fused_loss_runs_on(device: str) -> bool:
    """Whether the installed trl's fused LM-head loss runs on DEVICE ("cuda" | "cpu") without Unsloth's patch."""
    if device in ("cuda", "xpu"):
        return True
    v = version_tuple("trl")
    return v is not None and v >= TRL_TORCH_FUSED_LOSS


def fused_loss_note(device: str) -> Optional[str]:
    """The line a plan or summary says when the installed trl cannot run the fused loss on DEVICE; None if it can."""
    if trl_fused_loss_runs_on(device):
        return None
    return (f"trl {version('trl')}'s fused loss needs Triton, which has no {device} backend (trl "
            f"{'.'.join(map(str, TRL_TORCH_FUSED_LOSS))} added a torch path): the loss is computed from the "
            f"model's full logits instead")


def transformers_has_activation_checkpointing() -> bool:
    v = version_tuple("transformers")
    return v is not None and v >= TRANSFORMERS_ACTIVATION_CHECKPOINTING
