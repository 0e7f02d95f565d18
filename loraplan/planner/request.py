"""What the user asked for (`PlanRequest`), checked, and resolved into everything the decision needs (`Resolved`).

`resolve(req)` is the one place where defaults are applied (from `planner.options`, i.e.
tables/hyperparameters.yaml) and derived values are computed: rank -> alpha, global batch -> per-GPU batch, the
compute dtype from the card, the strategy from the topology. `planner.decide` then works on a `Resolved` alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Union

from . import options as O
from . import savers as S
from .architecture import Architecture
from .catalog import ResolvedModel, resolve_hardware, resolve_model, resolve_topology
from .datasets import DatasetStats, dataset_stats
from .eval_set import check_eval_set
from .errors import ArchitectureError, InputError
from .plan import Hardware
from .strategies import STRATEGIES, STRATEGY_CHOICES, Strategy, strategy_for
from .targets import TargetSelection, select_targets

# Longest sequence a request may name: beyond any model's context and any card's memory, but still arithmetic
# that prints readable numbers (2**24 = 16.8M tokens).
MAX_SEQ_LEN = 2**24


@dataclass
class PlanRequest:
    """The `plan` command's options; None means "the default" (tables/hyperparameters.yaml) or "choose"."""

    model: str
    gpu: Optional[str] = None  # None: auto, or custom when gpu_memory is given (as the CLI)
    gpu_memory: Optional[str] = None
    num_gpus: Optional[int] = None  # per node
    num_nodes: Optional[int] = None
    network: Optional[str] = None  # between nodes: a tables/networks.yaml name or Gbit/s per node
    host_memory: Optional[str] = None  # RAM per node (default: this machine's with --gpu auto, else 2 x GPU memory)
    strategy: str = "auto"  # auto, or a key of planner.strategies.STRATEGIES
    method: str = field(default_factory=lambda: O.default("method"))  # options.METHOD_CHOICES
    rank: Optional[int] = None
    alpha: Optional[int] = None
    dropout: Optional[float] = None
    targets: Optional[str] = None
    seq_len: Union[int, str, None] = None  # or "max": the longest that fits; None: the default, or the model's context when shorter
    batch_size: Optional[int] = None  # fixed micro-batch; None: choose
    global_batch_size: Optional[int] = None
    grad_checkpointing: str = field(default_factory=lambda: O.default("gradient_checkpointing"))  # CHECKPOINTING_CHOICES
    optimizer: str = field(default_factory=lambda: O.default("optimizer"))  # options.OPTIMIZERS
    loss: str = field(default_factory=lambda: O.default("loss"))  # options.LOSSES
    dataset: Optional[str] = None
    eval_path: Optional[str] = None  # a held-out eval file (plan.dataset.eval_path)
    eval_fraction: Optional[float] = None  # or a share of --dataset held out for eval (plan.dataset.eval_fraction)
    output_dir: Optional[str] = None
    learning_rate: Optional[float] = None
    epochs: Optional[float] = None
    max_steps: Optional[int] = None
    train_tokens: Optional[int] = None  # for the time estimate when no dataset is given
    trust_remote_code: bool = False
    fit_table: bool = True
    savers: Optional[str] = None  # --savers: options.parse_savers; None: the defaults


SEQ_LEN_MAX = "max"


