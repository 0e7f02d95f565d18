"""The run summary (`summary.json`), typed: what `run` writes at the end of a run (or when it runs out of memory)
and what the report, the launcher, `benchmarks/gpu_check.py` and scripts read back.

Every key is always present in the file (null when it does not apply: no GPU, not sharded, not resumed, an
out-of-memory run that stopped early); docs/running.md lists them. A summary written by an older loraplan with
fewer keys reads back with the missing ones null; a key this version does not know is an error, so a typo in a
reader cannot go unnoticed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class RunSummary:
    status: str  # completed | interrupted | out_of_memory
    message: Optional[str] = None  # out_of_memory: the one-line error
    method: Optional[str] = None
    strategy: Optional[str] = None
    device: Optional[str] = None  # the GPU's name, or "cpu"
    num_processes: Optional[int] = None
    num_nodes: Optional[int] = None
    machine_rank: Optional[int] = None  # on machine K > 0 of a multi-node run: which machine this summary is for
    # memory, predicted vs observed (GiB)
    predicted_peak_gib: Optional[float] = None
    observed_peak_gib: Optional[float] = None  # max over GPUs; None without a GPU
    observed_peak_gib_per_gpu: Optional[list] = None
    cuda_context_gib: Optional[float] = None
    device_used_gib_end_per_gpu: Optional[list] = None
    margin_gib: Optional[float] = None
    over_prediction: Optional[bool] = None
    cpu_rss_peak_gib: Optional[float] = None
    cpu_rss_peak_gib_per_process: Optional[list] = None
    host_peak_gib: Optional[float] = None  # every process's RSS peak added up
    predicted_host_pinned_gib: Optional[float] = None
    observed_host_pinned_gib: Optional[float] = None
    savers: list = field(default_factory=list)
    local_parameters_gib_per_process: Optional[list] = None  # sharded runs: the parameter bytes each rank holds
    fsdp: Optional[dict] = None  # sharded runs: the FSDP settings the workers trained with
    load_path: Optional[str] = None  # sharded QLoRA: "layer-streamed" or "whole" (executor/fsdp_load.py)
    load_peak_gib_per_process: Optional[list] = None  # layer-streamed: the most model bytes each rank held loading
    load_device_peak_gib_per_gpu: Optional[list] = None  # layer-streamed on GPUs: the allocator's peak by then
    # training
    steps: Optional[int] = None
    max_steps: Optional[int] = None
    resumed_from_step: Optional[int] = None
    logging_steps: Optional[int] = None  # the interval used
    train_loss: Optional[float] = None
    first_loss: Optional[float] = None
    final_loss: Optional[float] = None
    eval_loss: Optional[float] = None
    tokens: Optional[int] = None  # the whole run's, across resumes
    tokens_per_s: Optional[float] = None  # this session's
    predicted_tokens_per_s: Optional[float] = None
    train_s: Optional[float] = None
    wall_s: Optional[float] = None
    truncated_sequences: Optional[int] = None
    dropped_rows: Optional[int] = None
    dataset: Optional[dict] = None  # executor.data.DataReport
    eval_dataset: Optional[dict] = None
    # where things are
    output_dir: Optional[str] = None
    adapter_dir: Optional[str] = None
    last_checkpoint: Optional[str] = None
    plan_file: Optional[str] = None
    metrics_file: Optional[str] = None
    loss_plot: Optional[str] = None  # loss.png (executor/plots.py; needs matplotlib)
    memory_plot: Optional[str] = None  # memory.png: predicted vs observed, on a GPU
    memory_snapshot: Optional[str] = None  # run --memory-snapshot: OUT/memory/peak-rank0.json (what held the peak)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"summary.json has keys this loraplan does not know: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def read(cls, path: str) -> "RunSummary":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
