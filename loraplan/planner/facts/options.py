"""Every option's allowed values and default, defined once.

The CLI's choices, request validation (`planner.decision.resolve`), plan validation (`planner.planfile.schema`) and the executor's
mappings (to transformers' `optim` names, for example) are all derived from the tables here. Defaults come from
`tables/hyperparameters.yaml` (each with its reason and source); nothing else in the code repeats them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Optional, get_args

from loraplan.tables import hyperparameters
from loraplan.tables import savers as savers_table

Method = Literal["lora", "qlora"]
MethodChoice = Literal["auto", "lora", "qlora"]
Checkpointing = Literal["auto", "on", "off"]
Loss = Literal["fused", "full"]
Dtype = Literal["bfloat16", "float16", "float32"]
DatasetFormat = Literal["auto", "instruction", "chat", "text", "prompt_completion"]
SaverMode = Literal["auto", "on", "off"]
# `--report-to`: the experiment tracker `run` logs to (transformers' integration of the same name); executor/trackers.py
# holds each one's package, install command and offline settings.
Tracker = Literal["none", "tensorboard", "trackio", "wandb", "mlflow"]
# transformers' SchedulerType values (transformers 5.24; the planner does not import transformers, so the list is
# written here and tests/test_newcomer_run.py checks it against the installed enum)
LrScheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                      "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                      "warmup_stable_decay", "greedy"]
TaskType = Literal["CAUSAL_LM"]  # peft's task type for a decoder trained on next tokens: the only one run trains
# transformers' attention implementations (AttentionInterface's names, and eager)
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4",
                             "flex_attention"]
LoraBias = Literal["none", "all", "lora_only"]  # peft LoraConfig.bias
QuantType = Literal["nf4", "fp4"]  # bitsandbytes bnb_4bit_quant_type
ModelSource = Literal["catalog", "config", "directory", "hub-cache"]  # architecture.model_source: where the model came from

METHODS: tuple[str, ...] = get_args(Method)
METHOD_CHOICES: tuple[str, ...] = get_args(MethodChoice)
CHECKPOINTING_CHOICES: tuple[str, ...] = get_args(Checkpointing)
LOSSES: tuple[str, ...] = get_args(Loss)
DTYPES: tuple[str, ...] = get_args(Dtype)
DATASET_FORMATS: tuple[str, ...] = get_args(DatasetFormat)
SAVER_MODES: tuple[str, ...] = get_args(SaverMode)
TRACKERS: tuple[str, ...] = get_args(Tracker)
LR_SCHEDULERS: tuple[str, ...] = get_args(LrScheduler)
TASK_TYPES: tuple[str, ...] = get_args(TaskType)
ATTN_IMPLEMENTATIONS: tuple[str, ...] = get_args(AttnImplementation)
LORA_BIASES: tuple[str, ...] = get_args(LoraBias)
QUANT_TYPES: tuple[str, ...] = get_args(QuantType)
MODEL_SOURCES: tuple[str, ...] = get_args(ModelSource)
# The memory savers, in the order the report lists them: tables/savers.yaml names them (with their facts and
# default modes), planner/plugins/savers.py holds one table entry for each.
SAVERS: tuple[str, ...] = tuple(savers_table()["savers"])
# `--seq-len max`: the planner's answer is a multiple of this many tokens.
SEQ_LEN_STEP = 256
# The longest sequence a request or a plan may name: beyond any model's context and any card's memory (a larger
# number is a typo, not a plan), but still arithmetic that prints readable numbers (2**24 = 16.8M tokens).
MAX_SEQ_LEN = 2**24

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Optimizer:
    """One optimizer `plan` can choose and `run` can build."""

    name: str  # what the CLI and the plan say
    hf_name: str  # transformers TrainingArguments(optim=...)
    state_bytes_per_param: float  # optimizer states per trainable parameter
    description: str
    needs_bitsandbytes: bool
    moments_in_param_dtype: bool = False  # torch AdamW: exp_avg / exp_avg_sq are zeros_like(param)


OPTIMIZERS: dict[str, Optimizer] = {o.name: o for o in (
    Optimizer("adamw", "adamw_torch", 8.0, "torch AdamW, states in the adapters' dtype (fp32; bf16 when trl casts QLoRA adapters)", False,
              moments_in_param_dtype=True),
    Optimizer("adamw-8bit", "adamw_bnb_8bit", 2.0, "bitsandbytes 8-bit AdamW", True),
    Optimizer("paged-adamw-8bit", "paged_adamw_8bit", 2.0, "bitsandbytes paged 8-bit AdamW", True),
)}

LOSS_DESCRIPTIONS = {
    "fused": "fused LM head + cross-entropy in chunks (trl SFTTrainer)",
    "full": "model's own loss over full logits upcast to fp32",
}


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, dict]:
    return hyperparameters()


def default(name: str) -> Any:
    """The default of hyperparameter `name` (tables/hyperparameters.yaml `value`)."""
    return _table()[name]["value"]


def setting(name: str, key: str) -> Any:
    """Another field of a hyperparameter entry (e.g. `small_dataset_rows` of num_epochs)."""
    return _table()[name][key]


def reason(name: str) -> str:
    return _table()[name]["reason"]


def logging_interval(optimizer_steps: int, every: Optional[int] = None) -> int:
    """Steps between logs: about ten logs over a short run (never less than once a step), at most every `every`
    steps (the plan's logging_steps; by default tables/hyperparameters.yaml's). The plan (planner.api) and the run
    (executor.train, once the trainer knows its real number of optimizer steps) both take it from here."""
    every = int(default("logging_steps")) if every is None else every
    return max(1, min(every, optimizer_steps // 10))


def choices_text(values) -> str:
    """'a, b or c' for error messages."""
    values = list(values)
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]


def check_choice(what: str, value: Any, allowed, error: type[Exception] = ValueError) -> None:
    """Raise `error` with a one-line message when `value` is not one of `allowed`."""
    if value not in allowed:
        raise error(f"{what} must be {choices_text(allowed)}, not {value!r}")


def saver_defaults(seq_len_max: bool = False) -> dict[str, str]:
    """Each saver's default mode (tables/savers.yaml, each saver's `default`): `fixed` for a fixed --seq-len,
    `seq_len_max` for --seq-len max."""
    key = "seq_len_max" if seq_len_max else "fixed"
    return {name: entry["default"][key] for name, entry in savers_table()["savers"].items()}


def parse_savers(text: Optional[str], seq_len_max: bool = False, error: type[Exception] = ValueError) -> dict[str, str]:
    """`--savers` -> {saver: auto|on|off}, over the defaults. A comma list, applied left to right, of
    `NAME` (on), `NAME=auto|on|off`, `no-NAME` (off), or the words `auto` (every saver auto), `none` (every
    saver off). Names take dashes or underscores: offload-checkpoints = offload_checkpoints."""
    modes = saver_defaults(seq_len_max)
    if text is None:
        return modes
    for raw in str(text).split(","):
        item = raw.strip().lower().replace("-", "_")
        if not item:
            continue
        if item in ("auto", "none"):
            modes = {k: ("auto" if item == "auto" else "off") for k in SAVERS}
            continue
        name, _, mode = item.partition("=")
        if not mode:
            name, mode = (name[3:], "off") if name.startswith("no_") else (name, "on")
        if name not in SAVERS:
            names = [n.replace("_", "-") for n in SAVERS]
            raise error(f"--savers: unknown saver {raw.strip()!r}; known: {', '.join(names)} (or auto, none)")
        if mode not in SAVER_MODES:
            raise error(f"--savers {raw.strip()}: the mode must be {choices_text(SAVER_MODES)}, not {mode!r}")
        modes[name] = mode
    return modes
