"""Refactors keep the numbers: every calibration row and catalog model plans exactly as when the golden file was
written (tests/golden/plans.json, by `python tests/golden/make_golden.py` at the commit it names)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

from make_golden import compute  # noqa: E402

CASES = json.loads((GOLDEN / "plans.json").read_text(encoding="utf-8"))["cases"]


def _diff(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: missing now" for k in set(a) - set(b)]  # new keys are additions, allowed
        for k in sorted(set(a) & set(b)):
            out += _diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} items, now {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{where}: {a} -> {b}"]
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


@pytest.mark.parametrize("entry", CASES, ids=[c["case"]["id"] for c in CASES])
def test_plan_numbers_unchanged(entry):
    diffs = _diff(entry["numbers"], compute(entry["case"]))
    assert not diffs, "\n".join(diffs[:20])