@dataclass
class Resolved:
    """Every input of the decision, resolved and checked: what `decide` and `estimate` read."""

    model: ResolvedModel
    selection: TargetSelection
    hardware: Hardware
    hardware_note: str
    strategy: Strategy  # the default for the hardware, or the one asked for; planner.placement may shard instead
    strategy_choice: str  # "auto" or the --strategy asked for
    host_memory_assumed: bool  # host memory from the sizing rule (no --host-memory, not detected)
    rank: int
    alpha: int
    dropout: float
    dtype: str
    seq_len: int
    global_batch_size: int
    per_gpu_batch: int
    method: str  # auto | lora | qlora, as asked
    grad_checkpointing: str  # auto | on | off, as asked
    batch_size: Optional[int]  # a fixed micro-batch, or None to choose
    optimizer: str
    loss: str
    learning_rate: float
    epochs: float
    epochs_reason: Optional[str]  # why the epochs differ from the default, when they do
    max_steps: Optional[int]
    train_tokens: Optional[int]
    dataset: Optional[DatasetStats]
    # memory savers (planner/savers.py): each saver's mode (auto | on | off), and the host they may pin memory on
    savers: dict[str, str] = field(default_factory=lambda: O.saver_defaults())
    host_memory_gib: float = 0.0
    host_note: str = ""
    seq_len_max: bool = False  # --seq-len max: seq_len is the longest that fits (planner.context_length.longest_seq_len)
    seq_len_limit: int = MAX_SEQ_LEN  # the longest --seq-len max considers: the model's context when known
    default_notes: dict[str, str] = field(default_factory=dict)  # a default fitted to the request: key -> why
    eval_path: Optional[str] = None  # absolute, checked by the dataset reader
    eval_fraction: float = 0.0

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    @property
    def usable_gib(self) -> float:
        """The card's memory less the safety margin: what a plan may use."""
        from .memory import coefficients

        return self.hardware.memory_gib * (1 - coefficients().decision.safety_margin)

    @property
    def usable_host_gib(self) -> float:
        """Pinned host memory a plan may take: the host's RAM times the share in tables/savers.yaml."""
        return self.host_memory_gib * S.host_pinned_share()

    @property
    def host_processes(self) -> int:
        """Training processes that share the host's RAM (one per GPU under data parallelism)."""
        return self.hardware.num_gpus if self.strategy.data_parallel else 1

    @property
    def uses_savers(self) -> bool:
        return any(m != "off" for m in self.savers.values())


def _positive(name: str, value, *, integer: bool = False, allow_zero: bool = False) -> None:
    if value is None:
        return
    bad = not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    if not bad:
        bad = value < 0 if allow_zero else value <= 0
    if bad:
        kind = "a positive integer" if integer else "a positive finite number"
        raise InputError(f"{name} must be {kind}, got {value}")


def validate(req: PlanRequest) -> None:
    """One-line InputErrors for options that no plan can be built from."""
    if req.seq_len is None:
        pass  # the default (resolve: the model's context when shorter)
    elif isinstance(req.seq_len, str):
        if req.seq_len.strip().lower() != SEQ_LEN_MAX:
            raise InputError(f"--seq-len must be a positive number of tokens or max, got {req.seq_len!r}")
    else:
        _positive("--seq-len", req.seq_len, integer=True)
        if req.seq_len > MAX_SEQ_LEN:
            raise InputError(f"--seq-len {req.seq_len} is beyond any model's context; at most {MAX_SEQ_LEN:,} tokens")
    for name, value in (("--rank", req.rank), ("--batch-size", req.batch_size),
                        ("--global-batch-size", req.global_batch_size), ("--num-gpus", req.num_gpus),
                        ("--max-steps", req.max_steps), ("--train-tokens", req.train_tokens)):
        _positive(name, value, integer=True)
    for name, value in (("--alpha", req.alpha), ("--epochs", req.epochs), ("--learning-rate", req.learning_rate)):
        _positive(name, value)
    if req.dropout is not None and not (math.isfinite(req.dropout) and 0.0 <= req.dropout < 1.0):
        raise InputError(f"--dropout must be in [0, 1), got {req.dropout}")
    O.check_choice("--method", req.method, O.METHOD_CHOICES, InputError)
    O.check_choice("--grad-checkpointing", req.grad_checkpointing, O.CHECKPOINTING_CHOICES, InputError)
    O.check_choice("--optimizer", req.optimizer, tuple(O.OPTIMIZERS), InputError)
    O.check_choice("--loss", req.loss, O.LOSSES, InputError)
    O.parse_savers(req.savers, error=InputError)


