"""`run --memory-snapshot`: what held the memory at a run's peak (executor/memory_snapshot.py).

The GPU path (torch.cuda.memory's allocator history) needs a GPU (benchmarks/gpu_check.py runs it there). Here: the
peak analysis on a real snapshot, made by torch's own converter from a CPU profile of a real LoRA step
(torch.cuda._memory_viz._profile_to_snapshot, the same dict a CUDA snapshot is), against the profiler's own live-bytes
peak; and the flag's refusals on the CPU, in one line, before anything is written."""

from __future__ import annotations

import pytest

from conftest import one_line_error, requires_run

from loraplan.executor import memory_snapshot as ms


def _profiled_step(vocab: int):
    """A real forward + backward of a tiny LoRA Llama under torch's profiler, and its snapshot dict."""
    import sys
    from pathlib import Path

    import torch
    from torch.cuda._memory_viz import _profile_to_snapshot
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import saved_tensors as st  # the saved-tensor counts' tiny models

    torch.manual_seed(0)
    d = st.Dims(hidden=128, intermediate=512, heads=4, kv_heads=2, vocab=vocab)
    model = st._model(d, 2, st.Case())
    ids = torch.randint(3, vocab, (2, 128))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return prof, _profile_to_snapshot(prof)


@requires_run
def test_the_peak_and_what_held_it_from_a_real_step():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from step_peaks import _live_peak  # the profiler's own timeline, replayed independently

    prof, snap = _profiled_step(vocab=8192)
    cpu = len(snap["device_traces"]) - 1  # the converter puts the CPU after the CUDA devices
    peak = ms.peak_breakdown(snap, cpu, before_bytes=1000)
    assert peak["trace_peak_bytes"] == _live_peak(prof)  # the same peak as torch's memory profile
    assert peak["peak_bytes"] == peak["trace_peak_bytes"] + 1000
    assert sum(g["bytes"] for g in peak["groups"]) == peak["peak_bytes"]  # every live byte is in one group
    assert {"where": ms.BEFORE, "bytes": 1000, "blocks": None} in peak["groups"]
    by = {g["where"]: g["bytes"] for g in peak["groups"]}
    # at this step's peak (the logits' backward: 2 x 128 tokens x 8,192 logits) the loss's fp32 tensors lead, and
    # the LoRA inputs peft saved in the forward are still alive
    tokens_logits = 2 * 128 * 8192
    loss_bytes = by.get(ms.BACKWARD, 0) + by.get("transformers/loss/loss_utils.py:fixed_cross_entropy", 0)
    assert loss_bytes >= 2 * 4 * tokens_logits, by
    assert by.get("peft/tuners/lora/layer.py:forward", 0) > 0, by
    assert peak["largest_blocks"][0]["bytes"] >= 4 * tokens_logits  # one fp32 logits-sized block
    assert not peak["truncated"]
    # a history that records only free requests (no completions) replays to the same peak
    requests_only = {"device_traces": [[e for e in snap["device_traces"][cpu] if e["action"] != "free_completed"]]}
    assert ms.peak_breakdown(requests_only, 0)["trace_peak_bytes"] == peak["trace_peak_bytes"]


def test_a_blocks_group_is_the_innermost_frame_of_the_code_the_plan_models():
    cuda_frames = [  # as torch records them, innermost first
        {"filename": "/site-packages/torch/nn/functional.py", "line": 2000, "name": "linear"},
        {"filename": "/site-packages/peft/tuners/lora/layer.py", "line": 800, "name": "forward"},
        {"filename": "/site-packages/torch/nn/modules/module.py", "line": 1782, "name": "_call_impl"},
        {"filename": "/site-packages/transformers/models/llama/modeling_llama.py", "line": 100, "name": "forward"},
    ]
    assert ms._where(cuda_frames) == "peft/tuners/lora/layer.py:forward"
    assert ms._where([]) == ms.NO_FRAME
    assert ms._where([{"filename": "/x/torch/autograd/__init__.py", "line": 1, "name": "backward"}]) == ms.BACKWARD
    profiled = [{"filename": "none", "line": 0, "name": "trl/kernels/chunked_logprob.py(377): forward"}]
    assert ms._where(profiled) == "trl/kernels/chunked_logprob.py:forward"


def test_the_steps_come_from_the_environment(monkeypatch):
    for value, steps in (("", 0), ("3", 3), ("10", 10), ("0", 0), ("true", ms.DEFAULT_STEPS), ("junk", 0)):
        monkeypatch.setenv(ms.ENV, value)
        assert ms.requested_steps() == steps, value


@requires_run
def test_memory_snapshot_on_the_cpu_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, cli_run):
    from conftest import build_plan, data_file, write_plan

    out = tmp_path / "out"
    path = write_plan(build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(out), max_steps=2),
                      tmp_path / "plan.yaml")
    one_line_error(cli_run(path, "--memory-snapshot"), 2, "--memory-snapshot records the GPU's caching allocator")
    one_line_error(cli_run("--demo", "--output-dir", str(tmp_path / "demo"), "--memory-snapshot", "2"), 2,
                   "this run trains on the CPU")
    assert not out.exists() and not (tmp_path / "demo").exists()
    result = cli_run(path, "--memory-snapshot", "0")
    assert result.exit_code == 2 and "--memory-snapshot" in result.output  # at least one step


@requires_run
def test_the_python_api_refuses_a_negative_step_count(tiny_model_dir, tmp_path):
    import loraplan
    from conftest import build_plan, data_file

    plan = build_plan(tiny_model_dir, data_file("instruction.jsonl"), str(tmp_path / "out"), max_steps=2)
    with pytest.raises(loraplan.LoraplanError, match="takes a number of steps"):
        loraplan.run(plan, memory_snapshot=-1, console=None)
    assert ms.ENV not in __import__("os").environ
