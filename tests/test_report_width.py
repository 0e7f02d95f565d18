"""The rich tables of `plan`, `models` and `gpus` never cut what a user needs: in an 80-column terminal, piped
into a file or a log (not a terminal), or narrower still, every model name, card key and number appears whole
and no cell ends in an ellipsis. And the fit table never shows a card that does not fit with positive headroom."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loraplan.cli import main
from loraplan.tables import gpus, models

ROOT = Path(__file__).resolve().parents[1]

PLANS = {
    "dense": ["plan", "llama-3.1-8b", "--gpu", "rtx-4090", "--seq-len", "4096"],
    "moe": ["plan", "qwen3-30b-a3b", "--gpu", "rtx-4090"],
    "infeasible": ["plan", "llama-3.1-70b", "--gpu", "rtx-4090"],
}


def cli(args: list[str], columns: int | None) -> str:
    """The command's output as a user piping it would get it (CliRunner's stdout is not a terminal)."""
    res = CliRunner(env={"COLUMNS": str(columns) if columns else None}).invoke(main, args)
    assert res.exit_code in (0, 1), res.output
    return res.output


def whole(word: str, text: str) -> bool:
    """`word` appears as a token of its own, not as the start or a piece of a longer or cut name."""
    return re.search(rf"(?<![\w.-]){re.escape(word)}(?![\w.-])", text) is not None


def plan_json(args: list[str]) -> dict:
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code in (0, 1), res.output
    return json.loads(res.output)


def assert_nothing_cut(out: str, width: int) -> None:
    assert "…" not in out, out
    too_wide = [line for line in out.splitlines() if len(line.rstrip()) > width]
    assert not too_wide, "\n".join(too_wide)


@pytest.mark.parametrize("columns", [80, None])  # None: not a terminal and no $COLUMNS, so 120
@pytest.mark.parametrize("kind", sorted(PLANS))
def test_plan_tables_keep_names_and_numbers_whole(kind, columns):
    out = cli(PLANS[kind], columns)
    assert_nothing_cut(out, columns or 120)
    data = plan_json(PLANS[kind])
    assert whole(f"{data['adapter']['trainable_params']:,}", out)  # e.g. 41,943,040 for Llama-3.1-8B at r=16
    for key in gpus():  # the fit table names every card of the catalog
        assert whole(key, out), key
    for row in data["fit_table"]:
        assert whole(f"{row['per_gpu_gib']:.1f}", out), row["gpu"]


def test_llama_trainable_count_from_the_issue_is_whole_at_80_columns():
    out = cli(PLANS["dense"], 80)
    assert whole("41,943,040", out)
    for line in out.splitlines():  # the adapter table: every per-module count whole on its row
        if line.split()[:1] in (["q_proj"], ["k_proj"], ["gate_proj"], ["down_proj"]):
            assert re.search(r"\b32\s+\d{2,3},\d{3}\s+\d+\.\d+ %\s+\d{1,3},\d{3},\d{3}\s+\d\.\d{3} %$", line), line


@pytest.mark.parametrize("columns", [80, None])
def test_models_table_shows_every_name_and_hub_id_whole(columns):
    out = cli(["models"], columns)
    assert_nothing_cut(out, columns or 120)
    for name, entry in models().items():
        assert whole(name, out), name
        assert whole(entry["hub_id"], out), entry["hub_id"]
    if columns == 80:  # fewer columns rather than cut ones, and it says where the rest are
        assert "layers" not in out.splitlines()[1] and "loraplan models --json" in out
    else:
        assert "layers" in out and "hidden" in out


@pytest.mark.parametrize("columns", [80, None])
def test_gpus_table_shows_every_card_whole(columns):
    out = cli(["gpus"], columns)
    assert_nothing_cut(out, columns or 120)
    for key, entry in gpus().items():
        assert whole(key, out), key
        assert whole(f"{entry['memory_gib']:.2f}", out), key


def test_narrower_than_the_tables_still_cuts_nothing():
    # below what the key columns need, lines run past the edge rather than losing characters
    out = cli(PLANS["infeasible"], 50)
    assert "…" not in out
    for key in gpus():
        assert whole(key, out), key
    assert whole(f"{plan_json(PLANS['infeasible'])['adapter']['trainable_params']:,}", out)


def test_piped_output_is_120_columns_wide_not_80():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-m", "loraplan.cli", "models"], capture_output=True, text=True, env=env,
                         cwd=ROOT, check=True)
    widest = max(len(line.rstrip()) for line in res.stdout.splitlines())
    assert 80 < widest <= 120  # the full table (layers, hidden) in a log, which 80 columns cannot hold
    assert "layers" in res.stdout and "…" not in res.stdout


def _row(out: str, gpu: str) -> str:
    return next(line for line in out.splitlines() if line.split()[:1] == [gpu])


def test_a_card_that_does_not_fit_shows_its_shortfall_not_headroom():
    data = plan_json(PLANS["infeasible"])
    out = cli(PLANS["infeasible"], 80)
    margin = data["memory"]["safety_margin"]
    a6000 = next(r for r in data["fit_table"] if r["gpu"] == "rtx-a6000")
    # the case from the issue: less peak than memory, so memory - peak is positive, yet it does not fit
    assert not a6000["fits"] and a6000["headroom_gib"] > 0
    for row in data["fit_table"]:
        line = _row(out, row["gpu"])
        if row["fits"]:
            assert " yes " in line and whole(f"{row['headroom_gib']:.1f}", line), line
        else:
            short = row["per_gpu_gib"] - row["memory_gib"] * (1 - margin)
            assert short > 0 and " no " in line and f"short {short:.1f}" in line, line
    assert "short: GiB over the usable memory" in " ".join(out.split())


def test_infeasible_plan_does_not_title_its_decision_as_one():
    out = cli(PLANS["infeasible"], None)
    assert "Closest configuration tried (does not fit)" in out
    assert not any(line.strip() == "Decision" for line in out.splitlines())
    usable = plan_json(PLANS["infeasible"])["memory"]["usable_gib"]
    short = next(line for line in out.splitlines() if line.startswith("short "))
    assert f"over the usable {usable:.1f} GiB" in short
    assert not any(line.startswith("headroom ") for line in out.splitlines())

    fits = cli(PLANS["dense"], None)
    assert any(line.strip() == "Decision" for line in fits.splitlines())
    assert any(line.startswith("headroom ") for line in fits.splitlines())


def test_json_keys_of_the_fit_table_are_unchanged():
    row = plan_json(PLANS["infeasible"])["fit_table"][0]
    assert {"gpu", "name", "memory_gib", "fits", "method", "micro_batch_size", "grad_checkpointing", "per_gpu_gib",
            "headroom_gib", "tokens_per_s"} <= set(row)
