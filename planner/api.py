"""Planning, end to end: request -> model and hardware -> adapter counts -> memory -> decisions -> Plan.

`make_plan(PlanRequest(...))` is what the CLI and the executor's tests call. Every derived value (gradient
accumulation from the global and micro batch, alpha from rank, ...) is computed and validated here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from . import memory as M
from .arch import Architecture, TargetSelection, select_targets, trainable_params
from .catalog import ResolvedModel, gpus, hyperparameters, resolve_hardware, resolve_model
from .errors import ArchitectureError, InputError
from .datasets import DatasetStats, dataset_stats
from .plan import Dataset, Hardware, LoraSettings, Plan, Prediction, Quantization, Training

GIB = 2**30
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class PlanRequest:
    model: str
    gpu: Optional[str] = "auto"
    gpu_memory: Optional[str] = None
    num_gpus: Optional[int] = None
    method: str = "auto"  # auto | lora | qlora
    rank: Optional[int] = None
    alpha: Optional[int] = None
    dropout: Optional[float] = None
    targets: Optional[str] = None
    seq_len: int = 2048
    batch_size: Optional[int] = None  # fixed micro-batch; None: choose
    global_batch_size: Optional[int] = None
    grad_checkpointing: str = "auto"  # auto | on | off
    optimizer: str = "adamw"
    loss: str = "fused"
    dataset: Optional[str] = None
    output_dir: Optional[str] = None
    learning_rate: Optional[float] = None
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    train_tokens: Optional[int] = None  # for the time estimate when no dataset is given
    trust_remote_code: bool = False
    fit_table: bool = True


@dataclass
class Choice:
    method: str
    grad_checkpointing: bool
    micro_batch_size: int
    terms: list[M.Term]

    @property
    def peak_gib(self) -> float:
        return sum(t.bytes for t in self.terms) / GIB


@dataclass
class PlanResult:
    plan: Plan
    model: ResolvedModel
    selection: TargetSelection
    trainable_params: int
    terms: list[M.Term]
    feasible: bool
    usable_gib: float
    hardware_note: str
    suggestions: list[str]
    fit_table: list[dict[str, Any]]
    dataset: Optional[DatasetStats]
    estimate: dict[str, Any]

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    @property
    def per_gpu_gib(self) -> float:
        return sum(t.bytes for t in self.terms) / GIB

    def to_json(self) -> dict[str, Any]:
        """Every fact the tables show (docs/plan-json.md documents the schema)."""
        a = self.arch
        plan = self.plan
        return {
            "schema": "loraplan.plan-result/1",
            "feasible": self.feasible,
            "model": {
                "name": plan.model.name, "display_name": self.model.display_name, "source": plan.model.source,
                "family": a.family, "path": plan.model.path, "hub_id": plan.model.hub_id,
            },
            "architecture": {
                "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_layers": a.num_layers,
                "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim,
                "vocab_size": a.vocab_size, "tie_word_embeddings": a.tie_word_embeddings,
                "num_experts": a.num_experts, "experts_per_token": a.experts_per_token,
                "total_params": a.total_params,
            },
            "adapter": {
                "trainable_params": self.trainable_params,
                "trainable_percent": 100.0 * self.trainable_params / a.total_params,
                "r": plan.lora.r, "lora_alpha": plan.lora.lora_alpha, "lora_dropout": plan.lora.lora_dropout,
                "target_modules": plan.lora.target_modules, "target_parameters": plan.lora.target_parameters,
                "per_module": [
                    {
                        "name": p.peft_name, "kinds": list(p.kinds), "in_features": p.in_features,
                        "out_features": p.out_features, "count": p.count, "experts": p.experts,
                        "params_each": p.lora_params(plan.lora.r) // p.count,
                        "trainable_params": p.lora_params(plan.lora.r),
                        "percent_of_layer": 100.0 * p.lora_params(plan.lora.r) / p.weight_params,
                        "percent_of_model": 100.0 * p.lora_params(plan.lora.r) / a.total_params,
                    }
                    for p in self.selection.projections
                ],
            },
            "hardware": {
                "gpu": plan.hardware.gpu, "name": plan.hardware.gpu_name, "memory_gib": plan.hardware.memory_gib,
                "num_gpus": plan.hardware.num_gpus, "bf16": plan.hardware.bf16, "note": self.hardware_note,
            },
            "memory": {
                "per_gpu_gib": self.per_gpu_gib,
                "usable_gib": self.usable_gib,
                "headroom_gib": plan.hardware.memory_gib - self.per_gpu_gib,
                "safety_margin": plan.prediction.margin,
                "terms": {t.name: t.gib for t in self.terms},
                "formulas": {t.name: t.formula for t in self.terms},
            },
            "decision": {
                "method": plan.method,
                "micro_batch_size": plan.training.micro_batch_size,
                "grad_accum_steps": plan.training.grad_accum_steps,
                "global_batch_size": plan.training.global_batch_size,
                "grad_checkpointing": plan.training.grad_checkpointing,
                "strategy": plan.strategy,
                "reasons": plan.reasons,
            },
            "training": {k: v for k, v in plan.to_dict()["training"].items()},
            "assumptions": plan.assumptions,
            "estimate": self.estimate,
            "dataset": None if self.dataset is None else self.dataset.to_dict(),
            "fit_table": self.fit_table,
            "suggestions": self.suggestions,
            "plan": plan.to_dict(),
        }


# ---------------------------------------------------------------------------------------------------------


def _hp(name: str) -> Any:
    return hyperparameters()[name]["value"]


def safety_margin() -> float:
    return float(M.coefficients()["decision"]["safety_margin"])


def _validate(req: PlanRequest) -> None:
    if req.seq_len is None or req.seq_len < 1:
        raise InputError(f"--seq-len must be a positive number of tokens, got {req.seq_len}")
    if req.rank is not None and req.rank < 1:
        raise InputError(f"--rank must be a positive integer, got {req.rank}")
    if req.alpha is not None and req.alpha <= 0:
        raise InputError(f"--alpha must be positive, got {req.alpha}")
    if req.dropout is not None and not 0.0 <= req.dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1), got {req.dropout}")
    if req.batch_size is not None and req.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {req.batch_size}")
    if req.global_batch_size is not None and req.global_batch_size < 1:
        raise InputError(f"--global-batch-size must be at least 1, got {req.global_batch_size}")
    if req.num_gpus is not None and req.num_gpus < 1:
        raise InputError(f"--num-gpus must be at least 1, got {req.num_gpus}")
    if req.method not in ("auto", "lora", "qlora"):
        raise InputError(f"--method must be auto, lora or qlora, not {req.method!r}")
    if req.grad_checkpointing not in ("auto", "on", "off"):
        raise InputError(f"--grad-checkpointing must be auto, on or off, not {req.grad_checkpointing!r}")
    if req.optimizer not in ("adamw", "adamw-8bit", "paged-adamw-8bit"):
        raise InputError(f"--optimizer must be adamw, adamw-8bit or paged-adamw-8bit, not {req.optimizer!r}")
    if req.loss not in ("fused", "full"):
        raise InputError(f"--loss must be fused or full, not {req.loss!r}")
    if req.max_steps is not None and req.max_steps < 1:
        raise InputError(f"--max-steps must be at least 1, got {req.max_steps}")
    if req.epochs is not None and req.epochs <= 0:
        raise InputError(f"--epochs must be positive, got {req.epochs}")
    if req.learning_rate is not None and req.learning_rate <= 0:
        raise InputError(f"--learning-rate must be positive, got {req.learning_rate}")


def _shape(method: str, r: int, mb: int, seq: int, gc: bool, req: PlanRequest, hw: Hardware, dtype: str) -> M.Shape:
    return M.Shape(method=method, r=r, micro_batch_size=mb, seq_len=seq, grad_checkpointing=gc, loss=req.loss,
                   optimizer=req.optimizer, dtype=dtype, double_quant=True, num_gpus=hw.num_gpus,
                   device="cpu" if hw.gpu == "cpu" else "cuda")


def _dtype(hw: Hardware) -> str:
    if hw.gpu == "cpu":
        return "float32"
    return "bfloat16" if hw.bf16 else "float16"


def choose(arch: Architecture, sel: TargetSelection, req: PlanRequest, hw: Hardware, r: int, per_gpu_batch: int,
           seq_len: int) -> tuple[Optional[Choice], Choice]:
    """Pick method, checkpointing and micro-batch. Returns (the choice, or None when nothing fits; the smallest
    candidate tried). LoRA first when allowed (it trains faster), checkpointing only when needed, then the largest
    micro-batch dividing the per-GPU batch that fits under the card's memory less the safety margin."""
    usable = hw.memory_gib * (1 - safety_margin())
    dtype = _dtype(hw)
    methods = ["lora", "qlora"] if req.method == "auto" else [req.method]
    gcs = {"auto": [False, True], "on": [True], "off": [False]}[req.grad_checkpointing]
    batches = [req.batch_size] if req.batch_size else [b for b in MICRO_BATCHES if b <= per_gpu_batch and per_gpu_batch % b == 0]
    smallest: Optional[Choice] = None
    for method in methods:
        for gc in gcs:
            best: Optional[Choice] = None
            for mb in batches:
                terms = M.budget(arch, sel, _shape(method, r, mb, seq_len, gc, req, hw, dtype))
                c = Choice(method, gc, mb, terms)
                if smallest is None or c.peak_gib < smallest.peak_gib:
                    smallest = c
                if c.peak_gib <= usable:
                    best = c
                else:
                    break  # memory grows with the micro-batch
            if best is not None:
                return best, smallest
    assert smallest is not None
    return None, smallest


