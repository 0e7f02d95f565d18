"""What `loraplan merge` reads from the run an adapter came from, and how its files end up on disk.

- The run's plan (`plan.yaml` beside the `adapter/` folder, as `run` writes it): the default merge dtype is the
  plan's training.dtype, and a QLoRA plan gets a note, since the adapter was trained against 4-bit weights and
  the merged model folds it into the unquantized ones (docs/running.md, "Merging a QLoRA adapter").
- File modes: some savers write through a private temporary file (mode 0600); every file of the merged folder
  gets the mode the user's umask gives a new file (0644 under the usual 022), as the tokenizer files already have.
"""

from __future__ import annotations

import os

# training.dtype -> merge --dtype
DTYPE_FLAGS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DEFAULT_DTYPE = "bf16"  # an adapter whose run's plan is not beside it
QLORA_NOTE = ("note: this adapter was trained against 4-bit (NF4) weights; the merged model folds it into the "
              "unquantized base, so its outputs differ slightly from the model that was trained (see "
              "docs/running.md, \"Merging a QLoRA adapter\")")


def run_plan(adapter_dir: str):
    """The plan of the run that wrote ADAPTER_DIR (its folder's plan.yaml), or None when there is none to read."""
    from loraplan.planner.errors import PlanError
    from loraplan.planner.planfile import paths as plan_paths

    path = os.path.join(os.path.dirname(os.path.abspath(adapter_dir)), "plan.yaml")
    if not os.path.isfile(path):
        return None
    try:
        return plan_paths.load(path)
    except PlanError:
        return None


def default_dtype(adapter_dir: str) -> tuple[str, str]:
    """The merge dtype when --dtype is not given, and where it came from (for the line merge prints)."""
    plan = run_plan(adapter_dir)
    if plan is not None and plan.training.dtype in DTYPE_FLAGS:
        return DTYPE_FLAGS[plan.training.dtype], f"the run's training.dtype, {plan.training.dtype}"
    return DEFAULT_DTYPE, "the default: no plan.yaml of the run beside the adapter"


def trained_on_4bit(adapter_dir: str) -> bool:
    plan = run_plan(adapter_dir)
    return plan is not None and plan.quantization.enabled


def new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask_modes(folder: str) -> None:
    """Give every file under FOLDER the mode a new file gets under the current umask."""
    mode = new_file_mode()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)
