"""The versions of the training stack the memory model assumes, read from package metadata (never by importing).

Some terms depend on what a library version does: trl's SFTTrainer computes its loss through the fused, chunked LM
head (`fused_lm_head`) in the versions the calibration measured (1.16), and its backward accumulates the tiles'
gradient GEMMs with `torch.addmm(out_dtype=float32)` only from torch 2.8 (trl kernels/chunked_logprob.py
`_MM_OUT_DTYPE`); before that each tile and weight chunk is upcast to fp32 (planner.memory.fused_loss_bytes).
`installed()` reads what is installed with importlib.metadata; where a package is missing the plan assumes the
version `run` installs (tables: the calibration's stack) and says so. The plan records both in `assumed_versions`
(docs/plan-json.md).
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


def assumed() -> dict:
    """What the plan records: each package's version and whether it was read or assumed, and what depends on it."""
    v = installed()
    return {
        "packages": v,
        "terms": {
            "fused_loss": "trl's chunked LM head (trl 1.16 kernels/chunked_logprob.py); fp32 tile upcast in the "
                          "backward " + ("not needed (torch >= 2.8)" if torch_has_mm_out_dtype()
                                         else "counted (torch < 2.8)"),
        },
    }