def _reasons(req: PlanRequest, c: Choice, hw: Hardware, gbs: int, per_gpu_batch: int, accum: int,
             usable: float) -> dict[str, str]:
    margin = safety_margin()
    r: dict[str, str] = {}
    if req.method == "auto":
        r["method"] = (
            "LoRA fits, and it trains faster than QLoRA (no 4-bit dequantization: "
            f"{M.coefficients()['throughput']['lora_speedup_over_qlora']:.2f}x the tokens/s at the same shape, "
            "measured on an H200)"
            if c.method == "lora" else
            "LoRA's bf16 weights do not fit; QLoRA's 4-bit weights do"
        )
    else:
        r["method"] = f"{c.method} as asked (--method {req.method})"
    if req.grad_checkpointing == "auto":
        r["grad_checkpointing"] = (
            "on: without it even a micro-batch of 1 does not fit" if c.grad_checkpointing
            else "off: not needed to fit, and it would cost about a third more compute"
        )
    else:
        r["grad_checkpointing"] = f"{'on' if c.grad_checkpointing else 'off'} as asked"
    if req.batch_size:
        r["micro_batch_size"] = f"{c.micro_batch_size} as asked (--batch-size)"
    else:
        r["micro_batch_size"] = (
            f"{c.micro_batch_size}: the largest dividing the per-GPU batch of {per_gpu_batch} that stays under "
            f"{usable:.1f} GiB ({hw.memory_gib:.1f} GiB less a {margin:.0%} safety margin for the model's error)"
        )
    r["grad_accum_steps"] = (
        f"{accum} = global batch {gbs} / (micro-batch {c.micro_batch_size} x {hw.num_gpus} GPU(s))"
    )
    return r


