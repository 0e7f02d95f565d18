"""Other tools' config formats (Axolotl, LLaMA-Factory, TRL) as adapters at the edge: each module reads its
tool's config into PlanRequest fields (`to_request`), says which loraplan advice is which of its keys
(`SUGGESTION_KEYS`), and writes a plan back as a config (`export`). `FORMATS` is the plug-in table; detection,
the merge with the command line, and the export header live here. None of it reaches into the decision.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

from ..architecture.model_source import resolve_model
from ..errors import InputError
from ..facts.config_file import read_mapping
from ..report.tables import key_column, new_table, print_table, text_column
from . import axolotl, llamafactory, trl
from .common import Imported


@dataclass(frozen=True)
class Format:
    name: str
    display: str
    detect: Callable[[set[str]], bool]
    to_request: Callable[[dict, str], Imported]
    suggestion_keys: dict[str, Callable[[re.Match], str]]
    export: Callable[[Any], tuple[dict[str, Any], list[str]]]
    launch: str  # how the exported file is run, for its header


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("axolotl", "Axolotl", axolotl.detect, axolotl.to_request, axolotl.SUGGESTION_KEYS, axolotl.export,
           "axolotl train {file}  (on N GPUs: accelerate launch --num_processes N -m axolotl.cli.train {file})"),
    Format("llamafactory", "LLaMA-Factory", llamafactory.detect, llamafactory.to_request,
           llamafactory.SUGGESTION_KEYS, llamafactory.export,
           "llamafactory-cli train {file}  (on N GPUs: FORCE_TORCHRUN=1 NPROC_PER_NODE=N llamafactory-cli train {file})"),
    Format("trl", "TRL", trl.detect, trl.to_request, trl.SUGGESTION_KEYS, trl.export,
           "trl sft --config {file} --dataset_name DATA  (on N GPUs: accelerate launch --num_processes N "
           "trl/scripts/sft.py --config {file})"),
)}
FORMAT_NAMES = tuple(FORMATS)


def read_config(path: str) -> dict:
    """Another tool's YAML config, as the mapping it holds (planner.facts.config_file.read_mapping)."""
    return read_mapping(path, "YAML")


def detect(cfg: dict, path: str) -> Format:
    keys = {str(k) for k in cfg}
    found = [f for f in FORMATS.values() if f.detect(keys)]
    if len(found) != 1:
        what = "none" if not found else " and ".join(f.display for f in found)
        raise InputError(f"{path}: cannot tell which tool's config this is (matches {what}); "
                         f"name it with --from-format {'|'.join(FORMAT_NAMES)}")
    return found[0]


def load(path: str, forced: Optional[str] = None) -> tuple[Format, Imported]:
    """The tool config at `path` read into PlanRequest fields (InputError, one line, on bad input)."""
    cfg = read_config(path)
    fmt = FORMATS[forced] if forced else detect(cfg, path)
    imp = fmt.to_request(cfg, path)
    imp.defaults = [k for k in imp.read if k not in cfg]  # read at the tool's default: the key is absent
    return fmt, imp


def _targets(spec: Optional[str], model: str, trust_remote_code: bool) -> Optional[str]:
    """The tools' spellings that depend on the model: every nn.Linear module (not fused experts), peft's default."""
    if not spec or ("linear-modules" not in spec and "peft-default" not in spec):
        return spec

    m = resolve_model(model, trust_remote_code)
    names = []
    for part in spec.split(","):
        if part == "linear-modules":
            names += [p.peft_name for p in m.arch.projections if not p.param]
        elif part == "peft-default":
            default = trl._peft_default_targets(m.arch.family)
            if not default:  # peft itself then asks for target_modules
                raise InputError(f"trl config: lora_target_modules is not set and peft (installed: "
                                 f"{importlib.util.find_spec('peft') is not None}) has no default targets for "
                                 f"{m.arch.family}: set lora_target_modules")
            names += default
        else:
            names.append(part)
    return ",".join(dict.fromkeys(names))


