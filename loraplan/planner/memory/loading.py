"""Loading is a peak of its own: what a rank's GPU and each node's host memory hold while the model is loaded,
before the first step. For sharded plans it can bind before training does.

Read from accelerate 1.15 `utils/fsdp_utils.py::fsdp2_prepare_model`:
- `cpu_ram_efficient_loading` (LoRA): rank 0 of the job loads the full state dict into host memory, the other ranks
  build the model on the meta device; `fully_shard` shards on meta and `fsdp2_load_full_state_dict` broadcasts rank
  0's tensors, each rank keeping its shard. GPU: the shard; host: the whole model on rank 0's node. (Without it
  every rank would read the whole model into host memory: GPUs per node times more, so the plan always uses it.)
- A 4-bit model (QLoRA, bitsandbytes Params4bit) skips accelerate's `cpu_ram_efficient_loading` ("bypassing the
  move to meta will still cause the VRAM spike"), and torch's `set_model_state_dict(broadcast_from_rank0=True)`
  would not carry the quantization constants (they live in each weight's quant_state, outside the state dict).
  loraplan loads it "layer-streamed" (executor/fsdp_load.py): every rank builds the model on the meta device,
  then, one FSDP unit at a time in accelerate's order (decoder layers, embeddings, tail, root), reads the unit's
  tensors from the safetensors checkpoint (memory-mapped, one at a time), quantizes each 4-bit weight on its GPU
  (bitsandbytes, `bnb_4bit_quant_storage` = a floating dtype so the packed weights shard as ordinary tensors) and
  calls `fully_shard`, which keeps the rank's dim-0 shard and frees the rest. Per rank, measured on the CPU by
  tests/test_run_fsdp.py (test_each_rank_loads_its_shard_plus_one_unit):
  GPU  = (W_4bit - C) / N + C + in_flight + runtime   (C, the quantization constants, stay whole on every rank:
         they are not parameters, FSDP does not shard them; under offload the shards go to the host: C + in_flight)
  host = the one tensor being read (dtype x the largest tensor) + the adapter, initialised whole by peft before
         its units are sharded (dtype x adapter parameters); the offloaded shards are the training terms' own.
  Before issue 13 every rank quantized the whole model into its host memory ("every-rank-host", still the path
  of a mixture-of-experts checkpoint, whose expert tensors transformers fuses as it loads them, so they cannot be
  read one checkpoint tensor at a time): host = GPUs per node x (W_4bit + the largest tensor in dtype).
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
    mode: str  # "replica" | "rank0-host" (cpu_ram_efficient_loading) | "layer-streamed" (QLoRA under FSDP2) |
    # "every-rank-host" (QLoRA of a mixture-of-experts checkpoint under FSDP2)
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
    return DTYPE_BYTES[shape.dtype] * max(arch.embedding_params, arch.largest_projection_params())


def in_flight_bytes(arch: Architecture, shape: memory.MicroStep) -> float:
    """The one FSDP unit a rank's GPU holds whole while `fully_shard` moves it there and shards it: the largest of
    a decoder layer as stored (W_layer, planner.memory.sharding), plus under QLoRA the one weight being quantized
    in dtype beside it, and the embeddings or the LM head in dtype:
    max(W_layer + dtype x the largest projection (QLoRA), dtype x max(V x h, lm_head))."""
    dt = DTYPE_BYTES[shape.dtype]
    quantizing = dt * arch.largest_projection_params() if shape.method == "qlora" else 0.0
    return max(layer_weight_bytes(arch, shape) + quantizing, dt * max(arch.embedding_params, arch.lm_head_params))


def load_peak(arch: Architecture, shape: memory.MicroStep, sharded: bool, offload: bool, world: int,
              runtime_gib: float, gpus_per_node: int = 1, adapter_params: int = 0) -> LoadPeak:
    """The load peak of a plan. `runtime_gib` is the CUDA context and misc a process holds from the start;
    `gpus_per_node` the ranks that share one node's host memory; `adapter_params` the LoRA parameters."""
    w = weights_bytes(arch, shape) / GIB
    if not sharded:
        return LoadPeak("replica", w + runtime_gib, 0.0, False, "each GPU loads the whole model it trains")
    if shape.method == "qlora" and not arch.is_moe:
        # GPU: (W_4bit - C) / N + C (C alone under offload) + the unit in flight + runtime
        # host (the node): GPUs per node x (the largest tensor being read + the adapter), both in dtype
        constants = memory.quant_constants_bytes(arch, shape) / GIB
        shard_gpu = constants if offload else (w - constants) / world + constants
        gpu = shard_gpu + in_flight_bytes(arch, shape) / GIB + runtime_gib
        adapter = DTYPE_BYTES[shape.dtype] * adapter_params / GIB
        host = gpus_per_node * (largest_tensor_bytes(arch, shape) / GIB + adapter)
        return LoadPeak("layer-streamed", gpu, host, False,
                        f"4-bit weights read, quantized and sharded one FSDP unit at a time by every rank "
                        f"(no rank holds more than its shard plus the unit in flight), packed in {shape.dtype} "
                        f"(bnb_4bit_quant_storage) so that FSDP shards them")
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
