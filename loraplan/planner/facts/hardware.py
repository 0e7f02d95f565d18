"""The hardware the user named: a catalog card, a custom memory size, the GPUs detected, the CPU, and the
topology (GPUs per node, nodes, the network between them, host memory).

Reads tables/gpus.yaml and tables/networks.yaml. Never imports torch, except to detect GPUs for --gpu auto.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from loraplan.tables import gpus, networks

from ..errors import InputError
from .lookup import closest_names, find_name
from .options import default

GIB = 2**30


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
        key = find_name(gpus(), name)
        if key is None:
            raise InputError(f"unknown GPU {gpu!r}" + (closest_names(gpus(), name) or f"; known: {', '.join(gpus())}")
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


@dataclass
class Hardware:
    gpu: str  # catalog key, "custom", or "cpu"
    gpu_name: str  # human name
    memory_gib: float  # usable memory per GPU as the card reports it
    num_gpus: int  # per node
    bf16: bool
    peak_bf16_tflops: Optional[float] = None
    bandwidth_gbs: Optional[float] = None
    num_nodes: int = 1
    interconnect_gbs: Optional[float] = None  # GPU-to-GPU within a node, GB/s per direction (tables/gpus.yaml)
    host_link_gbs: Optional[float] = None  # GPU to host memory, GB/s per direction (tables/gpus.yaml)
    network_gbs: Optional[float] = None  # between nodes, GB/s per node and direction (--network)
    host_memory_gib: Optional[float] = None  # RAM per node (--host-memory, or detected)

    @property
    def world_size(self) -> int:
        """Training processes over all nodes: one per GPU."""
        return self.num_gpus * self.num_nodes
