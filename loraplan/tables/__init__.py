"""Data, not code: the GPU catalog, the model architecture catalog, recommended hyperparameters, the memory model's
coefficients, the savers' facts, networks. Every module reads them through `load_table`, which parses each file
once per process."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

TABLES_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load_table(name: str) -> dict[str, Any]:
    """tables/<name> parsed (YAML, which JSON is a subset of), cached. Callers must not mutate the result."""
    import yaml  # PyYAML is a base dependency; imported here so that TABLES_DIR alone costs nothing

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(TABLES_DIR / name, encoding="utf-8") as f:
        return yaml.load(f, Loader=loader)


def models() -> dict[str, dict]:
    return load_table("models.yaml")


def networks() -> dict[str, dict]:
    return load_table("networks.yaml")


def gpus() -> dict[str, dict]:
    return load_table("gpus.yaml")


def hyperparameters() -> dict[str, dict]:
    return load_table("hyperparameters.yaml")


def savers() -> dict[str, Any]:
    return load_table("savers.yaml")
