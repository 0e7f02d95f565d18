"""The standard training backend, "hf": transformers loads the model (4-bit through bitsandbytes), peft wraps the
adapter, trl's SFTTrainer trains it (planner/plugins/backends.py's first entry; the seam is executor/backends/__init__.py).

QLoRA follows the recipe the memory model was calibrated on: every linear layer but the LM head in NF4 with
double quantization, compute in the plan's dtype, and nothing upcast to fp32 (no prepare_model_for_kbit_training),
wrapped with get_peft_model here so SFTTrainer never sees a peft_config (it would upcast).

Nothing here imports the training stack at module level: `loraplan run` checks it is installed first.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from loraplan.planner.errors import first_line
from loraplan.planner.facts.options import OPTIMIZERS

from ..errors import RunError, require_run_extra
from ..fsdp import is_sharded, quant_storage
from ..model import load_error, torch_dtype
from . import require_imports


def load_tokenizer(model_dir: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:
        first = first_line(exc)
        raise RunError(f"cannot load a tokenizer from {model_dir}: {first}") from None
    if tok.pad_token is None:  # batches need padding; the EOS token is the usual stand-in
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(plan):
    """bitsandbytes 4-bit config from plan.quantization (blocksize is bitsandbytes' fixed 64)."""
    from transformers import BitsAndBytesConfig

    q = plan.quantization
    if q.blocksize != 64:  # transformers' bitsandbytes integration has no blocksize setting: it is always 64
        raise RunError(f"quantization.blocksize {q.blocksize} cannot be run: bitsandbytes through transformers "
                       f"quantizes in blocks of 64")
    extra = {}
    if is_sharded(plan):  # packed in a floating dtype so that FSDP shards the 4-bit weights (executor/fsdp.py)
        extra["bnb_4bit_quant_storage"] = torch_dtype(quant_storage(plan))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        **extra,
    )


def load_dtype(plan) -> str:
    """The dtype the weights load in: training.dtype; for QLoRA under FSDP the 4-bit storage dtype, so that every
    parameter of an FSDP unit (packed 4-bit weights, norms, embeddings) has one dtype (peft's FSDP + QLoRA recipe:
    `dtype` = `bnb_4bit_quant_storage`)."""
    if plan.quantization.enabled and is_sharded(plan):
        return quant_storage(plan)
    return plan.training.dtype


def load_base_model(plan, model_dir: str, device_map: Optional[dict] = None):
    """The base model in the plan's dtype, 4-bit when the plan says qlora. Nothing is upcast."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(load_dtype(plan)),
        trust_remote_code=plan.model.trust_remote_code,
        local_files_only=True,
        attn_implementation=plan.training.attn_implementation,
    )
    if plan.quantization.enabled:
        kwargs["quantization_config"] = quantization_config(plan)
        kwargs["device_map"] = device_map or {"": "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except Exception as exc:
        error = load_error(exc, model_dir)
        if error is None:
            raise
        raise error from None
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    return model


def lora_config(plan):
    from peft import LoraConfig

    lo = plan.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.lora_alpha,
        lora_dropout=lo.lora_dropout,
        target_modules=list(lo.target_modules) or None,
        target_parameters=list(lo.target_parameters) or None,
        bias=lo.bias,
        task_type=lo.task_type,
    )


def wrap_lora(plan, model):
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(plan))
    except ValueError as exc:
        first = first_line(exc)
        raise RunError(f"cannot add the plan's LoRA adapter: {first}") from None


class HFBackend:
    """transformers + peft + trl, as the functions above do it; every method is one step of train_plan."""

    name = "hf"

    def check_installed(self, plan) -> None:
        """The [run] extra (and bitsandbytes for QLoRA or an 8-bit optimizer), else one line with the command."""
        needs_bnb = plan.quantization.enabled or OPTIMIZERS[plan.training.optimizer].needs_bitsandbytes
        require_run_extra(("bitsandbytes",) if needs_bnb else ())
        require_imports(self.name)

    def prepare_process(self) -> None:
        """Nothing to patch before the stack is imported."""

    def set_seed(self, seed: int) -> None:
        import transformers

        transformers.set_seed(seed)

    def load_tokenizer(self, plan, model_dir: str):
        return load_tokenizer(model_dir, plan.model.trust_remote_code)

    def load_model(self, plan, model_dir: str, device_map: Optional[dict]):
        """The base model; for QLoRA under FSDP built on the meta device, its weights filled one FSDP unit at a
        time once the trainer's Accelerator exists (build_trainer; executor/fsdp_load.py)."""
        from ..fsdp_load import STREAMED, load_path

        if load_path(plan, model_dir) == STREAMED:
            return load_base_model(plan, model_dir, {"": "meta"})
        return load_base_model(plan, model_dir, device_map)

    def wrap_adapter(self, plan, model, base_ref: str):
        from ..fsdp_load import is_on_meta, wrap_on_host

        if is_on_meta(model):  # the adapter is initialised by peft on the host all the same
            model = wrap_on_host(model, lambda m: wrap_lora(plan, m))
        else:
            model = wrap_lora(plan, model)
        for cfg in model.peft_config.values():  # so that `merge` finds the base
            cfg.base_model_name_or_path = base_ref
        return model

    def build_trainer(self, plan, state, *, model, tokenizer, train_dataset, eval_dataset, callbacks):
        """PlanTrainer (trl's SFTTrainer) with SFTConfig from the plan (executor/trainer_settings.py)."""
        from transformers import PrinterCallback

        from ..plan_trainer import PlanTrainer
        from ..trainer_settings import sft_config

        t = plan.training
        trainer = PlanTrainer(
            model=model,
            args=sft_config(plan, state.place, has_eval=eval_dataset is not None),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            plan_loss=t.loss,
            keep_checkpoints=t.save_total_limit,
            sharded=state.sharded,
        )
        trainer.remove_callback(PrinterCallback)
        if plan.quantization.enabled and t.dtype != "bfloat16":
            # trl casts a quantized model's adapters to bf16 (QLoRA paper); on fp16/fp32 plans keep them fp32 so
            # the fp16 grad scaler and cards without bf16 work.
            for p in trainer.model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        from ..fsdp_load import LoadTrace, is_on_meta, shard_while_loading

        if is_on_meta(trainer.model):  # layer-streamed: the weights now, unit by unit, with the Trainer's FSDP plugin
            from ..model import plan_model_dir

            state.load_trace = LoadTrace()
            shard_while_loading(trainer.model, plan_model_dir(plan), trainer.accelerator, state.load_trace,
                                plan.model.trust_remote_code)
        return trainer

    def load_last_step(self, trainer, checkpoint: str, sharded: bool) -> None:
        """A last-step checkpoint's adapter weights and trainer state, loaded as trainer.train() would, without a
        step (Trainer would run one step past max_steps when max_steps ends mid-epoch)."""
        from transformers import TrainerState

        model = trainer.model
        if sharded:  # FSDP checkpoint: the adapter is in torch.distributed.checkpoint shards
            from ..fsdp import load_sharded_adapter

            load_sharded_adapter(model, checkpoint)
        else:
            model.load_adapter(checkpoint, model.active_adapter, is_trainable=True)
        trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))


BACKEND = HFBackend()
