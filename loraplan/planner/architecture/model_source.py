"""Where the model the user named comes from: the model catalog, a config.json or model folder, or the local
Hugging Face cache; its config read and turned into an Architecture.

Reads tables/models.yaml. Never downloads anything.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraplan.tables import models

from ..errors import ArchitectureError, InputError
from ..facts.config_file import read_mapping
from ..facts.lookup import closest_names, find_name
from ..facts.model_names import resolve_name
from ..facts.model_ref import ModelRef
from ..facts.paths import symlink_loop
from .config_checks import check_config
from .families import from_config
from .types import Architecture

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


@dataclass
class ResolvedModel:
    ref: ModelRef
    config: dict
    arch: Architecture
    display_name: str
    notes: list[str] = field(default_factory=list)  # what the plan should say about the name (model_names, plan_notes)
    method: Optional[str] = None  # "qlora" when the named weights are already 4-bit


def _catalog_model(key: str, trust_remote_code: bool, name: Optional[str] = None, hub_id: Optional[str] = None,
                   notes: Optional[list[str]] = None, method: Optional[str] = None) -> ResolvedModel:
    entry = models()[key]
    cfg = dict(entry["config"])
    return ResolvedModel(
        ModelRef(name=name or key, source="catalog", family=str(cfg.get("model_type")),
                 hub_id=hub_id or entry.get("hub_id"), trust_remote_code=trust_remote_code),
        cfg, _arch(cfg, f"catalog entry {key}"), entry.get("display_name", key),
        notes=list(notes or []) + ([str(entry["plan_notes"])] if entry.get("plan_notes") else []), method=method,
    )


def _typed_name(name: str, trust_remote_code: bool) -> Optional[ResolvedModel]:
    """An instruct variant, mirror, pre-quantized or derived repository of a catalog entry (planner.model_names)."""
    orgs = {str(e.get("hub_id", "")).split("/")[0].lower() for e in models().values()}
    match = resolve_name(name, lambda n: find_name(models(), n), orgs)
    if match is None:
        return None
    return _catalog_model(match.key, trust_remote_code, name.strip(), match.hub_id, match.notes, match.method)


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


def _arch(cfg: dict, where: str) -> Architecture:
    check_config(cfg, where)  # what transformers would refuse, in one line (planner.architecture.config_checks)
    try:
        return from_config(cfg)
    except ArchitectureError as exc:
        raise InputError(f"{where}: {exc}") from None


def resolve_model(name: str, trust_remote_code: bool = False) -> ResolvedModel:
    """A catalog name, a path to config.json, a model directory, or a hub id already in the local cache."""
    if not name or not name.strip():
        raise InputError("no model given")
    key = find_name(models(), name)
    if key is not None and not os.path.exists(name):
        typed_hub_id = name.strip() if re.fullmatch(r"[\w.-]+/[\w.-]+", name.strip()) else None
        return _catalog_model(key, trust_remote_code, hub_id=typed_hub_id)  # the repository typed is what run loads
    path = Path(name).expanduser()
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
        cfg = read_mapping(cfg_path, "JSON")
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
            cfg = read_mapping(snap / "config.json", "JSON")
            arch = _arch(cfg, f"{name} (local cache)")
            return ResolvedModel(
                ModelRef(name=name, source="hub-cache", family=arch.family, path=str(snap), hub_id=name,
                         trust_remote_code=trust_remote_code),
                cfg, arch, name,
            )
        typed = _typed_name(name, trust_remote_code)
        if typed is not None:
            return typed
        raise InputError(
            f"{name} is not in the catalog, not a path, and not in the local Hugging Face cache ({hf_cache_dir()});"
            " loraplan never downloads: pass a model directory or config.json" + closest_names(models(), name)
        )
    typed = _typed_name(name, trust_remote_code)
    if typed is not None:
        return typed
    raise InputError(f"unknown model {name!r}" + (closest_names(models(), name) or "; see `loraplan models`"))
