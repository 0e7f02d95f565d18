"""The model names people type, resolved offline to a catalog entry (planner.architecture.model_source.resolve_model calls this
after the exact catalog names, paths and the local Hugging Face cache have missed).

Rules, tried on the repository part of the name (after the org), each a small function in `RULES`:
    pre-quantized   `-bnb-4bit` / `-unsloth-bnb-4bit` repos hold bitsandbytes NF4 weights: planned as QLoRA
    mirrors         `unsloth/<name>` is the same checkpoint as the original lab's `<name>`
    variants        `-Instruct`, `-it`, `-chat` (and `-Base`, `-pt`), and a trailing release tag (`-2507`), share
                    the base model's architecture
    derived         repositories trained from a catalog base under another name (tables/model_names.yaml)
The hub id typed is kept: the plan names it, and `run` loads it. Nothing here reads the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

from loraplan.tables import load_table

PREQUANTIZED_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit")
# instruct/chat spellings, with the base spelling the catalog may carry in their place
_VARIANT = re.compile(r"-(instruct|it|chat|base|pt)(?=-|$)")
_BASE_SPELLINGS = ("", "-base", "-pt")
_RELEASE_TAG = re.compile(r"-\d{4}$")  # Qwen's -2507, Mistral's -2501: a re-release with the same shapes


@dataclass
class NameMatch:
    """A typed name resolved to catalog entry `key`; `hub_id` is the repository typed (None for a bare name)."""

    key: str
    hub_id: Optional[str]
    notes: list[str] = field(default_factory=list)
    method: Optional[str] = None  # "qlora" when the weights are already 4-bit


def _table() -> dict:
    return load_table("model_names.yaml")


def _split(name: str) -> tuple[str, str]:
    org, sep, repo = name.strip().partition("/")
    return (org.lower(), repo.lower()) if sep else ("", org.lower())


def _variants(repo: str) -> list[str]:
    """The repository name, then its instruct/chat suffix replaced by each base spelling."""
    out = [repo]
    if _VARIANT.search(repo):
        for spelling in _BASE_SPELLINGS:
            cand = _VARIANT.sub(spelling, repo, count=1)
            if cand not in out:
                out.append(cand)
    for cand in list(out):
        untagged = _RELEASE_TAG.sub("", cand)
        if untagged not in out:
            out.append(untagged)
    return out


def resolve_name(name: str, lookup: Callable[[str], Optional[str]], catalog_orgs: set[str]) -> Optional[NameMatch]:
    """The catalog entry `name` stands for, or None. `lookup` is the catalog's exact lookup (keys, aliases, hub ids)."""
    org, repo = _split(name)
    table = _table()
    mirrors, derived = table.get("mirrors") or {}, table.get("derived") or {}
    known_orgs = catalog_orgs | set(mirrors) | {str(e.get("org", "")).lower() for e in derived.values()}
    if org and org not in known_orgs:
        return None  # someone's fine-tune may change the shapes: only the labs and mirrors we know
    notes: list[str] = []
    method = None
    for suffix in PREQUANTIZED_SUFFIXES:
        if repo.endswith(suffix):
            repo, method = repo[: -len(suffix)], "qlora"
            notes.append(f"{name} holds pre-quantized bitsandbytes 4-bit weights: planned as QLoRA (its base weights "
                         "are already NF4; LoRA on 16-bit weights needs the unquantized repository)")
            break
    if org in mirrors:
        notes.append(f"{name} is {mirrors[org]} of {repo}: the same checkpoint and architecture")
    for i, cand in enumerate(_variants(repo)):
        key = lookup(cand) or (lookup(f"{org}/{cand}") if org else None)
        why = None
        if key is None and cand in derived:
            key, why = str(derived[cand]["base"]), str(derived[cand]["source"])
        if key is None:
            continue
        if why:
            notes.append(f"{name}: the architecture of catalog entry {key} ({why})")
        elif i > 0 or method or org in mirrors:
            notes.append(f"{name} resolves to catalog entry {key}"
                         + (": instruct and chat variants share their base model's architecture" if i > 0 else ""))
        return NameMatch(key=key, hub_id=name.strip() if org else None, notes=notes, method=method)
    return None
