"""The memory model against the peak memory measured on an H200 (tables/calibration): every row within 10 %,
the median within 5 %, for both recipes."""

from __future__ import annotations

import statistics

import pytest

from benchmarks.accuracy import evaluate


@pytest.fixture(scope="module")
def rows():
    return evaluate()


@pytest.mark.parametrize("recipe", ["plain", "trl-sft"])
def test_every_row_within_10_percent_and_median_within_5(rows, recipe):
    sub = [r for r in rows if r["recipe"] == recipe]
    assert len(sub) >= 8
    worst = max(sub, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= 0.10, worst
    assert statistics.median(abs(r["error"]) for r in sub) <= 0.05


def test_beats_the_static_tables(rows):
    ours = statistics.median(abs(r["error"]) for r in rows)
    assert ours * 5 < statistics.median(abs(r["static_error"]) for r in rows)
    assert ours * 5 < statistics.median(abs(r["two_bytes_error"]) for r in rows)


def test_weights_match_the_measured_parameter_bytes():
    from benchmarks.calibration import load_rows, row_inputs
    from planner import memory as M

    for row in load_rows():
        if row.get("param_bytes") and row["method"] == "lora":
            arch, sel, shape = row_inputs(row)
            weights = M.loaded_bytes(arch, sel, shape)
            assert weights == row["param_bytes"], row["model"]
