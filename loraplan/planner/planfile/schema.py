"""The plan: a plain, versioned data structure that `plan` writes and `run` executes.

Everything `run` does is decided here; `run` does not re-decide. A plan round-trips losslessly through
YAML and JSON (`Plan.from_dict(plan.to_dict()) == plan`). This module holds the schema and its checks; reading,
typed rebuilding and atomic writing of files are planner.planfile.io.

Version history:
- 1: first schema (the `savers` section, `training.report_to` and `training.backend` came later, with defaults:
  files without them load unchanged; without `training.backend` a plan trains with "hf", planner.plugins.backends).
- 2: `savers.on` lists the savers on by name, instead of one boolean per saver; a version-1 file loads, its
  booleans read as names (Savers.upgrade).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import PlanError
from ..facts import options
from ..facts.hardware import Hardware
from ..facts.model_ref import ModelRef
from ..plugins.backends import BACKENDS, DEFAULT_BACKEND, backend_refusal
from ..plugins.savers import SAVERS, conflict, host_pinned_share
from ..plugins.strategies import STRATEGIES
from .io import atomic_write_text, build_dataclass, numbers_in, read_plan_file

PLAN_VERSION = 2


SUPPORTED_VERSIONS = (1, 2)


MAX_SEQ_LEN = options.MAX_SEQ_LEN  # planner.facts.options: the one definition


@dataclass
class Quantization:
    """bitsandbytes 4-bit settings; `enabled` is False for plain LoRA."""

    enabled: bool = False
    quant_type: str = field(default_factory=lambda: options.default("quantization"))
    double_quant: bool = field(default_factory=lambda: options.default("double_quantization"))
    blocksize: int = field(default_factory=lambda: options.default("quant_blocksize"))
    compute_dtype: str = field(default_factory=lambda: options.default("compute_dtype"))


@dataclass
class LoraSettings:
    """Mirrors peft.LoraConfig's fields of the same names."""

    r: int = field(default_factory=lambda: options.default("rank"))
    lora_alpha: int = field(default_factory=lambda: options.default("alpha"))
    lora_dropout: float = field(default_factory=lambda: options.default("dropout"))
    target_modules: list[str] = field(default_factory=list)
    # peft's target_parameters: fused 3-D expert weights of MoE models in transformers >= 5
    # (e.g. "mlp.experts.gate_up_proj"), which are nn.Parameters, not nn.Linear modules.
    target_parameters: list[str] = field(default_factory=list)
    bias: str = field(default_factory=lambda: options.default("bias"))
    task_type: str = "CAUSAL_LM"


@dataclass
class Training:
    seq_len: int = field(default_factory=lambda: options.default("seq_len"))
    micro_batch_size: int = 1
    grad_accum_steps: int = field(default_factory=lambda: options.default("global_batch_size"))
    global_batch_size: int = field(default_factory=lambda: options.default("global_batch_size"))
    grad_checkpointing: bool = False
    optimizer: str = field(default_factory=lambda: options.default("optimizer"))  # planner.facts.options.OPTIMIZERS
    loss: str = field(default_factory=lambda: options.default("loss"))  # fused (trl's chunked LM head + CE) | full (materialized fp32 logits)
    learning_rate: float = field(default_factory=lambda: options.default("learning_rate"))
    num_epochs: float = field(default_factory=lambda: float(options.default("num_epochs")))
    max_steps: int = -1  # > 0 overrides num_epochs
    warmup_ratio: float = field(default_factory=lambda: options.default("warmup_ratio"))
    lr_scheduler: str = field(default_factory=lambda: options.default("lr_scheduler"))
    weight_decay: float = field(default_factory=lambda: options.default("weight_decay"))
    max_grad_norm: float = field(default_factory=lambda: options.default("max_grad_norm"))
    seed: int = field(default_factory=lambda: options.default("seed"))
    logging_steps: int = field(default_factory=lambda: options.default("logging_steps"))
    save_steps: int = field(default_factory=lambda: options.default("save_steps"))
    save_total_limit: int = field(default_factory=lambda: options.default("save_total_limit"))
    packing: bool = False
    dtype: str = field(default_factory=lambda: options.default("compute_dtype"))  # compute dtype of the base model: bfloat16, or float16 on cards without bf16
    attn_implementation: str = "sdpa"
    report_to: str = field(default_factory=lambda: options.default("report_to"))  # options.TRACKERS; older plans: none
    backend: str = DEFAULT_BACKEND  # the training backend (planner.plugins.backends.BACKENDS; executor/backends/<name>.py)


