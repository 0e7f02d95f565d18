"""The planner's activation terms against the bytes autograd saves, counted on the CPU (benchmarks/saved_tensors.py).

For every combination of targets (all seven, q,v, the MLP), dropout (0, 0.05), checkpointing (off, on: every layer,
every 2nd layer, every layer offloaded), LoRA or QLoRA, on two widths, per token:

- without checkpointing, what one decoder layer saves equals planner/memory/terms.py's X
  (`layer_activation_bytes_per_token` for the same shape, targets and dropout) within TOLERANCE;
- with checkpointing, what a layer keeps across the forward equals dtype x h (checkpointed_inputs per layer and
  token), the largest recompute frame equals X, and with layer_checkpointing the layers that are not checkpointed
  keep X, all within TOLERANCE;
- with the offload, everything a layer keeps moves (the counting hook in save_on_cpu's place sees it all), and the
  planner keeps none of it on the GPU.

TOLERANCE: 1 % beyond what the planner leaves out on purpose, per token and layer a few scalars (`left_out`): the
two RMSNorms' fp32 rsqrt (4 B each), sdpa's fp32 logsumexp (4 B per head) and, inside a recomputed checkpoint,
rotary's bf16 cos and sin (2 x 2 B x head_dim); at h = 64 they are 1-3 % of X, at h = 4096 under 0.1 %.
"""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks import saved_tensors as ST
from conftest import requires_run
from loraplan.planner.architecture import families
from loraplan.planner.memory import terms as memory

pytestmark = requires_run  # autograd's saved tensors are counted with torch, peft and bitsandbytes

TOLERANCE = 0.01
SEQ = 32  # the counts' sequence lengths are 32 and 64; X depends on it only under eager attention


def planner_inputs(d: ST.Dims, case: ST.Case, layers: int = 2):
    config = ST._config(d, layers).to_dict()
    arch = families.from_config(config)
    shape = memory.MicroStep(method=case.method, rank=ST.R, micro_batch_size=2, seq_len=SEQ,
                    grad_checkpointing=case.checkpointing, loss="full", device="cpu",
                    targets=ST.TARGETS[case.targets], lora_dropout=case.dropout > 0,
                    adapter_dtype=case.adapter_dtype)
    if case.saver == "layer_checkpointing":
        shape = dataclasses.replace(shape, every_n_layers=ST.EVERY_N[case.saver])
    if case.saver == "offload_checkpoints":
        shape = dataclasses.replace(shape, checkpoints_offloaded=True, offload_resident_inputs=1)
    return arch, shape


@pytest.fixture(scope="module")
def counts():
    import torch

    torch.set_num_threads(1)
    out = {}
    for d in ST.DIMS:
        for case in ST.cases():
            if d != ST.DIMS[0] and case.checkpointing and case.method == "qlora":
                continue  # the second width separates h from i; checkpointing with QLoRA is covered at the first
            out[(d, case)] = ST.count(d, case)
    return out


def left_out(d: ST.Dims, recompute: bool = False) -> float:
    return 2 * 4 + 4 * d.heads + (2 * 2 * (d.hidden // d.heads) if recompute else 0)


def close(counted: float, planned: float, slack: float = 0.0) -> bool:
    return abs(counted - planned) <= TOLERANCE * planned + slack


def test_every_combination_is_counted(counts):
    cases = {c for _, c in counts}
    assert cases == set(ST.cases())
    assert {c.targets for c in cases} == set(ST.TARGETS) and {c.dropout for c in cases} == {0.0, 0.05}
    assert {c.saver for c in cases} == set(ST.SAVERS) and {c.method for c in cases} == {"lora", "qlora"}


def test_a_layer_saves_what_the_planner_plans(counts):
    bad = []
    for (d, case), c in counts.items():
        if case.checkpointing:
            continue
        arch, shape = planner_inputs(d, case)
        x = memory.layer_activation_bytes_per_token(arch, SEQ, shape)
        if not close(c.layer, x, left_out(d)):
            bad.append((d.hidden, case, c.layer, x))
    assert not bad


def test_targets_and_dropout_change_what_is_saved_as_planned(counts):
    d = ST.DIMS[1]
    base = counts[(d, ST.Case())].layer
    no_dropout = counts[(d, ST.Case(dropout=0.0))].layer
    qv = counts[(d, ST.Case("qv", 0.0))].layer
    # dropout 0: one mask byte per adapted input element less (q, k, v, o, gate, up: h wide; down: i wide)
    assert base - no_dropout == 6 * d.hidden + d.intermediate
    # q,v only without dropout: the copies of k, o, gate, up (h wide) and down (i wide) and 5 rank-r outputs go
    assert no_dropout - qv == 2 * (4 * d.hidden + d.intermediate) + 5 * 2 * ST.R


def test_bf16_adapters_share_their_inputs_without_dropout(counts):
    """trl's bf16 cast of QLoRA adapters: with dropout the same bytes as fp32 adapters (the dropout output is each
    projection's own); with dropout 0 lora_A saves its input itself, so q, k, v share one copy, gate and up one, and
    o's input is sdpa's saved output: 8 h less per layer for all seven targets."""
    for d in ST.DIMS:
        fp32, bf16 = (counts[(d, ST.Case("all", 0.0, False, "qlora", "none", a))].layer for a in ("float32", "bfloat16"))
        assert fp32 - bf16 == 8 * d.hidden
        fp32, bf16 = (counts[(d, ST.Case("all", 0.05, False, "qlora", "none", a))].layer for a in ("float32", "bfloat16"))
        assert fp32 == bf16


def test_checkpointing_keeps_the_layer_inputs_and_recomputes_one_layer(counts):
    bad = []
    for (d, case), c in counts.items():
        if not case.checkpointing:
            continue
        arch, shape = planner_inputs(d, case)
        x = memory.layer_activation_bytes_per_token(arch, SEQ, shape)
        dt = memory.DTYPE_BYTES[shape.dtype]
        if case.saver == "layer_checkpointing":
            # layers 2 and 4: every other layer keeps dt x h, the others X (per layer, on average)
            planned, slack = (dt * d.hidden + x) / 2, left_out(d) / 2
        else:
            slack = 0.0
            planned = dt * d.hidden
            full = memory.checkpointed_inputs_bytes(arch, dataclasses.replace(shape, checkpoints_offloaded=False))
            assert full / (arch.num_layers * shape.tokens) == planned
            if not close(c.recompute, x, left_out(d, recompute=True)):
                bad.append(("recompute", d.hidden, case, c.recompute, x))
        if not close(c.kept, planned, slack):
            bad.append(("kept", d.hidden, case, c.kept, planned))
    assert not bad


def test_the_offload_moves_everything_a_layer_keeps(counts):
    offloaded = [(d, case, c) for (d, case), c in counts.items() if case.saver == "offload_checkpoints"]
    assert offloaded
    for d, case, c in offloaded:
        assert c.moved == c.kept == memory.DTYPE_BYTES["bfloat16"] * d.hidden
        arch, shape = planner_inputs(d, case)
        assert memory.checkpointed_inputs_bytes(arch, shape) == 0  # what stays: nothing of the checkpoints
