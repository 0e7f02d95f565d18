"""Which model to train and where its architecture came from, as the plan file records it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelRef:
    """Which model to train and where its architecture came from."""

    name: str  # what the user typed: a catalog name, a path or a hub id
    source: str  # "catalog" | "config" | "directory" | "hub-cache"
    family: str  # model_type, e.g. "llama", "qwen2", "mixtral"
    path: Optional[str] = None  # local directory holding the weights (run loads from here); None for catalog
    hub_id: Optional[str] = None  # the Hugging Face id when known (catalog entries name theirs)
    trust_remote_code: bool = False