def _hyper_reasons(req: PlanRequest) -> dict[str, str]:
    hp = hyperparameters()
    out = {}
    for k in ("learning_rate", "num_epochs", "rank", "alpha", "dropout", "warmup_ratio", "lr_scheduler"):
        if k in hp:
            out[k] = hp[k]["reason"]
    return out


def _suggest(arch, sel, req, hw, r, per_gpu_batch, smallest: Choice) -> list[str]:
    out = []
    usable = hw.memory_gib * (1 - safety_margin())
    out.append(f"the smallest configuration ({smallest.method}, micro-batch 1, checkpointing "
               f"{'on' if smallest.grad_checkpointing else 'off'}) needs {smallest.peak_gib:.1f} GiB per GPU; "
               f"{hw.gpu_name} allows {usable:.1f} GiB")
    dtype = _dtype(hw)
    if req.method == "lora" or req.grad_checkpointing == "off" or req.batch_size:
        relaxed = M.budget(arch, sel, _shape("qlora", r, 1, req.seq_len, True, req, hw, dtype))
        need = sum(t.bytes for t in relaxed) / GIB
        if need <= usable:
            out.append(f"QLoRA with gradient checkpointing at micro-batch 1 fits ({need:.1f} GiB): "
                       "--method auto --grad-checkpointing auto" + (" without --batch-size" if req.batch_size else ""))
    seq = req.seq_len
    while seq > 128:
        seq //= 2
        need = sum(t.bytes for t in M.budget(arch, sel, _shape("qlora" if req.method != "lora" else "lora", r, 1, seq, True, req, hw, dtype))) / GIB
        if need <= usable:
            out.append(f"a shorter sequence fits: --seq-len {seq} ({need:.1f} GiB)")
            break
    if req.optimizer == "adamw" and trainable_params(sel, r) * 12 / GIB > 0.5:
        out.append("an 8-bit optimizer saves 6 bytes per trainable parameter: --optimizer adamw-8bit")
    bigger = []
    for key, entry in gpus().items():
        if entry["memory_gib"] * (1 - safety_margin()) >= smallest.peak_gib and entry["memory_gib"] > hw.memory_gib:
            bigger.append((entry["memory_gib"], key))
    if bigger:
        out.append("a larger card: " + ", ".join(k for _, k in sorted(bigger)[:4]))
    else:
        out.append("no single card in the catalog holds it: data-parallel training replicates the model on "
                   "every GPU, so more cards do not help; it needs model sharding (FSDP), which `run` does not do")
    return out


