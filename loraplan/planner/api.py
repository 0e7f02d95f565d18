"""Planning, end to end: `make_plan(PlanRequest(...))` -> PlanResult. The one entry point of the CLI and tests.

It only assembles; each job has its module:
    planner.decision.resolve         PlanRequest, its validation, and `resolve` (defaults and derived values, once)
    planner.decision.context_length  --seq-len max: the longest context that fits
    planner.decision.placement       the decision: the strategy, and for it (planner.decision.rules's rules) method, checkpointing,
                            micro-batch and savers, their reasons, and what would fit (planner.decision.suggest)
    planner.decision.estimate        tokens/s and hours
    planner.decision.fit_table       the same request on every catalog card
    planner.report.result          PlanResult and its JSON form
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .architecture.targets import trainable_params
from .decision.backend_compare import compare_backends
from .decision.context_length import at_planned_length
from .decision.estimate import estimate
from .decision.fit_table import fit_table
from .decision.placement import place
from .decision.resolve import Resolved, resolve
from .decision.rules import Choice, Decision, shape
from .decision.scaling import fewer_is_faster
from .errors import InputError
from .facts import options, versions
from .facts.request import PlanRequest
from .memory import terms as memory
from .plugins.backends import BACKENDS
from .planfile.schema import Dataset, Distributed, LoraSettings, Plan, Prediction, Quantization, Savers, Training
from .plugins.strategies import STRATEGIES
from .report.notebook import PlanView
from .report.result import PlanResult


def _logging_steps(r: Resolved) -> int:
    """planner.facts.options.logging_interval over the run's optimizer steps, when they are known."""
    if r.max_steps:
        steps = r.max_steps
    elif r.dataset is not None:
        steps = math.ceil(math.ceil(max(r.dataset.rows_trained, 1) / r.global_batch_size) * r.epochs)
    else:
        return int(options.default("logging_steps"))
    return options.logging_interval(steps)


def _warnings(r: Resolved) -> list[str]:
    out = list(r.model.notes)  # what the model's name or catalog entry implies (planner.model_names, plan_notes)
    context = r.arch.config.get("max_position_embeddings")
    if isinstance(context, int) and r.seq_len > context:
        out.append(f"--seq-len {r.seq_len:,} is beyond the model's max_position_embeddings ({context:,}): positions "
                   "past it were never trained; quality degrades unless the model's RoPE scaling is extended")
    if r.hardware.gpu == "cpu" and r.hardware.num_gpus > 1:
        out.append(f"{r.hardware.num_gpus} CPU processes share one machine's RAM: each is planned with "
                   f"{r.hardware.memory_gib:.1f} GiB")
    return out


def _backend_warnings(r: Resolved, c: Choice) -> list[str]:
    """What the plan's backend says about the chosen configuration (its entry's `warnings` hook)."""
    s = shape(r, c.method, c.micro_batch_size, c.grad_checkpointing, savers=c.savers)
    return BACKENDS[r.backend].warnings(r.arch, s, r.dropout)


def _assumptions(r: Resolved, c: Choice) -> dict[str, str]:
    quant = "none"
    if c.method == "qlora":
        quant = (f"{options.default('quantization').upper()}, double quantization {'on' if options.default('double_quantization') else 'off'}, "
                 f"blocksize {options.default('quant_blocksize')}; embeddings, lm_head, norms kept in {r.dtype}, not upcast")
        if r.arch.is_moe:
            quant += (f"; MoE expert weights stay in {r.dtype}: transformers' bitsandbytes integration does not "
                      "quantize fused 3-D expert parameters")
    return {
        "dtype": r.dtype,
        "attn_implementation": r.arch.attn_implementation,
        "loss": options.LOSS_DESCRIPTIONS[r.loss],
        "optimizer": options.OPTIMIZERS[r.optimizer].description,
        "quantization": quant,
        "lora_dtype": ("bf16 adapter weights, gradients and AdamW moments (trl's SFTTrainer casts a 4-bit model's "
                       f"adapters to bf16 from trl 0.26; trl {versions.installed()['trl']['version']} assumed)"
                       if versions.adapter_dtype(c.method, r.dtype) == "bfloat16"
                       else "fp32 adapter weights (peft default)"),
        "memory_model": "fitted on H200 measurements; CUDA context as measured there",
    }


