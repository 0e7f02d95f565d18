"""The Unsloth training backend, "unsloth" (planner/plugins/backends.py's second entry; the seam is
executor/backends/__init__.py).

Unsloth's recipe with the plan's settings: `FastLanguageModel.from_pretrained` (the plan's quantization),
`FastLanguageModel.get_peft_model` (the plan's adapter), then trl's `SFTTrainer`, which Unsloth patches in place,
here as PlanTrainer (executor/plan_trainer.py, built after unsloth is imported, so it subclasses the patched
class). Checkpoints, resume, the summary and merge are the standard backend's (HFBackend), and the adapter Unsloth
saves is a plain peft adapter: `PeftModel.from_pretrained` loads it without unsloth.

Checked with unsloth / unsloth_zoo 2026.10.9, transformers 5.17.0, trl 1.15.0, peft 0.21.2 on the CPU torch 2.13
wheel (the environment `.ci/unsloth-env` builds). What the installed source does, and what follows here:
- `import unsloth` must run before trl, transformers and peft in every process: it patches them in place
  (unsloth/trainer.py `_patch_trl_trainer`). `prepare_process` imports it first (runner.execute and every launcher
  worker, executor/worker.py, call it before anything else) and refuses when one of them came first.
- Without a GPU it selects its CPU backend (unsloth_zoo/cpu): stock transformers + peft + trl, 4-bit through
  bitsandbytes' CPU backend, a chunked cross-entropy, and trl 1.x's fused LM head routed to a torch implementation
  (unsloth_zoo/cpu/ops.py `patch_trl_fused_lm_head`), so trl 1.15's Triton-only fused loss runs on a CPU under
  Unsloth (executor/compat.py `use_fused_loss`).
- Its SFTTrainer turns padding-free on by itself unless the config says otherwise (unsloth/trainer.py
  `_patch_sft_trainer_auto_packing`): the config always sets padding_free from the plan (saver_settings.py).
- Gradient checkpointing is Unsloth's own (use_gradient_checkpointing="unsloth", applied by get_peft_model): trl
  must not enable transformers' checkpointing on top, so the config's is off.

Nothing here imports the training stack at module level.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, Optional

from loraplan.planner.errors import first_line
from loraplan.planner.plugins.backends import BACKENDS

from ..errors import RunError
from .hf import HFBackend, load_tokenizer

NAME = "unsloth"
INSTALL_HINT = BACKENDS[NAME].install_hint
# Imported before unsloth, these are left unpatched (unsloth warns and runs slower or wrong).
MUST_FOLLOW = ("trl", "transformers", "peft")
CHECKPOINTING = BACKENDS[NAME].checkpointing  # "unsloth": its offloaded checkpointing (planner/memory/unsloth.py)


def installed_version(dist: str) -> Optional[str]:
    """The installed version of a distribution from its metadata, without importing it; None when absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def why_not_installed() -> Optional[str]:
    """Why this process cannot run the Unsloth backend, in one line; None when it can. Imports nothing."""
    for dist in ("unsloth", "unsloth_zoo"):
        if importlib.util.find_spec(dist) is None or installed_version(dist) is None:
            return f"training backend unsloth needs {dist}, which is not installed; install it with {INSTALL_HINT}"
    torch_version = installed_version("torch") or ""
    if installed_version("torchvision") is not None and "+cpu" in torch_version:
        return ("torchvision is installed beside the CPU torch, and `import unsloth` fails with it "
                "(operator torchvision::nms does not exist): pip uninstall -y torchvision")
    return None


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


