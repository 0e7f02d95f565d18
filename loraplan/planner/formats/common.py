"""What the three tools' configs share: reading values with one-line errors in the tool's own key names, the
optimizer names of transformers' `optim`, DeepSpeed and HF Trainer FSDP settings, local dataset files, and why a
key the plan does not use is left out. Adapters at the edge: they build a PlanRequest's fields, never a decision."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import InputError


@dataclass
class Imported:
    """One tool config read into a plan request: the fields it sets, and every key with what became of it."""

    tool: str
    path: str
    request: dict[str, Any] = field(default_factory=dict)  # PlanRequest fields the config sets
    micro_batch_size: Optional[int] = None
    grad_accum_steps: int = 1
    strategy: Optional[str] = None  # ddp | fsdp | fsdp-offload from the config's FSDP / DeepSpeed settings
    read: dict[str, Any] = field(default_factory=dict)  # tool key -> the value the plan takes into account
    ignored: dict[str, str] = field(default_factory=dict)  # tool key -> why the plan does not
    notes: list[str] = field(default_factory=list)  # how a setting was translated (DeepSpeed ZeRO as FSDP, ...)
    defaults: list[str] = field(default_factory=list)  # keys of `read` absent from the file: the tool's default

    def take(self, key: str, value: Any) -> Any:
        self.read[key] = value
        return value

    def ignore(self, key: str, why: str) -> None:
        self.ignored[key] = why

    def to_json(self) -> dict[str, Any]:
        return {"tool": self.tool, "path": self.path, "read": dict(self.read), "defaults": list(self.defaults),
                "ignored": dict(self.ignored), "notes": list(self.notes)}


def fail(tool: str, message: str) -> None:
    raise InputError(f"{tool} config: {message}")


def positive_int(tool: str, cfg: dict, key: str) -> Optional[int]:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(tool, f"{key} must be a positive integer, got {value!r}")
    return value


def positive_number(tool: str, cfg: dict, key: str) -> Optional[float]:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, str):  # axolotl allows learning_rate as a string ("2e-4"): YAML 1.1 reads it so
        try:
            value = float(value)
        except ValueError:
            fail(tool, f"{key} must be a number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        fail(tool, f"{key} must be a positive number, got {value!r}")
    return float(value)


def fraction(tool: str, cfg: dict, key: str) -> Optional[float]:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        fail(tool, f"{key} must be in [0, 1), got {value!r}")
    return float(value)


def boolean(tool: str, cfg: dict, key: str) -> Optional[bool]:
    value = cfg.get(key)
    if value is None or isinstance(value, bool):
        return value
    fail(tool, f"{key} must be true or false, got {value!r}")


# transformers TrainingArguments `optim` names -> loraplan's optimizers (planner.facts.options.OPTIMIZERS)
OPTIM_NAMES = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw", "adamw": "adamw",
    "paged_adamw_32bit": "adamw",  # fp32 states as AdamW; paging moves them only under memory pressure
    "adamw_bnb_8bit": "adamw-8bit", "adamw_8bit": "adamw-8bit",
    "paged_adamw_8bit": "paged-adamw-8bit",
}


def optimizer(tool: str, imp: Imported, key: str, value: Any) -> str:
    name = str(value).strip().lower()
    if name not in OPTIM_NAMES:
        fail(tool, f"{key}: {value!r} is not an optimizer loraplan plans ({', '.join(sorted(OPTIM_NAMES))})")
    if name == "paged_adamw_32bit":
        imp.notes.append(f"{key}: paged_adamw_32bit is planned as AdamW (fp32 states; paging only moves them "
                         "to the host under memory pressure)")
    imp.take(key, value)
    return OPTIM_NAMES[name]


def _read_json(tool: str, key: str, where: str, base_dir: str) -> dict:
    path = where if os.path.isabs(where) or os.path.exists(where) else os.path.join(base_dir, where)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        fail(tool, f"{key}: {where} not found; loraplan reads the DeepSpeed JSON to plan its ZeRO stage")
    except (OSError, json.JSONDecodeError) as exc:
        fail(tool, f"{key}: cannot read {where}: {exc}")
    if not isinstance(data, dict):
        fail(tool, f"{key}: {where} must hold a JSON object")
    return data


def deepspeed(tool: str, imp: Imported, key: str, value: Any, base_dir: str) -> None:
    """A DeepSpeed config as the strategy its memory equals (ZeRO-3: FSDP; with offload_param: FSDP-offload;
    ZeRO-0/1/2: DDP, see the note written into the report)."""
    ds = value if isinstance(value, dict) else _read_json(tool, key, str(value), base_dir)
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        fail(tool, f"{key}: zero_optimization.stage must be 0-3, got {stage!r}")
    device = lambda k: str((zero.get(k) or {}).get("device", "none")).lower()  # noqa: E731
    if device("offload_param") == "nvme" or device("offload_optimizer") == "nvme":
        fail(tool, f"{key}: ZeRO-Infinity NVMe offload has no equivalent loraplan plans (FSDP offloads to host RAM)")
    imp.take(key, value if isinstance(value, str) else "<inline>")
    if stage == 3:
        imp.strategy = "fsdp-offload" if device("offload_param") == "cpu" else "fsdp"
        extra = ("" if device("offload_optimizer") != "cpu" or imp.strategy == "fsdp-offload" else
                 "; its optimizer-state offload is not modelled, so the plan over-counts GPU memory by the "
                 "sharded adapter optimizer states")
        imp.notes.append(f"DeepSpeed ZeRO-3 shards parameters, gradients and optimizer states like FSDP "
                         f"full-shard: planned as {imp.strategy}{extra}")
    else:
        imp.strategy = "ddp"
        imp.notes.append(f"DeepSpeed ZeRO-{stage} shards only optimizer states{' and gradients' if stage == 2 else ''}"
                         " and keeps a full replica of the weights on every GPU: planned as DDP. With LoRA those "
                         "states belong to the adapter alone, so DDP's replicated copy over-counts by at most "
                         "the adapter's optimizer states (and gradients): an upper bound")


def hf_fsdp(tool: str, imp: Imported, cfg: dict) -> None:
    """transformers TrainingArguments `fsdp` ("full_shard auto_wrap [offload]" or a list) and `fsdp_config`."""
    value = cfg.get("fsdp")
    if value in (None, "", False, []):
        return
    words = value.split() if isinstance(value, str) else [str(v) for v in value]
    if "shard_grad_op" in words or "hybrid_shard_zero2" in words:
        fail(tool, "fsdp: shard_grad_op (ZeRO-2-like FSDP) keeps full weights per GPU; loraplan plans "
                   "full_shard (or DDP without fsdp)")
    if not ({"full_shard", "hybrid_shard"} & set(words)):
        fail(tool, f"fsdp: {value!r} names no sharding (full_shard)")
    imp.take("fsdp", value)
    if "hybrid_shard" in words:
        imp.notes.append("fsdp: hybrid_shard shards within a node and replicates across nodes: planned as "
                         "full_shard, which it equals on one node")
    fc = cfg.get("fsdp_config") or {}
    offload = "offload" in words or bool(fc.get("offload_params"))
    imp.strategy = "fsdp-offload" if offload else "fsdp"
    if fc:
        imp.take("fsdp_config", fc)
        if fc.get("activation_checkpointing"):
            imp.request["grad_checkpointing"] = "on"


def local_dataset(path: Any, base_dir: str) -> Optional[str]:
    """A training file on this machine that loraplan reads for token statistics, or None (a Hub dataset)."""
    if not isinstance(path, str):
        return None
    for cand in (path, os.path.join(base_dir, path)):
        if os.path.isfile(cand) and cand.rsplit(".", 1)[-1].lower() in ("jsonl", "json", "csv", "parquet"):
            return cand
    return None


# why a key the plan does not take into account changes no memory; by key, then by prefix
NO_MEMORY_EFFECT = {
    "chat_template": "the prompt template changes tokens, not memory",
    "template": "the prompt template changes tokens, not memory",
    "special_tokens": "added special tokens change no shape the plan counts",
    "tokenizer_type": "the tokenizer changes no shape the plan counts",
    "model_type": "the model class comes from the model's config.json",
    "output_dir": "where outputs go: the plan's output_dir is set from it",
    "seed": "a seed changes no memory",
    "warmup_steps": "the schedule changes no memory", "warmup_ratio": "the schedule changes no memory",
    "lr_scheduler": "the schedule changes no memory", "lr_scheduler_type": "the schedule changes no memory",
    "weight_decay": "changes no memory", "max_grad_norm": "changes no memory",
    "plugins": "plugins are not planned",
    "trust_remote_code": "read by loraplan's --trust-remote-code, not from the config",
    "bf16": "the compute dtype follows the card (bf16 where it has it, else fp16)",
    "fp16": "the compute dtype follows the card (bf16 where it has it, else fp16)",
    "tf32": "a matmul precision setting: no memory effect",
    "dtype": "the compute dtype follows the card (bf16 where it has it, else fp16)",
    "torch_dtype": "the compute dtype follows the card (bf16 where it has it, else fp16)",
    "flash_attention": "attention kernels are chosen by the plan (sdpa, or flash-attention with padding-free packing)",
    "sdp_attention": "attention kernels are chosen by the plan",
    "attn_implementation": "attention kernels are chosen by the plan",
    "hub_model_id": "publishing, not training", "push_to_hub": "publishing, not training",
    "resume_from_checkpoint": "resuming changes no memory",
}
NO_MEMORY_PREFIXES = {
    "wandb_": "experiment tracking", "mlflow_": "experiment tracking", "report_to": "experiment tracking",
    "logging_": "logging cadence", "save_": "checkpoint cadence", "eval_": "evaluation is not planned",
    "evals_per_epoch": "evaluation is not planned", "saves_per_epoch": "checkpoint cadence",
    "do_": "which phases run: the plan covers training",
    "dataloader_": "data loading workers change no GPU memory the plan counts",
    "hub_": "publishing, not training", "overwrite_": "output handling",
}


def ignore_rest(imp: Imported, cfg: dict, handled: set[str], specific: dict[str, str]) -> None:
    """Every key of `cfg` not in `handled` goes into `imp.ignored` with its reason (never dropped silently)."""
    for key in cfg:
        if key in handled or key in imp.read or key in imp.ignored:
            continue
        reason = specific.get(key) or NO_MEMORY_EFFECT.get(key)
        if reason is None:
            reason = next((why for p, why in NO_MEMORY_PREFIXES.items() if key.startswith(p)), None)
        imp.ignore(key, reason or f"not a {imp.tool} key loraplan knows: not taken into account")
