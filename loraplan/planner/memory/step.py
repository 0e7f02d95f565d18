"""The two values the memory model speaks in: `MicroStep`, what one GPU does per micro-step (its input besides the
architecture), and `Term`, one named row of a memory budget (its output). The strategies, the savers and the
decision build and pass them too; planner.memory.terms builds its budget from both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

GIB = 2**30


@dataclass(frozen=True)
class MicroStep:
    """What one GPU does per optimizer micro-step: everything the memory depends on besides the architecture."""

    method: str  # lora | qlora
    rank: int  # the LoRA rank
    micro_batch_size: int
    seq_len: int
    grad_checkpointing: bool
    loss: str  # fused | full
    optimizer: str = "adamw"
    dtype: str = "bfloat16"
    double_quant: bool = True
    blocksize: int = 64  # NF4 block size (Quantization.blocksize)
    device: str = "cuda"  # cuda | cpu: the CPU has no CUDA context and no caching allocator
    # What the memory savers (planner/plugins/savers.py) change; the defaults are the plan without savers.
    every_n_layers: int = 1  # layer_checkpointing: checkpoint every n-th decoder layer (1: all of them)
    checkpoints_offloaded: bool = False  # offload_*: the checkpointed layer inputs live in pinned host memory
    offload_resident_inputs: int = 0  # offload_*: layer inputs on the GPU meanwhile (brought back / in flight)
    mlp_tile_tokens: int = 0  # mlp_tiling: tokens per MLP tile (0: the MLP is not tiled)
    # What LoRA adapts, as far as the activations see it; the defaults are the calibration's recipe.
    targets: Optional[tuple[str, ...]] = None  # peft names of the adapted projections (None: every projection)
    lora_dropout: bool = True  # dropout > 0: peft applies nn.Dropout (a mask per adapted input); 0: nn.Identity
    adapter_dtype: str = "float32"  # the LoRA weights' dtype: peft's fp32, or bf16 where trl casts them (QLoRA)

    @property
    def tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    formula: str
    group: str  # weights | adapter | sharding | activations | loss | runtime
    device: str = "gpu"  # gpu: counts toward the GPU's peak; host: held in (pinned) host memory instead

    @property
    def gib(self) -> float:
        return self.bytes / GIB

    @staticmethod
    def sum_gib(terms) -> float:
        """The GPU peak of these terms (host terms are not on the GPU)."""
        return sum(t.bytes for t in terms if t.device == "gpu") / GIB

    @staticmethod
    def host_gib(terms) -> float:
        """What these terms hold in host memory, per process."""
        return sum(t.bytes for t in terms if t.device == "host") / GIB
