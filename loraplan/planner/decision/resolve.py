"""A checked request resolved into everything the decision needs (`Resolved`).

`resolve(req)` is the one place where defaults are applied (from planner.facts.options, i.e.
tables/hyperparameters.yaml) and derived values are computed: rank -> alpha, global batch -> per-GPU batch, the
compute dtype from the card, the strategy from the topology. planner.decision.rules then works on a `Resolved` alone.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional

from ..architecture.model_source import ResolvedModel, resolve_model
from ..architecture.targets import TargetSelection, select_targets
from ..architecture.types import Architecture
from ..errors import ArchitectureError, InputError
from ..facts import options
from ..facts.dataset_stats import DatasetStats, dataset_stats
from ..facts.eval_set import check_eval_set
from ..facts.hardware import Hardware, resolve_hardware, resolve_topology
from ..facts.request import MAX_SEQ_LEN, PlanRequest, validate
from ..memory.terms import coefficients
from ..plugins import savers as saver_table
from ..plugins.backends import BACKENDS, Backend
from ..plugins.strategies import STRATEGIES, STRATEGY_CHOICES, Strategy, strategy_for


@dataclass
class Resolved:
    """Every input of the decision, resolved and checked: what `decide` and `estimate` read."""

    model: ResolvedModel
    selection: TargetSelection
    hardware: Hardware
    hardware_note: str
    strategy: Strategy  # the default for the hardware, or the one asked for; planner.decision.placement may shard instead
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
    # memory savers (planner/plugins/savers.py): each saver's mode (auto | on | off), and the host they may pin memory on
    savers: dict[str, str] = field(default_factory=lambda: options.saver_defaults())
    host_note: str = ""
    seq_len_max: bool = False  # --seq-len max: seq_len is the longest that fits (planner.decision.context_length.longest_seq_len)
    seq_len_limit: int = MAX_SEQ_LEN  # the longest --seq-len max considers: the model's context when known
    default_notes: dict[str, str] = field(default_factory=dict)  # a default fitted to the request: key -> why
    eval_path: Optional[str] = None  # absolute, checked by the dataset reader
    eval_fraction: float = 0.0
    backend: str = "hf"  # planner.plugins.backends.BACKENDS: its memory terms and host terms (planner.decision.rules)

    @property
    def arch(self) -> Architecture:
        return self.model.arch

    @property
    def usable_gib(self) -> float:
        """The card's memory less the safety margin: what a plan may use."""
        return self.hardware.memory_gib * (1 - coefficients().decision.safety_margin)

    @property
    def host_memory_gib(self) -> float:
        """RAM per node: the hardware's, read there (no copy that a change of card would leave stale)."""
        return self.hardware.host_memory_gib or 0.0

    @property
    def usable_host_gib(self) -> float:
        """Pinned host memory a plan may take: the host's RAM times the share in tables/savers.yaml."""
        return self.host_memory_gib * saver_table.host_pinned_share()

    @property
    def host_processes(self) -> int:
        """Training processes that share the host's RAM (one per GPU under data parallelism)."""
        return self.hardware.num_gpus if self.strategy.data_parallel else 1

    @property
    def uses_savers(self) -> bool:
        return any(m != "off" for m in self.savers.values())


def _savers(req: PlanRequest, arch: Architecture, hw: Hardware, seq_len_max: bool) -> dict[str, str]:
    """Each saver's mode, checked against the model, the card and the other options (one-line InputErrors)."""
    modes = options.parse_savers(req.savers, seq_len_max, error=InputError)
    on = [n for n, m in modes.items() if m == "on"]
    for name in on:
        why = saver_table.SAVERS[name].applies(arch, hw)
        if why:
            raise InputError(f"--savers {saver_table.cli_name(name)}=on: {why}")
    clash = saver_table.conflict(on)
    if clash:
        raise InputError(f"--savers: {clash}")
    ckpt = [n for n in on if saver_table.SAVERS[n].needs_checkpointing]
    if ckpt and req.grad_checkpointing == "off":
        raise InputError(f"--savers {saver_table.cli_name(ckpt[0])}=on needs gradient checkpointing, which "
                         "--grad-checkpointing off forbids")
    return modes


def _backend(req: PlanRequest, arch: Architecture, sel: TargetSelection, strategy: Strategy,
             savers: dict[str, str]) -> Backend:
    """The training backend asked for, checked against the model, the adapter, the strategy and the savers forced
    on (one-line InputErrors); the savers it refuses that were left to choose are turned off in `savers`."""
    options.check_choice("--backend", req.backend, tuple(BACKENDS), InputError)
    backend = BACKENDS[req.backend]
    why = backend.refuses_model(arch)
    if why:
        raise InputError(f"--backend {backend.name}: {why}")
    if sel.target_parameters and not backend.takes_target_parameters:
        raise InputError(f"--backend {backend.name} adapts modules only, not parameters ({', '.join(sel.target_parameters)}): "
                         "leave the experts out of --targets, or use --backend hf")
    if req.strategy != "auto":
        why = backend.refuses(strategy.name, "lora", frozenset())
        if why:
            raise InputError(f"--backend {backend.name}: {why}")
    for name, mode in list(savers.items()):
        why = backend.refuses(strategy.name, "lora", frozenset([name]))  # the strategy passed above
        if why and mode == "on":
            raise InputError(f"--backend {backend.name}: {why}")
        if why:
            savers[name] = "off"
    return backend