def _savers(req: PlanRequest, arch: Architecture, hw: Hardware, seq_len_max: bool) -> dict[str, str]:
    """Each saver's mode, checked against the model, the card and the other options (one-line InputErrors)."""
    modes = O.parse_savers(req.savers, seq_len_max, error=InputError)
    on = [n for n, m in modes.items() if m == "on"]
    for name in on:
        why = S.SAVERS[name].applies(arch, hw)
        if why:
            raise InputError(f"--savers {S.cli_name(name)}=on: {why}")
    clash = S.conflict(on)
    if clash:
        raise InputError(f"--savers: {clash}")
    ckpt = [n for n in on if S.SAVERS[n].needs_checkpointing]
    if ckpt and req.grad_checkpointing == "off":
        raise InputError(f"--savers {S.cli_name(ckpt[0])}=on needs gradient checkpointing, which "
                         "--grad-checkpointing off forbids")
    return modes


def with_seq_len(r: Resolved, seq_len: int) -> Resolved:
    """The resolved request at another sequence length (the dataset's statistics recounted at that cap)."""
    ds = r.dataset
    if ds is not None:
        ds = dataset_stats(ds.path, seq_len, tokenizer_dir=r.model.ref.path)
    return dataclasses.replace(r, seq_len=seq_len, dataset=ds)


def compute_dtype(hw: Hardware) -> str:
    """fp32 on the CPU, bf16 on cards that have it, else fp16 (T4, V100)."""
    if hw.gpu == "cpu":
        return "float32"
    return "bfloat16" if hw.bf16 else "float16"


def _adapter(arch: Architecture, req: PlanRequest) -> tuple[TargetSelection, int, int, float]:
    """(targets, rank, alpha, dropout), checked against the architecture."""
    try:
        sel = select_targets(arch, req.targets)
    except ArchitectureError as exc:
        raise InputError(str(exc)) from None
    r = req.rank if req.rank is not None else int(O.default("rank"))
    widest = min(min(p.in_features, p.out_features) for p in sel.projections)
    if r > widest:
        raise InputError(f"--rank {r} is larger than the smallest adapted layer dimension ({widest}): a LoRA rank "
                         "beyond min(in, out) adds parameters without adding capacity")
    experts_targeted = bool(sel.target_parameters)
    dropout = req.dropout if req.dropout is not None else (0.0 if experts_targeted else float(O.default("dropout")))
    if experts_targeted and dropout > 0:
        raise InputError("peft cannot apply LoRA dropout to fused expert weights (target_parameters); "
                         "use --dropout 0 or leave the experts out of --targets")
    alpha = req.alpha if req.alpha is not None else int(O.setting("alpha", "per_rank") * r)
    return sel, r, alpha, dropout


def _strategy(req: PlanRequest, hw: Hardware) -> Strategy:
    """The strategy asked for, checked against the topology; else the hardware's default."""
    O.check_choice("--strategy", req.strategy, STRATEGY_CHOICES, InputError)  # the table's names: checked here
    if req.strategy == "auto":
        return strategy_for(hw)
    s = STRATEGIES[req.strategy]
    unusable = s.unusable_on(hw)
    if unusable:
        raise InputError(unusable)
    methods = O.METHODS if req.method == "auto" else (req.method,)
    broken = [s.refuses(m, req.optimizer) for m in methods]
    if all(broken):  # every method the request allows is a combination the stack breaks
        raise InputError(broken[-1])
    return s


def _epochs(req: PlanRequest, ds: Optional[DatasetStats]) -> tuple[float, Optional[str]]:
    if req.epochs is not None:
        return req.epochs, None
    small_rows = int(O.setting("num_epochs", "small_dataset_rows"))
    if ds is not None and ds.rows < small_rows:
        epochs = float(O.setting("num_epochs", "small_dataset_value"))
        return epochs, f"{epochs:g}: a small dataset ({ds.rows} rows, under {small_rows:,}) gains from more than one pass"
    return float(O.default("num_epochs")), None


def _named_method(req: PlanRequest, model: ResolvedModel) -> str:
    """The method a model's weights impose (pre-quantized 4-bit repos: qlora), against --method."""
    if req.method != "auto":
        raise InputError(f"--method {req.method}: {model.ref.name} holds 4-bit weights, so only {model.method} "
                         "trains on it; name the unquantized repository for LoRA")
    return model.method


