"""Resolve what the user named: a model (catalog name, config.json, model directory, or a hub id in the local
Hugging Face cache) and the hardware (a catalog card, a custom memory size, the detected GPUs, or the CPU).

Reads tables/*.yaml. Never downloads anything and never imports torch, except to detect GPUs for --gpu auto.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from loraplan.tables import gpus, models, networks

from .arch import Architecture, from_config
from .errors import ArchitectureError, InputError
from .options import default
from .plan import Hardware, ModelRef

GIB = 2**30
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _lookup(table: dict[str, dict], name: str) -> Optional[str]:
    key = name.strip().lower()
    if key in table:
        return key
    for k, entry in table.items():
        if key in [a.lower() for a in entry.get("aliases") or []]:
            return k
        if key == str(entry.get("hub_id", "")).lower():
            return k
    return None


def _suggest(table: dict[str, dict], name: str) -> str:
    names = list(table) + [a for e in table.values() for a in e.get("aliases") or []]
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    if not close:
        close = [n for n in table if name.lower().split("-")[0] in n][:3]
    return f"; did you mean {', '.join(close)}?" if close else ""


# ---------------------------------------------------------------------------------------------------------
# models


@dataclass
class ResolvedModel:
    ref: ModelRef
    config: dict
    arch: Architecture
    display_name: str


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories: $HF_HUB_CACHE, $HF_HOME/hub, or ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def find_in_hf_cache(hub_id: str) -> Optional[Path]:
    """The snapshot folder of `hub_id` in the local cache that holds a config.json (refs/main first), or None."""
    repo = hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
    snaps = repo / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = snaps / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    found = sorted((p for p in snaps.iterdir() if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def has_weights(folder: "Path | str") -> bool:
    """The folder holds model weights (safetensors, PyTorch .bin/.pt, or a sharded index)."""
    return any(any(Path(folder).glob(p)) for p in WEIGHT_PATTERNS)


def _read_config(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _arch(cfg: dict, where: str) -> Architecture:
    try:
        return from_config(cfg)
    except ArchitectureError as exc:
        raise InputError(f"{where}: {exc}") from None


def resolve_model(name: str, trust_remote_code: bool = False) -> ResolvedModel:
    """A catalog name, a path to config.json, a model directory, or a hub id already in the local cache."""
    if not name or not name.strip():
        raise InputError("no model given")
    key = _lookup(models(), name)
    if key is not None and not os.path.exists(name):
        entry = models()[key]
        cfg = dict(entry["config"])
        return ResolvedModel(
            ModelRef(name=key, source="catalog", family=str(cfg.get("model_type")), hub_id=entry.get("hub_id"),
                     trust_remote_code=trust_remote_code),
            cfg, _arch(cfg, f"catalog entry {key}"), entry.get("display_name", key),
        )
    path = Path(name).expanduser()
    from .plan_paths import symlink_loop

    if symlink_loop(str(path)):
        raise InputError(f"model path {name} is a symlink loop (a link that leads back to itself); point it at a "
                         f"model directory or config.json")
    looks_like_path = os.sep in name or name.startswith(".") or name.endswith(".json") or path.exists()
    if path.exists():
        if path.is_dir():
            cfg_path = path / "config.json"
            if not cfg_path.is_file():
                raise InputError(f"model directory {name} has no config.json")
            folder = path
        else:
            cfg_path, folder = path, path.parent
        cfg = _read_config(cfg_path)
        arch = _arch(cfg, str(cfg_path))
        return ResolvedModel(
            ModelRef(name=name, source="directory" if path.is_dir() else "config", family=arch.family,
                     path=str(folder.resolve()) if has_weights(folder) or path.is_dir() else None,
                     trust_remote_code=trust_remote_code),
            cfg, arch, str(cfg.get("_name_or_path") or folder.name or name),
        )
    if looks_like_path and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise InputError(f"no such file or directory: {name}")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        snap = find_in_hf_cache(name)
        if snap is not None:
            cfg = _read_config(snap / "config.json")
            arch = _arch(cfg, f"{name} (local cache)")
            return ResolvedModel(
                ModelRef(name=name, source="hub-cache", family=arch.family, path=str(snap), hub_id=name,
                         trust_remote_code=trust_remote_code),
                cfg, arch, name,
            )
        raise InputError(
            f"{name} is not in the catalog, not a path, and not in the local Hugging Face cache ({hf_cache_dir()});"
            " loraplan never downloads: pass a model directory or config.json" + _suggest(models(), name)
        )
    raise InputError(f"unknown model {name!r}" + (_suggest(models(), name) or "; see `loraplan models`"))


# ---------------------------------------------------------------------------------------------------------
# hardware

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 2**30, "gb": 1e9,
          "gib": 2**30, "t": 2**40, "tb": 1e12, "tib": 2**40}


def parse_memory_gib(text: str) -> float:
    """'24GiB', '24 GB', '80g', '24' (GiB) -> GiB."""
    m = _SIZE.match(str(text))
    if not m:
        raise InputError(f"cannot read memory size {text!r}: use e.g. 24GiB or 80GB")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "gib").lower()] / GIB
    if value <= 0:
        raise InputError(f"memory size must be positive, got {text!r}")
    return value


def hardware_from_entry(key: str, entry: dict, num_gpus: int) -> Hardware:
    return Hardware(
        gpu=key, gpu_name=entry["name"], memory_gib=float(entry["memory_gib"]), num_gpus=num_gpus,
        bf16=bool(entry["bf16"]),
        peak_bf16_tflops=entry.get("peak_bf16_tflops") or entry.get("peak_fp16_tflops"),
        bandwidth_gbs=entry.get("bandwidth_gbs"), interconnect_gbs=entry.get("interconnect_gbs"),
        host_link_gbs=entry.get("host_link_gbs"),
    )


def match_device_name(device_name: str) -> Optional[str]:
    """The catalog key whose `match` substrings claim torch.cuda.get_device_name()'s string."""
    for key, entry in gpus().items():
        if any(m in device_name for m in entry.get("match") or []) and not any(
            m in device_name for m in entry.get("not_match") or []
        ):
            return key
    return None