def with_seq_len(r: Resolved, seq_len: int, recount: bool = True) -> Resolved:
    """The resolved request at another sequence length (the dataset's statistics recounted at that cap, unless
    `recount` is False: the fit table, whose rows read none of them)."""
    ds = r.dataset
    if ds is not None and recount:
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
    r = req.rank if req.rank is not None else int(options.default("rank"))
    widest = min(min(p.in_features, p.out_features) for p in sel.projections)
    if r > widest:
        raise InputError(f"--rank {r} is larger than the smallest adapted layer dimension ({widest}): a LoRA rank "
                         "beyond min(in, out) adds parameters without adding capacity")
    experts_targeted = bool(sel.target_parameters)
    dropout = req.dropout if req.dropout is not None else (0.0 if experts_targeted else float(options.default("dropout")))
    if experts_targeted and dropout > 0:
        raise InputError("peft cannot apply LoRA dropout to fused expert weights (target_parameters); "
                         "use --dropout 0 or leave the experts out of --targets")
    alpha = req.alpha if req.alpha is not None else int(options.setting("alpha", "per_rank") * r)
    return sel, r, alpha, dropout


def _strategy(req: PlanRequest, hw: Hardware) -> Strategy:
    """The strategy asked for, checked against the topology; else the hardware's default."""
    options.check_choice("--strategy", req.strategy, STRATEGY_CHOICES, InputError)  # the table's names: checked here
    if req.strategy == "auto":
        return strategy_for(hw)
    s = STRATEGIES[req.strategy]
    unusable = s.unusable_on(hw)
    if unusable:
        raise InputError(unusable)
    methods = options.METHODS if req.method == "auto" else (req.method,)
    broken = [s.refuses(m, req.optimizer) for m in methods]
    if all(broken):  # every method the request allows is a combination the stack breaks
        raise InputError(broken[-1])
    return s


def _epochs(req: PlanRequest, ds: Optional[DatasetStats]) -> tuple[float, Optional[str]]:
    if req.epochs is not None:
        return req.epochs, None
    small_rows = int(options.setting("num_epochs", "small_dataset_rows"))
    if ds is not None and ds.rows < small_rows:
        epochs = float(options.setting("num_epochs", "small_dataset_value"))
        return epochs, f"{epochs:g}: a small dataset ({ds.rows} rows, under {small_rows:,}) gains from more than one pass"
    return float(options.default("num_epochs")), None


def _named_method(req: PlanRequest, model: ResolvedModel) -> str:
    """The method a model's weights impose (pre-quantized 4-bit repos: qlora), against --method."""
    if req.method != "auto":
        raise InputError(f"--method {req.method}: {model.ref.name} holds 4-bit weights, so only {model.method} "
                         "trains on it; name the unquantized repository for LoRA")
    return model.method


def resolve(req: PlanRequest, known: Optional[Resolved] = None) -> Resolved:
    """Check the request and resolve the model, card, adapter, batch and dataset (InputError on bad input).
    `known`: the same request already resolved on another card (planner.decision.fit_table); its model and dataset
    statistics are taken as they are rather than read again."""
    validate(req)
    model = known.model if known is not None else resolve_model(req.model, req.trust_remote_code)
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
    ways = strategy.batch_ways(hw)
    defaults: dict[str, str] = {}  # defaults fitted to the request, with why
    gbs = req.global_batch_size
    if gbs is None:  # the default, rounded up to a multiple of the world so that it divides
        default_gbs = int(options.default("global_batch_size"))
        gbs = -(-default_gbs // ways) * ways
        if gbs != default_gbs:
            defaults["global_batch_size"] = (f"global batch {gbs}: the default {default_gbs} rounded up to a multiple of "
                                              f"the {ways} GPUs (--global-batch-size)")
    if gbs % ways:
        raise InputError(f"--global-batch-size {gbs} is not divisible by {hw.world_size} GPUs")
    per_gpu_batch = strategy.per_gpu_batch(gbs, hw)
    if req.batch_size and per_gpu_batch % req.batch_size:
        raise InputError(f"--batch-size {req.batch_size} does not divide the per-GPU batch {per_gpu_batch} "
                         f"(global batch {gbs} over {ways} GPU(s))")
    seq_len_max = isinstance(req.seq_len, str)
    context = model.arch.config.get("max_position_embeddings")
    limit = min(MAX_SEQ_LEN, context) if isinstance(context, int) and context >= options.SEQ_LEN_STEP else MAX_SEQ_LEN
    limit -= limit % options.SEQ_LEN_STEP
    seq_len = limit if seq_len_max else req.seq_len  # --seq-len max: planner.api searches below the limit
    if seq_len is None:
        seq_len = int(options.default("seq_len"))
        if isinstance(context, int) and 0 < context < seq_len:
            defaults["seq_len"] = (f"{context:,}: the model's context (max_position_embeddings), shorter than the "
                                   f"default {seq_len:,}")
            seq_len = context
    savers = _savers(req, model.arch, hw, seq_len_max)
    backend = _backend(req, model.arch, sel, strategy, savers)
    for key, value in backend.defaults.items():  # the backend's settings where the user chose none
        if key == "lora.lora_dropout" and req.dropout is None and dropout != value:
            defaults["lora_dropout"] = (f"dropout {value:g}: the {backend.name} backend's default (--dropout)")
            dropout = float(value)
    dataset = os.path.abspath(os.path.expanduser(req.dataset)) if req.dataset else None
    # the model's own tokenizer.json counts the tokens when the model is a local folder (else 4 chars per token)
    if known is not None and known.seq_len == seq_len:
        ds = known.dataset
    else:
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
        learning_rate=req.learning_rate if req.learning_rate is not None else float(options.default("learning_rate")),
        epochs=epochs, epochs_reason=epochs_reason, max_steps=req.max_steps, train_tokens=req.train_tokens,
        dataset=ds, savers=savers, host_note=topology.host_note,
        seq_len_max=seq_len_max,
        seq_len_limit=limit, default_notes=defaults, eval_path=eval_path, eval_fraction=eval_fraction,
        backend=backend.name,
    )