def _savers(r: Resolved, c: Choice) -> Savers:
    sv = c.savers
    return Savers(on=list(sv.names), every_n_layers=sv.every_n_layers, pinned_host_gib=round(c.host_gib, 4),
                  host_memory_gib=round(r.host_memory_gib, 2) if r.uses_savers else None)


def _plan(req: PlanRequest, r: Resolved, d: Decision, tokens_per_s: Optional[float], warnings: list[str]) -> Plan:
    c, ds = d.choice, r.dataset
    # padding-free packing: trl packs rows without padding and flash-attention's varlen kernel keeps them apart
    attn = "flash_attention_2" if "padding_free" in c.savers.on else r.arch.attn_implementation
    return Plan(
        model=r.model.ref,
        hardware=r.hardware,
        method=c.method,
        quantization=Quantization(enabled=c.method == "qlora", compute_dtype=r.dtype),
        lora=LoraSettings(r=r.rank, lora_alpha=r.alpha, lora_dropout=r.dropout,
                          target_modules=r.selection.target_modules, target_parameters=r.selection.target_parameters),
        training=Training(
            seq_len=r.seq_len, micro_batch_size=c.micro_batch_size, grad_accum_steps=r.per_gpu_batch // c.micro_batch_size,
            global_batch_size=r.global_batch_size, grad_checkpointing=c.grad_checkpointing, optimizer=r.optimizer,
            loss=r.loss, learning_rate=r.learning_rate, num_epochs=r.epochs, max_steps=r.max_steps or -1,
            logging_steps=_logging_steps(r), dtype=r.dtype, attn_implementation=attn, packing="padding_free" in c.savers.on,
            report_to=req.report_to, backend=r.backend,
        ),
        prediction=Prediction(per_gpu_gib=round(memory.Term.sum_gib(c.terms), 4), terms={t.name: round(t.gib, 4) for t in c.terms},
                              margin=memory.coefficients().decision.safety_margin, tokens_per_s=tokens_per_s),
        strategy=r.strategy.name,
        distributed=_distributed(r, d),
        dataset=Dataset(path=ds.path if ds else None, format=ds.format if ds else "auto", rows=ds.rows_trained if ds else None,
                        tokens_total=ds.tokens_total if ds else None, mean_tokens_per_row=ds.mean_tokens if ds else None,
                        eval_path=r.eval_path, eval_fraction=r.eval_fraction),
        savers=_savers(r, c),
        output_dir=req.output_dir or "out",
        assumptions=_assumptions(r, c),
        reasons=d.reasons,
        warnings=warnings,
    )


def _distributed(r: Resolved, d: Decision) -> Distributed:
    if not r.strategy.sharded:
        return Distributed()
    return Distributed(offload_params=r.strategy.offload_params,
                       cpu_ram_efficient_loading=bool(d.load and d.load.cpu_ram_efficient_loading),
                       quant_storage=r.dtype if d.choice.method == "qlora" else None)


def make_plan(req: PlanRequest) -> PlanResult:
    asked = resolve(req)
    r, _ = at_planned_length(asked)  # --seq-len max: the longest that fits, or the shortest tried when nothing does
    d = place(r)
    r = dataclasses.replace(r, strategy=STRATEGIES[d.strategy])
    est = estimate(r, d.choice, r.dataset.tokens_total if r.dataset else None)
    warnings = _warnings(r) + fewer_is_faster(r, est)  # more GPUs that are slower: say so (planner.decision.scaling)
    warnings += _backend_warnings(r, d.choice)
    plan = _plan(req, r, d, est.tokens_per_s, warnings)
    plan.validate()
    return PlanView(
        plan=plan, model=r.model, selection=r.selection, trainable_params=trainable_params(r.selection, r.rank),
        terms=list(d.choice.terms), feasible=d.feasible, usable_gib=r.usable_gib, hardware_note=r.hardware_note,
        suggestions=d.suggestions, fit_table=fit_table(req, asked) if req.fit_table else [], dataset=r.dataset, estimate=est,
        warnings=warnings, strategies=d.options, load=d.load, host_terms=list(d.choice.host_terms), resolved=r,
        choice=d.choice, backends=compare_backends(req, asked),
    )


__all__ = ["PlanRequest", "PlanResult", "make_plan", "InputError"]