@dataclass
class Distributed:
    """How a sharded plan (strategy fsdp or fsdp-offload) runs under accelerate's FSDP plugin; unused otherwise.

    Field names follow accelerate's FullyShardedDataParallelPlugin / `accelerate config` so the generated
    accelerate_config.yaml reads the same."""

    fsdp_version: int = 2  # torch FSDP2 (`fully_shard`)
    offload_params: bool = False  # FSDP2 CPUOffloadPolicy: sharded parameters, gradients and optimizer states on the host
    cpu_ram_efficient_loading: bool = True  # rank 0 loads the weights into host memory, the others on meta (not for 4-bit)
    reshard_after_forward: bool = True  # free each layer's gathered weights after its forward (FULL_SHARD)
    wrap_class: Optional[str] = None  # decoder layer class to wrap (e.g. LlamaDecoderLayer); None: the model's _no_split_modules
    quant_storage: Optional[str] = None  # QLoRA: bnb_4bit_quant_storage, = training.dtype so FSDP can shard the 4-bit weights


@dataclass
class Savers:
    """The memory savers `run` applies (planner/plugins/savers.py; docs/plan-json.md): the names of those on, and
    layer_checkpointing's setting. None by default, so a plan written before savers existed loads unchanged and
    trains as it did."""

    on: list[str] = field(default_factory=list)  # keys of planner.plugins.savers.SAVERS, in the table's order
    every_n_layers: int = 1  # layer_checkpointing: checkpoint every n-th decoder layer (1: every layer)
    pinned_host_gib: float = 0.0  # predicted pinned host memory on the machine (all its processes)
    host_memory_gib: Optional[float] = None  # the host RAM the plan was checked against

    @property
    def names(self) -> list[str]:
        return [n for n in options.SAVERS if n in self.on]

    @staticmethod
    def upgrade(data: dict) -> dict:
        """A version-1 savers section (one boolean per saver) as this one: the names of those set true."""
        if not isinstance(data, dict) or not any(k in data for k in _V1_SAVER_FLAGS):
            return data
        data = dict(data)
        on = [n for n in _V1_SAVER_FLAGS if data.pop(n, False)]
        if isinstance(data.get("every_n_layers"), int) and data["every_n_layers"] > 1:
            on.insert(0, "layer_checkpointing")
        return {**data, "on": list(data.get("on") or []) + on}


# the booleans a version-1 plan file's savers section held, one per saver
_V1_SAVER_FLAGS = ("offload_checkpoints", "offload_activations", "mlp_tiling", "padding_free")


@dataclass
class Dataset:
    path: Optional[str] = None
    format: str = "auto"  # options.DATASET_FORMATS
    eval_path: Optional[str] = None
    eval_fraction: float = 0.0
    rows: Optional[int] = None
    tokens_total: Optional[int] = None  # estimated training tokens per epoch
    mean_tokens_per_row: Optional[float] = None


@dataclass
class Prediction:
    per_gpu_gib: float
    terms: dict[str, float]  # name -> GiB, summing to per_gpu_gib
    margin: float  # the safety margin the decision kept free, as a fraction of card memory
    tokens_per_s: Optional[float] = None