def _estimate(arch: Architecture, c: Choice, hw: Hardware, req: PlanRequest, tokens_total: Optional[int],
              epochs: float) -> dict[str, Any]:
    shape = M.Shape(c.method, 0, c.micro_batch_size, req.seq_len, c.grad_checkpointing, req.loss)
    tps = M.tokens_per_second(arch, shape, hw.peak_bf16_tflops) if hw.gpu != "cpu" else None
    total_tps = tps * hw.num_gpus if tps else None
    out: dict[str, Any] = {
        "tokens_per_s_per_gpu": tps, "tokens_per_s": total_tps,
        "flops_per_token": M.flops_per_token(arch, shape),
        "mfu": M.coefficients()["throughput"]["mfu_" + c.method],
        "train_tokens": None, "hours": None,
        "basis": "MFU measured on the H200 calibration rows x the card's peak bf16 FLOP/s",
    }
    tokens = req.train_tokens if req.train_tokens else (int(tokens_total * epochs) if tokens_total else None)
    if tokens and total_tps:
        out["train_tokens"] = tokens
        out["hours"] = tokens / total_tps / 3600
    return out


def make_plan(req: PlanRequest) -> PlanResult:
    _validate(req)
    model = resolve_model(req.model, req.trust_remote_code)
    arch = model.arch
    hw, hw_note = resolve_hardware(req.gpu, req.gpu_memory, req.num_gpus)
    if hw.memory_gib <= 0:
        raise InputError("--gpu custom needs --gpu-memory (e.g. --gpu-memory 24GiB)")
    try:
        sel = select_targets(arch, req.targets)
    except ArchitectureError as exc:
        raise InputError(str(exc)) from None
    r = req.rank if req.rank is not None else int(_hp("rank"))
    widest = min(min(p.in_features, p.out_features) for p in sel.projections)
    if r > widest:
        raise InputError(f"--rank {r} is larger than the smallest adapted layer dimension ({widest}): a LoRA rank "
                         "beyond min(in, out) adds parameters without adding capacity")
    experts_targeted = bool(sel.target_parameters)
    dropout = req.dropout if req.dropout is not None else (0.0 if experts_targeted else float(_hp("dropout")))
    if experts_targeted and dropout > 0:
        raise InputError("peft cannot apply LoRA dropout to fused expert weights (target_parameters); "
                         "use --dropout 0 or leave the experts out of --targets")
    alpha = req.alpha if req.alpha is not None else 2 * r
    gbs = req.global_batch_size if req.global_batch_size is not None else int(_hp("global_batch_size"))
    if gbs % hw.num_gpus:
        raise InputError(f"--global-batch-size {gbs} is not divisible by {hw.num_gpus} GPUs")
    per_gpu_batch = gbs // hw.num_gpus
    if req.batch_size and per_gpu_batch % req.batch_size:
        raise InputError(f"--batch-size {req.batch_size} does not divide the per-GPU batch {per_gpu_batch} "
                         f"(global batch {gbs} over {hw.num_gpus} GPU(s))")
    ds = dataset_stats(req.dataset, req.seq_len) if req.dataset else None

    choice, smallest = choose(arch, sel, req, hw, r, per_gpu_batch, req.seq_len)
    feasible = choice is not None
    c = choice or smallest
    usable = hw.memory_gib * (1 - safety_margin())
    accum = per_gpu_batch // c.micro_batch_size
    dtype = _dtype(hw)
    epochs = req.epochs if req.epochs is not None else float(_hp("num_epochs"))
    if ds is not None and req.epochs is None and ds.rows < 5000:
        epochs = float(hyperparameters()["num_epochs"].get("small_dataset_value", 3))
    strategy = "cpu" if hw.gpu == "cpu" else ("ddp" if hw.num_gpus > 1 else "single")
    if hw.gpu == "cpu" and hw.num_gpus > 1:
        strategy = "ddp"
    reasons = _reasons(req, c, hw, gbs, per_gpu_batch, accum, usable)
    reasons.update(_hyper_reasons(req))
    if ds is not None and req.epochs is None and ds.rows < 5000:
        reasons["num_epochs"] = f"{epochs:g}: a small dataset ({ds.rows} rows) gains from more than one pass"
    reasons["strategy"] = {
        "single": "one GPU, in-process",
        "ddp": f"data-parallel over {hw.num_gpus} {'processes' if hw.gpu == 'cpu' else 'GPUs'} through accelerate's "
               "launcher: each holds a whole copy of the model",
        "cpu": "no GPU: trains on the CPU (for small models and tests)",
    }[strategy]
    if sel.note:
        reasons["targets"] = sel.note
    if experts_targeted and req.dropout is None:
        reasons["dropout"] = "0: peft cannot apply dropout to fused expert weights (target_parameters)"
    terms = c.terms
    est = _estimate(arch, c, hw, req, ds.tokens_total if ds else None, epochs)
    plan = Plan(
        model=model.ref,
        hardware=hw,
        method=c.method,
        quantization=Quantization(enabled=c.method == "qlora", quant_type="nf4", double_quant=True, blocksize=64,
                                  compute_dtype=dtype),
        lora=LoraSettings(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=sel.target_modules,
                          target_parameters=sel.target_parameters),
        training=Training(
            seq_len=req.seq_len, micro_batch_size=c.micro_batch_size, grad_accum_steps=accum, global_batch_size=gbs,
            grad_checkpointing=c.grad_checkpointing, optimizer=req.optimizer, loss=req.loss,
            learning_rate=req.learning_rate if req.learning_rate is not None else float(_hp("learning_rate")),
            num_epochs=epochs, max_steps=req.max_steps if req.max_steps else -1,
            warmup_ratio=float(_hp("warmup_ratio")), lr_scheduler=str(_hp("lr_scheduler")),
            weight_decay=float(_hp("weight_decay")), max_grad_norm=float(_hp("max_grad_norm")),
            dtype=dtype, attn_implementation=arch.attn_implementation,
        ),
        prediction=Prediction(per_gpu_gib=round(sum(t.bytes for t in terms) / GIB, 4),
                              terms={t.name: round(t.gib, 4) for t in terms}, margin=safety_margin(),
                              tokens_per_s=est["tokens_per_s"]),
        strategy=strategy,
        dataset=Dataset(path=req.dataset, format=ds.format if ds else "auto", rows=ds.rows if ds else None,
                        tokens_total=ds.tokens_total if ds else None,
                        mean_tokens_per_row=ds.mean_tokens if ds else None),
        output_dir=req.output_dir or "out",
        assumptions={
            "dtype": dtype,
            "attn_implementation": arch.attn_implementation,
            "loss": "fused LM head + cross-entropy in chunks (trl SFTTrainer)" if req.loss == "fused"
                    else "model's own loss over full logits upcast to fp32",
            "optimizer": {"adamw": "torch AdamW, fp32 states", "adamw-8bit": "bitsandbytes 8-bit AdamW",
                          "paged-adamw-8bit": "bitsandbytes paged 8-bit AdamW"}[req.optimizer],
            "quantization": "NF4, double quantization, blocksize 64; embeddings, lm_head, norms kept in "
                            f"{dtype}, not upcast" if c.method == "qlora" else "none",
            "lora_dtype": "fp32 adapter weights (peft default)",
            "memory_model": "fitted on H200 measurements; CUDA context as measured there",
        },
        reasons=reasons,
    )
    if arch.is_moe and c.method == "qlora":
        plan.assumptions["quantization"] += (f"; MoE expert weights stay in {dtype}: transformers' bitsandbytes "
                                             "integration does not quantize fused 3-D expert parameters")
    plan.validate()
    suggestions = [] if feasible else _suggest(arch, sel, req, hw, r, per_gpu_batch, smallest)
    fit_rows = fit_table(arch, sel, req, r, hw.num_gpus) if req.fit_table else []
    return PlanResult(plan, model, sel, trainable_params(sel, r), terms, feasible, usable, hw_note, suggestions,
                      fit_rows, ds, est)


