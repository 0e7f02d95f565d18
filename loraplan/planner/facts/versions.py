"""The versions of the training stack the memory model assumes, read from package metadata (never by importing).

Some terms depend on what a library version does: trl's SFTTrainer computes its loss through the fused, chunked LM
head (`fused_lm_head`) in the versions the calibration measured (1.16), and its backward accumulates the tiles'
gradient GEMMs with `torch.addmm(out_dtype=float32)` only from torch 2.8 (trl kernels/chunked_logprob.py
`_MM_OUT_DTYPE`); before that each tile and weight chunk is upcast to fp32 (planner.memory.terms.fused_loss_bytes).
`installed()` reads what is installed with importlib.metadata; where a package is missing the plan assumes the
version `run` installs (tables: the calibration's stack) and says so. The plan records both in `assumed_versions`
(docs/plan-json.md).

What the installed libraries can do is asked here too, the same way (the executor asks before it builds a config).
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

import functools
import re
from importlib import metadata
from typing import Optional

# What the plan assumes where a package is not installed: the stack the calibration rows ran (tables/calibration
# context.json and README) and `run`'s [run] extra.
DEFAULTS = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "trl": "1.16.0", "bitsandbytes": "0.50.2"}


def parse(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0): the leading numeric release, enough to compare releases."""
    parts = []
    for piece in re.split(r"[.+]", version):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _installed_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def installed() -> dict[str, dict[str, str]]:
    """{package: {"version": v, "source": "installed" | "assumed"}} for the packages the memory terms depend on."""
    out = {}
    for name, default in DEFAULTS.items():
        v = _installed_version(name)
        out[name] = {"version": v or default, "source": "installed" if v else "assumed"}
    return out


def version(name: str) -> tuple[int, ...]:
    return parse(installed()[name]["version"])


def torch_has_mm_out_dtype() -> bool:
    """torch >= 2.8: trl's chunked loss accumulates bf16 tiles into fp32 without upcasting them."""
    return version("torch") >= (2, 8)


TRL_CASTS_QUANTIZED_ADAPTERS = (0, 26)  # trl 2af35fb0d "Clean up model preparation" (#4577), first in v0.26.0


def trl_casts_quantized_adapters_to_bf16() -> bool:
    """trl >= 0.26: SFTTrainer casts the trainable parameters of a model loaded in 4 or 8 bits to bf16
    (trl/trainer/sft_trainer.py: "When using QLoRA, the PEFT adapter weights are converted to bf16", gated on
    `model.is_loaded_in_4bit`, which transformers' bitsandbytes quantizer sets in from_pretrained). Before 0.26 trl
    left peft's fp32 adapters alone when it was handed a PeftModel."""
    return version("trl") >= TRL_CASTS_QUANTIZED_ADAPTERS


def adapter_dtype(method: str, dtype: str) -> str:
    """The dtype `run` trains the LoRA weights in: peft's fp32, except QLoRA with bf16 compute under a trl that casts
    a 4-bit model's adapters to bf16 (`run` loads QLoRA with from_pretrained + BitsAndBytesConfig, so the cast
    applies; on fp16 / fp32 plans executor/backends/hf.py casts them back to fp32 for the grad scaler)."""
    if method == "qlora" and dtype == "bfloat16" and trl_casts_quantized_adapters_to_bf16():
        return "bfloat16"
    return "float32"


def assumed() -> dict:
    """What the plan records: each package's version and whether it was read or assumed, and what depends on it."""
    v = installed()
    return {
        "packages": v,
        "terms": {
            "fused_loss": "trl's chunked LM head (trl 1.16 kernels/chunked_logprob.py); fp32 tile upcast in the "
                          "backward " + ("not needed (torch >= 2.8)" if torch_has_mm_out_dtype()
                                         else "counted (torch < 2.8)"),
            "adapter_dtype": "QLoRA adapters with bf16 compute in bf16, as trl's SFTTrainer casts them "
                             + ("(trl >= 0.26)" if trl_casts_quantized_adapters_to_bf16()
                                else "not (trl < 0.26: peft's fp32)") + "; otherwise fp32 (peft's default)",
        },
    }


TRL_TORCH_FUSED_LOSS = (1, 16)  # first trl whose fused LM-head loss runs without Triton
# 5.17 lacks activation_checkpointing*, 5.24 has it; the releases between were not checked (5.18 assumed). The
# executor does not rely on this: executor/compat.py reads SFTConfig's own fields.
TRANSFORMERS_ACTIVATION_CHECKPOINTING = (5, 18)


def installed_version(dist: str) -> Optional[str]:
    """The installed release of a distribution, from its metadata; None when it is not installed."""
    return _installed_version(dist)


def version_tuple(dist: str) -> Optional[tuple[int, ...]]:
    """(major, minor, patch) of an installed distribution; None when it is not installed (no assumed default)."""
    v = _installed_version(dist)
    return None if v is None else parse(v)[:3]


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
    return (f"trl {installed_version('trl')}'s fused loss needs Triton, which has no {device} backend (trl "
            f"{'.'.join(map(str, TRL_TORCH_FUSED_LOSS))} added a torch path): the loss is computed from the "
            f"model's full logits instead")


def transformers_has_activation_checkpointing() -> bool:
    v = version_tuple("transformers")
    return v is not None and v >= TRANSFORMERS_ACTIVATION_CHECKPOINTING