@dataclass
class Plan:
    model: ModelRef
    hardware: Hardware
    method: str  # options.METHODS
    quantization: Quantization
    lora: LoraSettings
    training: Training
    prediction: Prediction
    strategy: str = "single"  # a key of planner.plugins.strategies.STRATEGIES
    dataset: Dataset = field(default_factory=Dataset)
    distributed: Distributed = field(default_factory=Distributed)
    savers: Savers = field(default_factory=Savers)
    output_dir: str = "out"
    assumptions: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a sequence beyond the model's context
    version: int = PLAN_VERSION

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        if not isinstance(data, dict):
            raise PlanError("plan must be a mapping at the top level")
        if "version" not in data:
            raise PlanError("the plan has no version field: truncated, or not a loraplan plan")
        version = data.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise PlanError(
                f"unknown plan version {version!r} (this loraplan reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        if version == 1 and "savers" in data:
            data = {**data, "savers": Savers.upgrade(data["savers"])}
        plan = build_dataclass(cls, {**data, "version": PLAN_VERSION}, "plan")
        plan.validate()
        return plan

    def validate(self) -> None:
        """Reject a plan whose fields contradict each other (e.g. edited by hand into inconsistency)."""
        t = self.training
        options.check_choice("method", self.method, options.METHODS, PlanError)
        if (self.method == "qlora") != self.quantization.enabled:
            raise PlanError(f"method {self.method} contradicts quantization.enabled={self.quantization.enabled}")
        options.check_choice("strategy", self.strategy, tuple(STRATEGIES), PlanError)
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "global_batch_size"):
            if getattr(t, name) < 1:
                raise PlanError(f"training.{name} must be at least 1, got {getattr(t, name)}")
        if self.hardware.num_gpus < 1:
            raise PlanError(f"hardware.num_gpus must be at least 1, got {self.hardware.num_gpus}")
        if self.hardware.num_nodes < 1:
            raise PlanError(f"hardware.num_nodes must be at least 1, got {self.hardware.num_nodes}")
        if self.hardware.num_nodes > 1 and not STRATEGIES[self.strategy].multi_node:
            raise PlanError(f"strategy {self.strategy} runs on one node; hardware.num_nodes is {self.hardware.num_nodes}")
        data_parallel = STRATEGIES[self.strategy].batch_ways(self.hardware)
        if t.micro_batch_size * t.grad_accum_steps * data_parallel != t.global_batch_size:
            raise PlanError(
                f"training.global_batch_size {t.global_batch_size} != micro_batch_size {t.micro_batch_size}"
                f" x grad_accum_steps {t.grad_accum_steps} x {data_parallel} GPU(s)"
            )
        if self.lora.r < 1:
            raise PlanError(f"lora.r must be positive, got {self.lora.r}")
        if not self.lora.target_modules and not self.lora.target_parameters:
            raise PlanError("lora.target_modules and lora.target_parameters are both empty")
        if not 0.0 <= self.lora.lora_dropout < 1.0:
            raise PlanError(f"lora.lora_dropout must be in [0, 1), got {self.lora.lora_dropout}")
        options.check_choice("training.optimizer", t.optimizer, tuple(options.OPTIMIZERS), PlanError)
        options.check_choice("training.loss", t.loss, options.LOSSES, PlanError)
        options.check_choice("training.dtype", t.dtype, options.DTYPES, PlanError)
        options.check_choice("dataset.format", self.dataset.format, options.DATASET_FORMATS, PlanError)
        options.check_choice("training.report_to", t.report_to, options.TRACKERS, PlanError)
        self._check_backend()
        self._check_choices()
        if self.quantization.enabled and self.quantization.compute_dtype != t.dtype:
            raise PlanError(
                f"quantization.compute_dtype {self.quantization.compute_dtype} != training.dtype {t.dtype}"
            )
        self._check_savers()
        self._check_numbers()

    def _check_backend(self) -> None:
        options.check_choice("training.backend", self.training.backend, tuple(BACKENDS), PlanError)
        why = backend_refusal(self.training.backend, self.strategy, self.method, self.savers.names)
        if why:
            raise PlanError(why)

    def _check_choices(self) -> None:
        """Every other string field with a fixed set of values, each against its one definition (planner.options)."""
        t, q, d = self.training, self.quantization, self.distributed
        choices = [
            ("training.lr_scheduler", t.lr_scheduler, options.LR_SCHEDULERS),
            ("training.attn_implementation", t.attn_implementation, options.ATTN_IMPLEMENTATIONS),
            ("lora.task_type", self.lora.task_type, options.TASK_TYPES),
            ("lora.bias", self.lora.bias, options.LORA_BIASES),
            ("quantization.quant_type", q.quant_type, options.QUANT_TYPES),
            ("quantization.compute_dtype", q.compute_dtype, options.DTYPES),
            ("model.source", self.model.source, options.MODEL_SOURCES),
        ]
        if d.quant_storage is not None:
            choices.append(("distributed.quant_storage", d.quant_storage, options.DTYPES))
        for what, value, allowed in choices:
            options.check_choice(what, value, allowed, PlanError)
        for what, value in (("model.name", self.model.name), ("model.family", self.model.family),
                            ("hardware.gpu", self.hardware.gpu), ("hardware.gpu_name", self.hardware.gpu_name)):
            if not isinstance(value, str) or not value.strip():
                raise PlanError(f"{what} must be a non-empty string, got {value!r}")
        for what, names in (("lora.target_modules", self.lora.target_modules),
                            ("lora.target_parameters", self.lora.target_parameters)):
            if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
                raise PlanError(f"{what} must be a list of module names, got {names!r}")
        if d.wrap_class is not None and not (isinstance(d.wrap_class, str) and d.wrap_class.isidentifier()):
            raise PlanError(f"distributed.wrap_class must be a class name such as LlamaDecoderLayer, "
                            f"got {d.wrap_class!r}")
        for what, value in (("dataset.path", self.dataset.path), ("dataset.eval_path", self.dataset.eval_path),
                            ("model.path", self.model.path), ("output_dir", self.output_dir)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise PlanError(f"{what} must be a path, got {value!r}")

    def _check_savers(self) -> None:
        sv, t = self.savers, self.training
        if not isinstance(sv.on, list) or not all(isinstance(n, str) for n in sv.on):
            raise PlanError(f"savers.on must be a list of saver names, got {sv.on!r}")
        for name in sv.on:
            options.check_choice("savers.on", name, options.SAVERS, PlanError)
        if isinstance(sv.every_n_layers, int) and sv.every_n_layers < 1:
            raise PlanError(f"savers.every_n_layers must be at least 1, got {sv.every_n_layers}")
        if ("layer_checkpointing" in sv.on) != (sv.every_n_layers > 1):
            raise PlanError(f"savers.every_n_layers {sv.every_n_layers} contradicts savers.on: layer_checkpointing is "
                            "on exactly when every_n_layers > 1")
        clash = conflict(sv.on)
        if clash:
            raise PlanError(f"savers.on: {clash}")
        needs = [n for n in sv.names if SAVERS[n].needs_checkpointing]
        if needs and not t.grad_checkpointing:
            raise PlanError(f"savers.on: {needs[0]} needs training.grad_checkpointing: true")
        if "padding_free" in sv.on and not (t.packing and t.attn_implementation.startswith("flash_attention")):
            raise PlanError("savers.on: padding_free needs training.packing: true and a flash_attention "
                            f"attn_implementation, got packing {t.packing}, {t.attn_implementation}")
        if sv.pinned_host_gib < 0:
            raise PlanError(f"savers.pinned_host_gib must be >= 0, got {sv.pinned_host_gib:g}")

    def _check_numbers(self) -> None:
        """Refuse numbers that cannot run (a hand edit, or YAML's .nan/.inf), naming the field and its range:
        otherwise they end in a traceback from torch or transformers, or in a run that 'completes' untrained."""
        for name, value in numbers_in(self):
            if isinstance(value, float) and not math.isfinite(value):
                raise PlanError(f"{name} must be a finite number, got {value}")
        t = self.training
        checks = [
            ("training.learning_rate", t.learning_rate, t.learning_rate > 0, "> 0"),
            ("training.num_epochs", t.num_epochs, t.num_epochs > 0 or t.max_steps > 0,
             "> 0 (or set training.max_steps > 0)"),
            ("training.seq_len", t.seq_len, t.seq_len <= MAX_SEQ_LEN, f"between 1 and {MAX_SEQ_LEN:,} (2**24)"),
            ("training.logging_steps", t.logging_steps, t.logging_steps >= 1, ">= 1"),
            ("training.save_steps", t.save_steps, t.save_steps >= 1, ">= 1"),
            ("training.save_total_limit", t.save_total_limit, t.save_total_limit >= 1, ">= 1"),
            ("training.warmup_ratio", t.warmup_ratio, 0 <= t.warmup_ratio < 1, "in [0, 1)"),
            ("training.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
            ("training.max_grad_norm", t.max_grad_norm, t.max_grad_norm > 0, "> 0"),
            ("training.seed", t.seed, 0 <= t.seed < 2**32, "in [0, 2**32)"),
            ("dataset.eval_fraction", self.dataset.eval_fraction, 0 <= self.dataset.eval_fraction < 1, "in [0, 1)"),
            ("lora.lora_alpha", self.lora.lora_alpha, self.lora.lora_alpha > 0, "> 0"),
            ("hardware.memory_gib", self.hardware.memory_gib, self.hardware.memory_gib > 0, "> 0"),
            ("prediction.margin", self.prediction.margin, 0 <= self.prediction.margin < 1, "in [0, 1)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise PlanError(f"{name} must be {allowed}, got {value:g}")

    def fits(self) -> bool:
        """The prediction fits the planned card with the plan's safety margin, and the savers' pinned host memory
        the host's usable share (what `plan` called feasible)."""
        sv = self.savers
        host_ok = not sv.host_memory_gib or sv.pinned_host_gib <= sv.host_memory_gib * host_pinned_share() + 1e-6
        return host_ok and self.prediction.per_gpu_gib <= self.hardware.memory_gib * (1 - self.prediction.margin) + 1e-9

    # ---- files -----------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def save(self, path: str) -> None:
        """Write the plan as YAML atomically (a temp file in the same folder, then rename)."""
        atomic_write_text(path, self.to_yaml())

    @classmethod
    def load(cls, path: str) -> "Plan":
        """Read a plan file (planner.planfile.io.read_plan_file: every way a file can fail, in one line) and check it."""
        return cls.from_dict(read_plan_file(path))