def fit_table(arch: Architecture, sel: TargetSelection, req: PlanRequest, r: int, num_gpus: int) -> list[dict[str, Any]]:
    """The same request on every catalog card: what `plan` would decide there."""
    from .catalog import _hardware_from_entry

    rows = []
    gbs = req.global_batch_size if req.global_batch_size is not None else int(_hp("global_batch_size"))
    per_gpu = max(gbs // num_gpus, 1)
    for key, entry in gpus().items():
        hw = _hardware_from_entry(key, entry, num_gpus)
        choice, smallest = choose(arch, sel, req, hw, r, per_gpu, req.seq_len)
        c = choice or smallest
        est = _estimate(arch, c, hw, req, None, 1.0)
        rows.append({
            "gpu": key, "name": entry["name"], "memory_gib": hw.memory_gib, "fits": choice is not None,
            "method": c.method if choice else None, "micro_batch_size": c.micro_batch_size if choice else None,
            "grad_checkpointing": c.grad_checkpointing if choice else None,
            "per_gpu_gib": c.peak_gib, "headroom_gib": hw.memory_gib - c.peak_gib,
            "tokens_per_s": est["tokens_per_s"] if choice else None,
        })
    return rows


__all__ = ["PlanRequest", "PlanResult", "make_plan", "InputError", "fit_table"]