class UnslothBackend(HFBackend):
    """FastLanguageModel + get_peft_model + trl's SFTTrainer as Unsloth patched it; resume and saving are hf's."""

    name = NAME

    def check_installed(self, plan) -> None:
        why = why_not_installed()
        if why:
            raise RunError(why)
        super().check_installed(plan)  # the [run] extra, bitsandbytes for QLoRA, this entry's imports

    def prepare_process(self) -> None:
        """Import unsloth first in this process, so that it patches trl, transformers and peft in place."""
        if "unsloth" in sys.modules:
            return
        why = why_not_installed()
        if why:
            raise RunError(why)
        early = [m for m in MUST_FOLLOW if m in sys.modules]
        if early:
            raise RunError(f"{', '.join(early)} imported before unsloth in this process: unsloth must be imported "
                           "first to patch them (a bug in loraplan's start-up order)")
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # nothing leaves the machine
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import unsloth  # noqa: F401  (the import itself is the point: it patches the libraries)

    def load_tokenizer(self, plan, model_dir: str):
        """The model folder's tokenizer, with a pad token (train_plan reads the data before the model loads;
        Unsloth's from_pretrained loads the same tokenizer.json beside the model)."""
        return load_tokenizer(model_dir, plan.model.trust_remote_code)

    def load_model(self, plan, model_dir: str, device_map: Optional[dict]):
        """FastLanguageModel.from_pretrained with the plan's quantization: load_in_4bit for qlora (Unsloth's NF4 +
        double quantization in the model's dtype; unsloth/models/llama.py), the plan's dtype and length."""
        from unsloth import FastLanguageModel

        q = plan.quantization
        if q.enabled and (q.quant_type != "nf4" or not q.double_quant):
            raise RunError(f"the unsloth backend quantizes as NF4 with double quantization only (the plan asks for "
                           f"{q.quant_type}{' with' if q.double_quant else ' without'} double quantization): plan "
                           "again with --backend hf for another scheme")
        if q.enabled and q.compute_dtype != plan.training.dtype:
            raise RunError(f"the unsloth backend computes 4-bit layers in the model's dtype ({plan.training.dtype}); "
                           f"the plan's compute dtype is {q.compute_dtype}")
        kwargs: dict[str, Any] = dict(
            max_seq_length=plan.training.seq_len,
            dtype=_dtype(plan.training.dtype),
            load_in_4bit=bool(q.enabled),
            use_gradient_checkpointing=CHECKPOINTING if plan.training.grad_checkpointing else False,
            trust_remote_code=plan.model.trust_remote_code,
            local_files_only=True,
        )
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            model, _tokenizer = FastLanguageModel.from_pretrained(model_dir, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"cannot load the model from {model_dir} with unsloth: {first_line(exc)}") from None
        model.config.use_cache = False
        return model

    def wrap_adapter(self, plan, model, base_ref: str):
        """FastLanguageModel.get_peft_model with the plan's adapter (r, alpha, dropout, targets, bias) and Unsloth's
        checkpointing; on the CPU backend it is peft's get_peft_model."""
        from unsloth import FastLanguageModel

        lo = plan.lora
        if lo.target_parameters:
            raise RunError("the unsloth backend's get_peft_model takes target_modules only; the plan adapts "
                           f"parameters ({', '.join(lo.target_parameters)}): plan again with --backend hf")
        try:
            model = FastLanguageModel.get_peft_model(
                model, r=lo.r, lora_alpha=lo.lora_alpha, lora_dropout=lo.lora_dropout,
                target_modules=list(lo.target_modules) or None, bias=lo.bias,
                use_gradient_checkpointing=CHECKPOINTING if plan.training.grad_checkpointing else False,
                random_state=plan.training.seed, max_seq_length=plan.training.seq_len,
            )
        except ValueError as exc:
            raise RunError(f"cannot add the plan's LoRA adapter with unsloth: {first_line(exc)}") from None
        for cfg in model.peft_config.values():  # so that `merge` finds the base
            cfg.base_model_name_or_path = base_ref
        return model

    def build_trainer(self, plan, state, *, model, tokenizer, train_dataset, eval_dataset, callbacks):
        """hf's PlanTrainer and SFTConfig (subclassing the SFTTrainer Unsloth patched), with transformers'
        checkpointing off: get_peft_model applied Unsloth's."""
        unsloth_checkpoints = copy.copy(plan)  # the config sees checkpointing off; the plan itself is unchanged
        unsloth_checkpoints.training = dataclasses.replace(plan.training, grad_checkpointing=False)
        return super().build_trainer(unsloth_checkpoints, state, model=model, tokenizer=tokenizer,
                                     train_dataset=train_dataset, eval_dataset=eval_dataset, callbacks=callbacks)


BACKEND = UnslothBackend()
