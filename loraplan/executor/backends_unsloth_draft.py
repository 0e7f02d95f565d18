"""The Unsloth training backend (draft: moves to executor/backends/unsloth.py once the backend seam lands).

Unsloth's recipe, with the plan's settings: `FastLanguageModel.from_pretrained` (the plan's quantization),
`FastLanguageModel.get_peft_model` (the plan's adapter), then trl's `SFTTrainer`, which Unsloth patches in place.
The verbs match the seam's: check_installed, prepare_process, load_tokenizer, load_model, wrap_adapter,
build_trainer. Checked with unsloth / unsloth_zoo 2026.10.9, transformers 5.17.0, trl 1.15.0, peft 0.21.2 on the
CPU torch 2.13 wheel (the environment `.ci/unsloth-env` builds).

What the installed source does (site-packages, 2026.10.9), and what follows here:
- `import unsloth` must run before trl, transformers and peft in every process: it patches them in place
  (unsloth/trainer.py `_patch_trl_trainer`). `prepare_process` imports it first and refuses when one of them is
  already imported.
- Without a GPU it selects its CPU backend (unsloth_zoo/cpu): stock transformers + peft + trl, 4-bit through
  bitsandbytes' CPU backend where that runs (unsloth_zoo/cpu/loader.py:211-214, else 16-bit), a chunked
  cross-entropy, and trl 1.x's fused LM head routed to a torch implementation (unsloth_zoo/cpu/ops.py:277
  `patch_trl_fused_lm_head`): so trl 1.15's Triton-only fused loss runs on a CPU under Unsloth, while the standard
  backend on trl 1.15 cannot (executor/compat.py).
- Its SFTTrainer turns padding-free on by itself unless the config says otherwise (unsloth/trainer.py
  `_patch_sft_trainer_auto_packing`): the config built here always sets padding_free from the plan.
- The adapter it saves is a plain peft adapter: `PeftModel.from_pretrained` loads it without unsloth.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from typing import Any, Optional

from .errors import RunError

NAME = "unsloth"
# Unsloth caps transformers, trl and datasets below the main environment's, and PyPI's torchvision breaks
# `import unsloth` beside the CPU torch: the install hint names all of it.
INSTALL_HINT = ('pip install "loraplan[unsloth]" -c <(echo torch==2.13.0) && pip uninstall -y torchvision '
                "(or: bash .ci/unsloth-env)")
# Imported before unsloth, these are left unpatched (unsloth warns and runs slower or wrong).
MUST_FOLLOW = ("trl", "transformers", "peft")
# Unsloth's own names for the gradient checkpointing it applies: "unsloth" offloads every decoder layer's input
# but the last one to pinned host memory on a GPU (unsloth_zoo/gradient_checkpointing.py); on the CPU it is
# plain recomputation (unsloth_zoo/cpu/loader.py `_prepare`).
CHECKPOINTING = "unsloth"


def installed_version(dist: str) -> Optional[str]:
    """The installed version of a distribution from its metadata, without importing it; None when absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_installed() -> Optional[str]:
    """Why this process cannot run the Unsloth backend, in one line; None when it can. Imports nothing."""
    if importlib.util.find_spec("unsloth") is None or installed_version("unsloth") is None:
        return f"the unsloth backend needs unsloth, which is not installed: {INSTALL_HINT}"
    if installed_version("unsloth_zoo") is None:
        return f"the unsloth backend needs unsloth_zoo, which is not installed: {INSTALL_HINT}"
    if installed_version("torchvision") is not None and not _cuda_torch():
        return ("torchvision is installed beside the CPU torch, and `import unsloth` fails with it "
                "(operator torchvision::nms does not exist): pip uninstall -y torchvision")
    return None


def _cuda_torch() -> bool:
    """Whether the installed torch wheel is a CUDA build (its version has no '+cpu'), read from metadata."""
    v = installed_version("torch") or ""
    return "+cpu" not in v


def prepare_process() -> Any:
    """Import unsloth first in this process (launcher workers included: each calls this before anything else),
    so that it patches trl, transformers and peft in place. Returns the unsloth module."""
    why = check_installed()
    if why:
        raise RunError(why)
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    early = [m for m in MUST_FOLLOW if m in sys.modules]
    if early:
        raise RunError(f"{', '.join(early)} imported before unsloth in this process: unsloth must be imported "
                       "first to patch them (a bug in loraplan's start-up order)")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # nothing leaves the machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (the import itself is the point: it patches the libraries)

    return unsloth


def _fast_language_model():
    prepare_process()
    from unsloth import FastLanguageModel

    return FastLanguageModel


