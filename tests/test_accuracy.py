"""The memory model against the peak memory measured on an H200 (tables/calibration): no row planned more than
10 % too low, none more than 12 % too high, the median within 5 %, for both recipes."""

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
    low = min(sub, key=lambda r: r["error"])
    assert low["error"] >= -0.10, low  # planned too low: the dangerous direction
    high = max(sub, key=lambda r: r["error"])
    # 12 %: Llama-3.2-1B's trl row at 2 x 1,024 without checkpointing (+11.8 %) measured less than the tensors
    # its forward saves (counted, and the same through trl as in a plain call: docs/accuracy.md, issue 15)
    assert high["error"] <= 0.12, high
    assert statistics.median(abs(r["error"]) for r in sub) <= 0.05


def test_beats_the_static_tables(rows):
    ours = statistics.median(abs(r["error"]) for r in rows)
    assert ours * 5 < statistics.median(abs(r["static_error"]) for r in rows)
    assert ours * 5 < statistics.median(abs(r["two_bytes_error"]) for r in rows)


def test_weights_match_the_measured_parameter_bytes():
    from benchmarks.calibration import load_rows, row_inputs
    from loraplan.planner.memory import terms as memory

    for row in load_rows():
        if row.get("param_bytes") and row["method"] == "lora":
            arch, sel, shape = row_inputs(row)
            weights = memory.loaded_bytes(arch, sel, shape)
            assert weights == row["param_bytes"], row["model"]


# Leave one architecture out (benchmarks/accuracy.py --held-out): the coefficients refitted on the other
# architectures' rows predict the left-out one's. Today: median 1.7 %, worst 14.1 %, an under-prediction
# (Qwen2.5-0.5B's plain QLoRA row at 512 tokens); the README quotes these beside the in-sample figures.
HELD_OUT_WORST, HELD_OUT_MEDIAN, HELD_OUT_WORST_UNDER = 0.15, 0.02, -0.15


def test_held_out_architectures_within_the_quoted_bound():
    pytest.importorskip("scipy", reason="the held-out refit is benchmarks/fit_memory.py's nnls: scipy ([dev] extra)")
    from benchmarks.accuracy import held_out
    from loraplan.tables import TABLES_DIR

    before = (TABLES_DIR / "memory.yaml").read_bytes()
    rows = held_out()
    assert (TABLES_DIR / "memory.yaml").read_bytes() == before  # refits in memory, never writes the table
    assert {r["held_out"] for r in rows} == {"llama-3.1-8b", "llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-14b"}
    assert len(rows) == len(evaluate())  # every row predicted once, by the fit that did not see its architecture
    worst = max(rows, key=lambda r: abs(r["error"]))
    assert abs(worst["error"]) <= HELD_OUT_WORST, worst
    assert min(r["error"] for r in rows) >= HELD_OUT_WORST_UNDER  # planned too low: the dangerous direction
    assert statistics.median(abs(r["error"]) for r in rows) <= HELD_OUT_MEDIAN
    # a real refit: predictions move away from the in-sample fit's, and the planner's own table is back in use
    in_sample = {(r["recipe"], r["model"], r["method"], r["batch"], r["seq"], r["grad_ckpt"]): r["predicted"]
                 for r in evaluate()}
    moved = [r for r in rows if abs(r["predicted"] - in_sample[(r["recipe"], r["model"], r["method"], r["batch"],
                                                                 r["seq"], r["grad_ckpt"])]) > 0.01]
    assert len(moved) > len(rows) // 2
