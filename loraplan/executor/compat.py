"""The training config held to what the installed trl and transformers accept (planner/installed.py says which
releases differ and how). Both backends build their SFTConfig keyword arguments, then pass them through here."""

from __future__ import annotations

import dataclasses
from typing import Any

from loraplan.planner import installed

# name in the newer transformers -> the older name it replaced (transformers 5.17 knows only the latter)
RENAMED = {"activation_checkpointing": "gradient_checkpointing",
           "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def sft_config_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """KWARGS with each name the installed SFTConfig lacks replaced by the name it has (checkpointing), and any
    other unknown name refused: a setting the plan needs is never dropped silently."""
    from trl import SFTConfig

    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in fields:
            out[key] = value
        elif key in RENAMED and RENAMED[key] in fields:
            out[RENAMED[key]] = value
        elif {v: k for k, v in RENAMED.items()}.get(key) in fields:
            out[{v: k for k, v in RENAMED.items()}[key]] = value
        else:
            raise TypeError(f"the installed trl {installed.version('trl')} / transformers "
                            f"{installed.version('transformers')} has no training setting {key!r}")
    return out


def use_fused_loss(plan_loss: str, device: str) -> bool:
    """Whether the trainer may take trl's fused loss for a plan whose loss is PLAN_LOSS on DEVICE: not when the
    installed trl cannot run it there (trl 1.15 on a CPU), unless Unsloth has routed it to torch."""
    import sys

    if plan_loss != "fused":
        return False
    return installed.trl_fused_loss_runs_on(device) or "unsloth" in sys.modules
