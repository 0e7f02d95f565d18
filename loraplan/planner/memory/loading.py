"""Loading is a peak of its own: what a rank's GPU and each node's host memory hold while the model is loaded,
before the first step. For sharded plans it can bind before training does.

Read from accelerate 1.15 `utils/fsdp_utils.py::fsdp2_prepare_model`:
- `cpu_ram_efficient_loading` (LoRA): rank 0 of the job loads the full state dict into host memory, the other ranks
  build the model on the meta device; `fully_shard` shards on meta and `fsdp2_load_full_state_dict` broadcasts rank
  0's tensors, each rank keeping its shard. GPU: the shard; host: the whole model on rank 0's node. (Without it
  every rank would read the whole model into host memory: GPUs per node times more, so the plan always uses it.)
- A 4-bit model (QLoRA, bitsandbytes Params4bit) skips accelerate's `cpu_ram_efficient_loading` ("bypassing the
  move to meta will still cause the VRAM spike"). Loaded onto each rank's GPU (what loraplan did before issue 13),
  every rank would first hold the whole quantized model there, then shard it. loraplan loads it into host memory
  instead ("every-rank-host"): every rank quantizes the whole model on the CPU (transformers + bitsandbytes,
  device_map cpu, `bnb_4bit_quant_storage` = the plan's dtype so the packed weights are ordinary floating tensors),
  and `fully_shard` then moves one unit at a time to the rank's GPU and keeps its dim-0 shard (torch 2.13
  `_fully_shard/_fsdp_init.py::_move_states_to_device`, per `fully_shard` call: accelerate wraps the decoder layers
  bottom-up, then the embeddings, the tail and the root). GPU: the shards made so far (none under offload: they go
  back to the host) plus the one unit in flight; host: the whole 4-bit model per rank on the node, plus the one
  bf16 tensor being quantized. (Rank 0 loading alone and broadcasting into meta-built ranks, torch's
  `set_model_state_dict(broadcast_from_rank0=True)`, would cut the host's share to one copy per node: not run yet.)
- Single-GPU and DDP plans load the model they train: the weights of the training budget, on each GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..architecture.types import Architecture
from ..facts.options import DTYPE_BYTES
from . import terms as memory
from .sharding import layer_weight_bytes

GIB = 2**30


@dataclass(frozen=True)
class LoadPeak:
    mode: str  # "replica" | "rank0-host" (cpu_ram_efficient_loading) | "every-rank-host" (QLoRA under FSDP2)
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


def in_flight_bytes(arch: Architecture, shape: memory.MicroStep) -> float:
    """The one FSDP unit a rank's GPU holds whole while `fully_shard` moves it there and shards it: the largest of
    a decoder layer as stored (W_layer, planner.memory.sharding) and the embeddings or the LM head in dtype:
    max(W_layer, dtype x max(V x h, lm_head))."""
    dt = DTYPE_BYTES[shape.dtype]
    return max(layer_weight_bytes(arch, shape), dt * max(arch.embedding_params, arch.lm_head_params))


def load_peak(arch: Architecture, shape: memory.MicroStep, sharded: bool, offload: bool, world: int,
              runtime_gib: float, gpus_per_node: int = 1) -> LoadPeak:
    """The load peak of a plan. `runtime_gib` is the CUDA context and misc a process holds from the start;
    `gpus_per_node` the ranks that share one node's host memory."""
    w = weights_bytes(arch, shape) / GIB
    if not sharded:
        return LoadPeak("replica", w + runtime_gib, 0.0, False, "each GPU loads the whole model it trains")
    if shape.method == "qlora":
        # GPU: W_4bit / N (0 under offload) + the unit in flight + runtime
        # host (the node): GPUs per node x (W_4bit + the largest tensor in dtype)
        shard_gpu = 0.0 if offload else w / world
        gpu = shard_gpu + in_flight_bytes(arch, shape) / GIB + runtime_gib
        host = gpus_per_node * (w + largest_tensor_bytes(arch, shape) / GIB)
        return LoadPeak("every-rank-host", gpu, host, False,
                        "4-bit weights quantized into host memory by every rank, then moved to its GPU one FSDP unit "
                        "at a time by fully_shard, which keeps the rank's shard")
    full = full_precision_bytes(arch, shape) / GIB
    shard_gpu = 0.0 if offload else w / world
    return LoadPeak("rank0-host", shard_gpu + runtime_gib, full, True,
                    "cpu_ram_efficient_loading: rank 0 reads the checkpoint into host memory, the others start on the "
                    "meta device and receive their shards")
