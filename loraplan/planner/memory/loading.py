"""Loading is a peak of its own: what a rank's GPU and each node's host memory hold while the model is loaded,
before the first step. For sharded plans it can bind before training does.

Read from accelerate 1.15 `utils/fsdp_utils.py::fsdp2_prepare_model`:
- `cpu_ram_efficient_loading` (LoRA): rank 0 of the job loads the full state dict into host memory, the other ranks
  build the model on the meta device; `fully_shard` shards on meta and `fsdp2_load_full_state_dict` broadcasts rank
  0's tensors, each rank keeping its shard. GPU: the shard; host: the whole model on rank 0's node. (Without it
  every rank would read the whole model into host memory: GPUs per node times more, so the plan always uses it.)
- A 4-bit model (QLoRA, bitsandbytes Params4bit) skips `cpu_ram_efficient_loading` ("bypassing the move to meta will
  still cause the VRAM spike"): transformers quantizes while loading onto each rank's GPU, so every rank first holds
  the whole quantized model on its GPU, then shards it.
- Single-GPU and DDP plans load the model they train: the weights of the training budget, on each GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..architecture.types import Architecture
from ..facts.options import DTYPE_BYTES
from . import terms as memory

GIB = 2**30


@dataclass(frozen=True)
class LoadPeak:
    mode: str  # "replica" | "rank0-host" (cpu_ram_efficient_loading) | "every-rank-gpu" (4-bit under FSDP2)
    gpu_gib: float  # per GPU, at the load's peak (context included)
    host_gib: float  # on the busiest node's host memory
    cpu_ram_efficient_loading: bool
    note: str


def weights_bytes(arch: Architecture, shape: memory.MicroStep) -> float:
    """The model's weights as the plan stores them: projections (NF4 under QLoRA) + constants + unquantized modules."""
    return (memory.base_weights_bytes(arch, shape) + memory.quant_constants_bytes(arch, shape)
            + memory.unquantized_modules_bytes(arch, shape))


def full_precision_bytes(arch: Architecture, shape: memory.MicroStep) -> float:
    """The checkpoint as loaded into host memory before any quantization: dtype x every parameter."""
    return DTYPE_BYTES[shape.dtype] * arch.total_params


def largest_tensor_bytes(arch: Architecture, shape: memory.MicroStep) -> float:
    """The largest single weight (the embeddings or one fused expert tensor), in dtype: what quantizing on the GPU
    holds beside the 4-bit weights as it goes."""
    dt = DTYPE_BYTES[shape.dtype]
    per_proj = max((p.weight_params // max(p.count, 1) for p in arch.projections), default=0)
    return dt * max(arch.embedding_params, per_proj)


def load_peak(arch: Architecture, shape: memory.MicroStep, sharded: bool, offload: bool, world: int,
              runtime_gib: float) -> LoadPeak:
    """The load peak of a plan. `runtime_gib` is the CUDA context and misc a process holds from the start."""
    w = weights_bytes(arch, shape) / GIB
    if not sharded:
        return LoadPeak("replica", w + runtime_gib, 0.0, False, "each GPU loads the whole model it trains")
    if shape.method == "qlora":
        gpu = w + largest_tensor_bytes(arch, shape) / GIB + runtime_gib
        return LoadPeak("every-rank-gpu", gpu, 0.0, False,
                        "4-bit weights: accelerate's FSDP2 path skips cpu_ram_efficient_loading, so every rank first "
                        "quantizes the whole model onto its own GPU, then shards it")
    full = full_precision_bytes(arch, shape) / GIB
    shard_gpu = 0.0 if offload else w / world
    return LoadPeak("rank0-host", shard_gpu + runtime_gib, full, True,
                    "cpu_ram_efficient_loading: rank 0 reads the checkpoint into host memory, the others start on the "
                    "meta device and receive their shards")
