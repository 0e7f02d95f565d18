"""`--seq-len max`: the longest multiple of 256 that fits, found by the planner with the savers it may use; the
answer fits and one step more does not, and it never shrinks with more card memory, more savers or more host RAM."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from loraplan.cli import main
from loraplan.planner.api import PlanRequest, make_plan

MODEL = "llama-3.1-8b"


def longest(**kw) -> int:
    req = dict(model=MODEL, gpu="rtx-4090", method="qlora", seq_len="max", host_memory="64GiB", fit_table=False)
    req.update(kw)
    res = make_plan(PlanRequest(**req))
    assert res.feasible, res.suggestions
    return res.plan.training.seq_len


def test_the_answer_fits_and_one_step_more_does_not():
    res = make_plan(PlanRequest(model=MODEL, gpu="rtx-4090", method="qlora", seq_len="max", host_memory="64GiB",
                                fit_table=False))
    seq, savers = res.plan.training.seq_len, res.plan.savers
    assert res.feasible and seq % 256 == 0
    assert res.per_gpu_gib <= res.usable_gib
    # the same savers allowed, at a fixed length: the answer fits, 256 tokens more does not
    modes = ",".join(f"{n}={m}" for n, m in res.resolved.savers.items())
    at = dict(model=MODEL, gpu="rtx-4090", method="qlora", host_memory="64GiB", savers=modes, fit_table=False)
    assert make_plan(PlanRequest(seq_len=seq, **at)).feasible
    assert not make_plan(PlanRequest(seq_len=seq + 256, **at)).feasible
    assert "the longest multiple of 256" in res.plan.reasons["seq_len"]
    assert savers.names and savers.pinned_host_gib > 0


def test_savers_at_least_double_the_longest_context_of_a_24_gb_card():
    """The issue's question: Llama-3.1-8B QLoRA on an RTX 4090. Without savers it stops near 23k tokens."""
    plain = longest(savers="none")
    assert 20_480 <= plain < 24_576  # what bisecting --seq-len by hand finds
    with_savers = longest()
    assert with_savers >= 2 * plain


@pytest.mark.parametrize("memory", [[12, 16, 24, 32, 48, 80]])
def test_monotone_in_the_card_memory(memory):
    found = [longest(gpu="custom", gpu_memory=f"{m}GiB") for m in memory]
    assert found == sorted(found) and found[0] < found[-1]


def test_monotone_in_the_savers_allowed():
    chain = ["none", "none,offload-checkpoints=auto", "none,offload-checkpoints=auto,offload-activations=auto",
             "none,offload-checkpoints=auto,offload-activations=auto,mlp-tiling=auto", "auto"]
    found = [longest(savers=s) for s in chain]
    assert found == sorted(found) and found[0] < found[-1]


def test_monotone_in_the_host_memory_and_said_when_the_host_limits_it():
    found = [longest(host_memory=f"{g}GiB") for g in (8, 16, 32, 64, 128)]
    assert found == sorted(found) and found[0] < found[-1]
    res = make_plan(PlanRequest(model=MODEL, gpu="rtx-4090", method="qlora", seq_len="max", host_memory="24GiB",
                                fit_table=False))
    assert res.plan.savers.pinned_host_gib <= 0.6 * 24 + 1e-9  # the host's usable share (tables/savers.yaml)
    assert "not the host" in res.plan.reasons["seq_len"] and "--host-memory" in res.plan.reasons["seq_len"]


def test_capped_at_the_model_context_on_a_card_that_holds_more():
    res = make_plan(PlanRequest(model="qwen2.5-0.5b", gpu="h200", seq_len="max", fit_table=False))
    assert res.feasible and res.plan.training.seq_len == 32768  # its max_position_embeddings
    assert "capped at the model's context" in res.plan.reasons["seq_len"]


def test_json_and_the_fit_table_carry_the_longest_context():
    out = CliRunner().invoke(main, ["plan", MODEL, "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", "max",
                                    "--host-memory", "64GiB", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["training"]["seq_len"] == data["plan"]["training"]["seq_len"] >= 40_000
    assert data["savers"]["seq_len_max"] is True and data["savers"]["host"]["pinned_gib"] > 0
    rows = {row["gpu"]: row for row in data["fit_table"]}
    assert rows["rtx-4090"]["longest_seq_len"] == data["training"]["seq_len"]
    assert rows["h200"]["longest_seq_len"] >= rows["rtx-4090"]["longest_seq_len"] >= rows["t4"]["longest_seq_len"]
    # a fixed --seq-len has no such column
    fixed = json.loads(CliRunner().invoke(main, ["plan", MODEL, "--gpu", "rtx-4090", "--json"]).output)
    assert all("longest_seq_len" not in row and "savers" not in row for row in fixed["fit_table"])


def test_the_table_shows_the_longest_context_the_savers_and_the_host_memory():
    out = CliRunner(env={"COLUMNS": "120"}).invoke(
        main, ["plan", MODEL, "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", "max", "--host-memory", "64GiB"])
    assert out.exit_code == 0, out.output
    text = out.output
    for words in ("longest", "What each saver buys", "pinned_checkpoints", "offload_checkpoints", "FITS: the longest context"):
        assert words in text, words


@pytest.mark.parametrize("columns", [80, 120])
def test_the_longest_context_tables_fit_the_terminal(columns):
    out = CliRunner(env={"COLUMNS": str(columns)}).invoke(
        main, ["plan", MODEL, "--gpu", "rtx-4090", "--method", "qlora", "--seq-len", "max", "--host-memory", "64GiB"])
    assert out.exit_code == 0
    assert "…" not in out.output
    assert not [line for line in out.output.splitlines() if len(line.rstrip()) > columns]
    assert "86,272" in out.output and "rtx-4090" in out.output


@pytest.mark.parametrize("bad, message", [("maxx", "neither a number of tokens nor max"),
                                          ("0", "--seq-len must be a positive integer")])
def test_bad_seq_len_is_one_line_exit_2(bad, message):
    out = CliRunner().invoke(main, ["plan", MODEL, "--gpu", "rtx-4090", "--seq-len", bad])
    assert out.exit_code == 2 and message in out.output and "Traceback" not in out.output
