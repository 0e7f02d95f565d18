"""Finding what the user named in a catalog table (tables/*.yaml), and the closest names when it is not there."""

from __future__ import annotations

import difflib
from typing import Optional


def find_name(table: dict[str, dict], name: str) -> Optional[str]:
    key = name.strip().lower()
    if key in table:
        return key
    for k, entry in table.items():
        if key in [a.lower() for a in entry.get("aliases") or []]:
            return k
        if key == str(entry.get("hub_id", "")).lower():
            return k
    return None


def closest_names(table: dict[str, dict], name: str) -> str:
    names = list(table) + [a for e in table.values() for a in e.get("aliases") or []]
    close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
    if not close:
        close = [n for n in table if name.lower().split("-")[0] in n][:3]
    return f"; did you mean {', '.join(close)}?" if close else ""