def detect_gpus() -> Optional[tuple[str, float, int, bool]]:
    """(device name, total GiB, count, bf16) of the visible GPUs via torch, or None without torch or GPUs."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # only here: --gpu auto

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GIB, torch.cuda.device_count(), bool(torch.cuda.is_bf16_supported())


def system_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):
        return 16.0


def cpu_hardware(num: int = 1) -> Hardware:
    """The CPU as the device: its RAM, shared by the `num` processes of a multi-process CPU run, so each may use
    RAM / num."""
    ram = system_memory_gib()
    name = "CPU (no GPU)" if num == 1 else f"CPU (no GPU), {num} processes sharing {ram:.1f} GiB of RAM"
    return Hardware(gpu="cpu", gpu_name=name, memory_gib=round(ram / num, 2), num_gpus=num, bf16=False)


def resolve_hardware(gpu: Optional[str], gpu_memory: Optional[str], num_gpus: Optional[int]) -> tuple[Hardware, str]:
    """(hardware, a note on how it was found)."""
    if num_gpus is not None and num_gpus < 1:
        raise InputError(f"--num-gpus must be at least 1, got {num_gpus}")
    name = (gpu or ("custom" if gpu_memory else "auto")).strip().lower()
    note = ""
    if name == "auto":
        found = detect_gpus()
        if found is None:
            hw = cpu_hardware(num_gpus or 1)
            note = "no GPU detected (torch not installed or no CUDA device): planning for the CPU"
        else:
            dev, total, count, bf16 = found
            key = match_device_name(dev)
            if key:
                hw = hardware_from_entry(key, gpus()[key], num_gpus or count)
            else:
                hw = Hardware(gpu="custom", gpu_name=dev, memory_gib=round(total, 2), num_gpus=num_gpus or count, bf16=bf16)
            hw.memory_gib = round(total, 2)  # what this card reports beats the catalog
            note = f"detected {count} x {dev} ({total:.1f} GiB)"
    elif name == "cpu":
        hw = cpu_hardware(num_gpus or 1)
    elif name == "custom":
        hw = Hardware(gpu="custom", gpu_name="custom GPU", memory_gib=0.0, num_gpus=num_gpus or 1, bf16=True)
    else:
        key = _lookup(gpus(), name)
        if key is None:
            raise InputError(f"unknown GPU {gpu!r}" + (_suggest(gpus(), name) or f"; known: {', '.join(gpus())}")
                             + " (or use --gpu-memory 24GiB for a card not in the catalog)")
        hw = hardware_from_entry(key, gpus()[key], num_gpus or 1)
    if gpu_memory:
        hw.memory_gib = round(parse_memory_gib(gpu_memory), 3)
        if hw.gpu == "custom":
            hw.gpu_name = f"custom GPU ({hw.memory_gib:g} GiB)"
    return hw, note


def parse_network_gbs(text: str) -> tuple[float, str]:
    """--network: a name from tables/networks.yaml or Gbit/s per node -> (GB/s per node, how it was read)."""
    key = str(text).strip().lower()
    table = networks()
    if key in table:
        e = table[key]
        return e["gbit_per_node"] / 8, f"{key}: {e['description']} ({e['gbit_per_node']:,} Gbit/s per node)"
    try:
        gbit = float(key.removesuffix("gbit").removesuffix("gb/s").strip())
    except ValueError:
        raise InputError(f"--network {text!r} is neither a network of tables/networks.yaml ({', '.join(table)}) "
                         "nor a number of Gbit/s per node") from None
    if not gbit > 0 or gbit == float("inf"):
        raise InputError(f"--network must be a positive number of Gbit/s per node, got {text!r}")
    return gbit / 8, f"{gbit:g} Gbit/s per node (--network)"


DEFAULT_NETWORK = "eth-100"


@dataclass(frozen=True)
class Topology:
    """What resolve_topology found beside what it set on the hardware."""

    notes: list  # for the plan's hardware note
    host_note: str  # how the host memory per node was found (given, detected, or assumed by the sizing rule)
    host_assumed: bool  # from the sizing rule: a fit table recomputes it per card


def resolve_topology(hw: Hardware, num_nodes: Optional[int], network: Optional[str],
                     host_memory: Optional[str], detected: bool = False) -> Topology:
    """Nodes, the network between them and the host memory per node, set on `hw`."""
    notes = []
    if num_nodes is not None:
        if num_nodes < 1:
            raise InputError(f"--num-nodes must be at least 1, got {num_nodes}")
        if num_nodes > 1 and hw.gpu == "cpu":
            raise InputError("--num-nodes needs GPUs: a multi-node plan on --gpu cpu is not supported")
        hw.num_nodes = num_nodes
    if hw.num_nodes > 1:
        gbs, how = parse_network_gbs(network or DEFAULT_NETWORK)
        hw.network_gbs = gbs
        notes.append(f"network between nodes: {how}" + ("" if network else "; assumed, pass --network"))
    elif network:
        raise InputError("--network describes the link between nodes: it needs --num-nodes 2 or more")
    if host_memory:
        hw.host_memory_gib = round(parse_memory_gib(host_memory), 3)
        return Topology(notes, f"--host-memory {hw.host_memory_gib:.1f} GiB", False)
    if detected or hw.gpu == "cpu":
        hw.host_memory_gib = round(system_memory_gib(), 2)
        return Topology(notes, f"detected {hw.host_memory_gib:.1f} GiB of RAM", False)
    # a named card is usually someone else's machine: assume the common sizing rule
    hw.host_memory_gib = host_memory_rule(hw)
    rule = f"{default('host_memory_per_gpu_memory'):g} x the node's GPU memory"
    if hw.world_size > 1:
        notes.append(f"host memory per node assumed {hw.host_memory_gib:,.0f} GiB ({rule}); pass --host-memory")
    return Topology(notes, f"assumed {hw.host_memory_gib:.0f} GiB ({rule}; pass --host-memory)", True)


def host_memory_rule(hw: Hardware) -> float:
    """Host RAM per node assumed for a named card: tables/hyperparameters.yaml host_memory_per_gpu_memory x the
    node's GPU memory."""
    return round(float(default("host_memory_per_gpu_memory")) * hw.num_gpus * hw.memory_gib, 1)