def resolve(req: PlanRequest) -> Resolved:
    """Check the request and resolve the model, card, adapter, batch and dataset (InputError on bad input)."""
    validate(req)
    model = resolve_model(req.model, req.trust_remote_code)
    method = req.method if model.method is None or req.method == model.method else _named_method(req, model)
    hw, hw_note = resolve_hardware(req.gpu, req.gpu_memory, req.num_gpus)
    if hw.memory_gib <= 0:
        raise InputError("--gpu custom needs --gpu-memory (e.g. --gpu-memory 24GiB)")
    notes = [hw_note] if hw_note else []
    detected = (req.gpu or ("custom" if req.gpu_memory else "auto")).strip().lower() == "auto"
    topology = resolve_topology(hw, req.num_nodes, req.network, req.host_memory, detected=detected)
    notes += topology.notes
    sel, r, alpha, dropout = _adapter(model.arch, req)
    strategy = _strategy(dataclasses.replace(req, method=method), hw)
    ways = hw.world_size if strategy.data_parallel else 1
    defaults: dict[str, str] = {}  # defaults fitted to the request, with why
    gbs = req.global_batch_size
    if gbs is None:  # the default, rounded up to a multiple of the world so that it divides
        default_gbs = int(O.default("global_batch_size"))
        gbs = -(-default_gbs // ways) * ways
        if gbs != default_gbs:
            defaults["global_batch_size"] = (f"global batch {gbs}: the default {default_gbs} rounded up to a multiple of "
                                              f"the {ways} GPUs (--global-batch-size)")
    if gbs % ways:
        raise InputError(f"--global-batch-size {gbs} is not divisible by {hw.world_size} GPUs")
    per_gpu_batch = gbs // ways
    if req.batch_size and per_gpu_batch % req.batch_size:
        raise InputError(f"--batch-size {req.batch_size} does not divide the per-GPU batch {per_gpu_batch} "
                         f"(global batch {gbs} over {ways} GPU(s))")
    seq_len_max = isinstance(req.seq_len, str)
    context = model.arch.config.get("max_position_embeddings")
    limit = min(MAX_SEQ_LEN, context) if isinstance(context, int) and context >= O.SEQ_LEN_STEP else MAX_SEQ_LEN
    limit -= limit % O.SEQ_LEN_STEP
    seq_len = limit if seq_len_max else req.seq_len  # --seq-len max: planner.api searches below the limit
    if seq_len is None:
        seq_len = int(O.default("seq_len"))
        if isinstance(context, int) and 0 < context < seq_len:
            defaults["seq_len"] = (f"{context:,}: the model's context (max_position_embeddings), shorter than the "
                                   f"default {seq_len:,}")
            seq_len = context
    savers = _savers(req, model.arch, hw, seq_len_max)
    dataset = os.path.abspath(os.path.expanduser(req.dataset)) if req.dataset else None
    # the model's own tokenizer.json counts the tokens when the model is a local folder (else 4 chars per token)
    ds = dataset_stats(dataset, seq_len, tokenizer_dir=model.ref.path) if dataset else None
    epochs, epochs_reason = _epochs(req, ds)
    eval_path, eval_fraction = check_eval_set(req.eval_path, req.eval_fraction, ds.format if ds else None)
    return Resolved(
        model=model, selection=sel, hardware=hw, hardware_note="; ".join(notes), strategy=strategy,
        strategy_choice=req.strategy, host_memory_assumed=topology.host_assumed,
        rank=r, alpha=alpha,
        dropout=dropout, dtype=compute_dtype(hw), seq_len=seq_len, global_batch_size=gbs,
        per_gpu_batch=per_gpu_batch, method=method, grad_checkpointing=req.grad_checkpointing,
        batch_size=req.batch_size, optimizer=req.optimizer, loss=req.loss,
        learning_rate=req.learning_rate if req.learning_rate is not None else float(O.default("learning_rate")),
        epochs=epochs, epochs_reason=epochs_reason, max_steps=req.max_steps, train_tokens=req.train_tokens,
        dataset=ds, savers=savers, host_memory_gib=hw.host_memory_gib or 0.0, host_note=topology.host_note,
        seq_len_max=seq_len_max,
        seq_len_limit=limit, default_notes=defaults, eval_path=eval_path, eval_fraction=eval_fraction,
    )