def request(imp: Imported, base: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """PlanRequest keyword arguments: the config's values, with every flag in `given` (typed on the command line)
    taking precedence. The global batch is the config's micro-batch x accumulation x GPUs, kept when only the
    micro-batch is overridden."""
    kw = dict(base)
    for name, value in imp.request.items():
        if name not in given and value is not None:
            kw[name] = value
    if "num_gpus" not in given:
        kw["num_gpus"] = kw.get("num_gpus") or 1  # a config is launched on the GPUs --num-gpus names (default 1)
    world = (kw.get("num_gpus") or 1) * (kw.get("num_nodes") or 1)
    if "global_batch_size" not in given:
        kw["global_batch_size"] = imp.micro_batch_size * imp.grad_accum_steps * world
    if "batch_size" not in given:
        kw["batch_size"] = imp.micro_batch_size
    if "strategy" not in given:
        strategy = imp.strategy or ("ddp" if world > 1 else "auto")
        kw["strategy"] = "auto" if strategy == "ddp" and world == 1 else strategy
    if "targets" not in given:
        kw["targets"] = _targets(kw.get("targets"), kw["model"], bool(kw.get("trust_remote_code")))
    return kw


def tool_suggestions(fmt: Format, suggestions: list[str]) -> list[dict[str, str]]:
    """Each of loraplan's suggestions that names a setting, phrased in the tool's own keys as well."""
    out = []
    for s in suggestions:
        for pattern, phrase in fmt.suggestion_keys.items():
            m = re.search(pattern, s)
            if m:
                out.append({"loraplan": s, fmt.name: "set " + phrase(m)})
                break
    return out


def from_config_json(fmt: Format, imp: Imported, suggestions: list[str]) -> dict[str, Any]:
    """The `from_config` field of `plan --json` (docs/plan-json.md)."""
    return {**imp.to_json(), "tool_suggestions": tool_suggestions(fmt, suggestions)}


def export_text(plan, tool: str, plan_path: str, out_name: str) -> str:
    """The tool's config reproducing the plan, under a header saying what the tool cannot express."""
    fmt = FORMATS[tool]
    cfg, cannot = fmt.export(plan)
    world = plan.hardware.num_gpus * plan.hardware.num_nodes
    cannot = list(cannot) + [
        f"the hardware: {world} x {plan.hardware.gpu_name} ({plan.hardware.memory_gib:.0f} GiB); launch on that many "
        "GPUs (loraplan plan --from this file --gpu ... --num-gpus ... plans it again)",
        f"loraplan's prediction: {plan.prediction.per_gpu_gib:.1f} GiB per GPU",
    ]
    header = [f"# {fmt.display} config written by `loraplan export {plan_path} --to {tool}` "
              f"({datetime.date.today().isoformat()}).",
              f"# Run: {fmt.launch.format(file=out_name)}",
              f"# What {fmt.display} cannot express from the plan:"]
    header += [f"#   - {c}" for c in cannot]
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def render(fmt: Format, imp: Imported, suggestions: list[str], console) -> None:
    """The report's table of the config's keys: read, not taken into account (and why), and what would fit."""
    t = new_table(f"{fmt.display} config {imp.path}")
    key_column(t, "key")
    text_column(t, "value / why not")
    key_column(t, "planned")
    for key, value in imp.read.items():
        t.add_row(key, f"{value}" + (f"  ({fmt.display}'s default)" if key in imp.defaults else ""), "yes")
    for key, why in imp.ignored.items():
        t.add_row(key, why, "no")
    for note in imp.notes:
        t.add_row("", note, "note")
    for s in tool_suggestions(fmt, suggestions):
        t.add_row("to fit", f"{s[fmt.name]}  ({s['loraplan']})", "")
    print_table(console, t)


__all__ = ["FORMATS", "FORMAT_NAMES", "Format", "Imported", "load", "request", "export_text", "render",
           "from_config_json", "tool_suggestions"]
