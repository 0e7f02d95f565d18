"""What the user asked for (`PlanRequest`) and its checks, before anything is resolved.

planner.decision.resolve turns a checked request into everything the decision needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from ..errors import InputError
from . import options

MAX_SEQ_LEN = options.MAX_SEQ_LEN  # planner.facts.options: the one definition


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
    strategy: str = "auto"  # auto, or a key of planner.plugins.strategies.STRATEGIES
    method: str = field(default_factory=lambda: options.default("method"))  # options.METHOD_CHOICES
    rank: Optional[int] = None
    alpha: Optional[int] = None
    dropout: Optional[float] = None
    targets: Optional[str] = None
    seq_len: Union[int, str, None] = None  # or "max": the longest that fits; None: the default, or the model's context when shorter
    batch_size: Optional[int] = None  # fixed micro-batch; None: choose
    global_batch_size: Optional[int] = None
    grad_checkpointing: str = field(default_factory=lambda: options.default("gradient_checkpointing"))  # CHECKPOINTING_CHOICES
    optimizer: str = field(default_factory=lambda: options.default("optimizer"))  # options.OPTIMIZERS
    loss: str = field(default_factory=lambda: options.default("loss"))  # options.LOSSES
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
    report_to: str = field(default_factory=lambda: options.default("report_to"))  # options.TRACKERS
    backend: str = "hf"  # the training backend: a key of planner.plugins.backends.BACKENDS (checked in resolve)


SEQ_LEN_MAX = "max"


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
    options.check_choice("--method", req.method, options.METHOD_CHOICES, InputError)
    options.check_choice("--grad-checkpointing", req.grad_checkpointing, options.CHECKPOINTING_CHOICES, InputError)
    options.check_choice("--optimizer", req.optimizer, tuple(options.OPTIMIZERS), InputError)
    options.check_choice("--loss", req.loss, options.LOSSES, InputError)
    options.check_choice("--report-to", req.report_to, options.TRACKERS, InputError)
    options.parse_savers(req.savers, error=InputError)
