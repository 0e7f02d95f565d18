"""Sharded plans against published FSDP LoRA/QLoRA measurements (tables/published_fsdp.yaml, docs/accuracy.md):
every row plans, says what the docs quote it says, and stays within the tolerance its row states and justifies."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import published as P

ROOT = Path(__file__).resolve().parents[1]
TABLE = P.load_table()
ROWS = TABLE["rows"]
HELD = [r["id"] for r in ROWS if r.get("tolerance") is not None]
SETUP_KEYS = {"model", "cards", "stack", "lora", "seq_len", "micro_batch", "grad_checkpointing", "offload", "optimizer"}


@pytest.fixture(scope="module")
def compared() -> dict[str, P.Compared]:
    return {c.row["id"]: c for c in P.evaluate()}


def test_every_row_states_its_source_and_setup():
    assert len(ROWS) >= 3
    assert len({r["id"] for r in ROWS}) == len(ROWS)
    assert len({r["source"].split(",")[0] for r in ROWS}) >= 3  # at least three publishers
    for r in ROWS:
        assert r["url"].startswith("https://"), r["id"]
        assert SETUP_KEYS <= set(r["setup"]), (r["id"], SETUP_KEYS - set(r["setup"]))
        assert r["plan"]["strategy"] in ("fsdp", "fsdp-offload"), r["id"]
        assert r["plan"]["method"] in ("lora", "qlora"), r["id"]
        pub = r["published"]
        assert pub["per_gpu"] > 0 and pub["unit"] in P.UNITS, r["id"]
        P.measure_of(pub)  # a stated measure, or compare_as when the source does not say
        assert r["differences"] and r["tolerance_why"], r["id"]
        tol = r.get("tolerance")
        assert tol is None or 0 < tol < 1, r["id"]


def test_every_row_plans(compared):
    assert set(compared) == {r["id"] for r in ROWS}
    for rid, c in compared.items():
        assert c.planned_gib > 0 and c.peak_gib >= c.planned_gib, rid
        assert c.terms["cuda_context"] > 0, rid  # planned for the card named, not for this machine's CPU


@pytest.mark.parametrize("row_id", HELD)
def test_planned_within_the_rows_tolerance(compared, row_id):
    c = compared[row_id]
    assert c.within, f"{row_id}: planned {c.planned_gib:.2f} GiB vs published {c.published_gib:.2f} ({c.error:+.1%}, " \
                     f"tolerance {c.tolerance:.0%})"


@pytest.mark.parametrize("row_id", HELD)
def test_the_tolerance_tells_a_sharded_plan_from_a_replica(row_id):
    """The bound means something: the same row planned as a whole replica per GPU (DDP) falls outside it."""
    row = copy.deepcopy(next(r for r in ROWS if r["id"] == row_id))
    row["plan"]["strategy"] = "ddp"
    with P.model_files(TABLE["models"]) as paths:
        c = P.compare(row, paths)
    assert abs(c.error) > row["tolerance"], f"{row_id}: an unsharded plan is {c.error:+.1%}, inside the tolerance"


def test_plan_says_what_the_docs_quote(compared):
    for rid, c in compared.items():
        assert P.verdict(c) == c.row["plan_says"], rid


def test_figures_are_put_in_the_published_measures_terms(compared):
    c = compared["answerai-7b-lora-512"]
    terms = c.terms
    assert P.planned_as(terms, "nvidia-smi") == pytest.approx(c.peak_gib)
    assert P.planned_as(terms, "nvidia-smi") - P.planned_as(terms, "reserved") == pytest.approx(terms["cuda_context"])
    assert P.planned_as(terms, "reserved") - P.planned_as(terms, "allocated") == pytest.approx(terms["allocator_reserve"])
    assert P.to_gib(22, "GB") == pytest.approx(22e9 / 2**30)
    with pytest.raises(ValueError):
        P.to_gib(1, "MB")


def test_docs_quote_the_figures_the_script_prints(compared, capsys):
    """docs/accuracy.md's table is the script's: a change to the plan's figures shows up as a stale doc."""
    text = (ROOT / "docs" / "accuracy.md").read_text(encoding="utf-8")
    section = text[text.index("## Sharded plans against published measurements"):]
    assert "python benchmarks/published.py --markdown" in section
    P.print_markdown(list(compared.values()))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| [")]
    assert len(table) == len(ROWS)
    stale = [line.split(")")[0] for line in table if line not in section]
    assert not stale, f"docs/accuracy.md quotes other figures for {stale}: paste `python benchmarks/published.py --markdown`"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "published.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)


def test_script_prints_each_row_and_an_unknown_row_is_a_one_line_error():
    out = _run()
    assert out.returncode == 0, out.stderr
    for r in ROWS:
        assert r["id"] in out.stdout
    bad = _run("--plan", "no-such-row")
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "no row 'no-such-row'" in bad.stderr
    assert "Traceback" not in bad.stderr