def _dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(plan, model_dir: str, device_map: Optional[dict] = None):
    """FastLanguageModel.from_pretrained with the plan's quantization: load_in_4bit for qlora (Unsloth's NF4 +
    double quantization + the plan's compute dtype; unsloth/models/llama.py:4010-4020), the plan's dtype and
    sequence length, its checkpointing. Returns (model, tokenizer): Unsloth loads both and patches the tokenizer
    (padding side, pad token), so the pair is kept together."""
    FLM = _fast_language_model()
    q = plan.quantization
    if q.enabled and (q.quant_type != "nf4" or not q.double_quant):
        raise RunError(f"the unsloth backend quantizes as NF4 with double quantization only (the plan asks for "
                       f"{q.quant_type}{' with' if q.double_quant else ' without'} double quantization): plan "
                       f"again with --backend hf for another scheme")
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
        model, tokenizer = FLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        from loraplan.planner.errors import first_line

        raise RunError(f"cannot load the model from {model_dir} with unsloth: {first_line(exc)}") from None
    model.config.use_cache = False
    return model, tokenizer


def load_tokenizer(model, model_dir: Optional[str] = None):
    """The tokenizer Unsloth loaded beside the model (from_pretrained returns both; its loaders keep it on the
    model as `_saved_temp_tokenizer`), with a pad token."""
    tok = getattr(model, "_saved_temp_tokenizer", None)
    if tok is None:
        if model_dir is None:
            raise RunError("unsloth loaded no tokenizer with the model")
        from .model import load_tokenizer as hf_load_tokenizer

        return hf_load_tokenizer(model_dir, False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def wrap_adapter(plan, model):
    """FastLanguageModel.get_peft_model with the plan's adapter: r, alpha, dropout, targets, bias. Unsloth fuses the
    LoRA projections (MLP, QKV, O) when bias is "none" and the base weights are 16-bit; dropout > 0 runs inside its
    kernels too (unsloth/kernels/fast_lora.py:86 UNSLOTH_FUSED_LORA_DROPOUT, on by default). On the CPU backend it
    is peft's get_peft_model."""
    FLM = _fast_language_model()
    lo = plan.lora
    if lo.target_parameters:
        raise RunError("the unsloth backend's get_peft_model takes target_modules only; the plan adapts parameters "
                       f"({', '.join(lo.target_parameters)}): plan again with --backend hf")
    try:
        return FLM.get_peft_model(
            model,
            r=lo.r,
            lora_alpha=lo.lora_alpha,
            lora_dropout=lo.lora_dropout,
            target_modules=list(lo.target_modules) or None,
            bias=lo.bias,
            use_gradient_checkpointing=CHECKPOINTING if plan.training.grad_checkpointing else False,
            random_state=plan.training.seed,
            max_seq_length=plan.training.seq_len,
        )
    except ValueError as exc:
        from loraplan.planner.errors import first_line

        raise RunError(f"cannot add the plan's LoRA adapter with unsloth: {first_line(exc)}") from None


def sft_args(plan, use_cpu: bool, **overrides):
    """The SFTConfig for the plan under Unsloth: the standard backend's settings, held to what the installed trl
    and transformers take (executor/compat.py), padding-free set explicitly (Unsloth's SFTTrainer would turn it on
    by itself), and checkpointing left to Unsloth (get_peft_model applied it; trl must not re-enable transformers'
    own on top)."""
    from trl import SFTConfig

    from . import compat

    t = plan.training
    kwargs: dict[str, Any] = dict(
        output_dir=plan.output_dir,
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        bf16=t.dtype == "bfloat16",
        fp16=t.dtype == "float16",
        gradient_checkpointing=False,
        max_length=t.seq_len,
        packing=t.packing,
        padding_free="padding_free" in plan.savers.names,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        report_to="none",
        disable_tqdm=True,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**compat.sft_config_kwargs(kwargs))


def build_trainer(plan, model, tokenizer, train_dataset, eval_dataset=None, args=None, callbacks=(),
                  trainer_class=None, **trainer_kwargs):
    """trl's SFTTrainer, as Unsloth patched it (prepare_process ran first, so `trl.SFTTrainer` is Unsloth's), with
    the plan's settings. `trainer_class` lets the executor pass its own subclass (PlanTrainer), built after unsloth
    was imported."""
    prepare_process()
    if trainer_class is None:
        from trl import SFTTrainer as trainer_class
    if args is None:
        import torch

        args = sft_args(plan, use_cpu=not torch.cuda.is_available())
    return trainer_class(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, callbacks=list(callbacks), **trainer_kwargs)
