"""Where this process trains and what it measures there: its rank and device (Placement), the peak memory an
out-of-memory error would see (MemoryMeter), and the figures every rank gathers for rank 0's summary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from loraplan.planner.planfile.schema import Plan

from .errors import RunError

GIB = 2**30


def uses_cuda(plan: Plan) -> bool:
    """The strategy may train on a GPU (its table entry's `device` is not "cpu") and this machine has one."""
    import torch

    from loraplan.planner.plugins.strategies import STRATEGIES

    return STRATEGIES[plan.strategy].device != "cpu" and torch.cuda.is_available()


@dataclass
class Placement:
    """Where this process trains: its rank in the data-parallel group and its device."""

    world_size: int
    rank: int
    local_rank: int
    use_cuda: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device_map(self) -> Optional[dict]:
        # The whole model on this process's GPU: what QLoRA needs under DDP and FSDP (no "auto" sharding across cards).
        return {"": self.local_rank} if self.use_cuda else None


def placement_for(plan: Plan) -> Placement:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = uses_cuda(plan)
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RunError(f"process {rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible")
        if plan.training.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise RunError(f"the plan computes in bfloat16 but {torch.cuda.get_device_name(local_rank)} has no bf16; "
                           f"plan again for this card (it will pick float16)")
        torch.cuda.set_device(local_rank)
    return Placement(world, rank, local_rank, use_cuda)


class MemoryMeter:
    """Peak device memory as an out-of-memory error sees it: the caching allocator's peak reservation plus what
    the CUDA context (and anything else on the card) held before the model loaded, measured as total - free."""

    def __init__(self, use_cuda: bool):
        import torch

        self.use_cuda = use_cuda
        self.context_bytes = 0
        self.total_bytes = 0
        if use_cuda:
            free, total = torch.cuda.mem_get_info()  # creates the CUDA context first
            self.total_bytes = total
            self.context_bytes = total - free - torch.cuda.memory_reserved()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> Optional[float]:
        import torch

        if not self.use_cuda:
            return None
        return (torch.cuda.max_memory_reserved() + self.context_bytes) / GIB

    def device_used_gib(self) -> Optional[float]:
        """Total minus free device memory now (what nvidia-smi shows): also counts memory outside the caching
        allocator, e.g. NCCL's buffers under DDP, created after the context was measured."""
        import torch

        if not self.use_cuda:
            return None
        free, total = torch.cuda.mem_get_info()
        return (total - free) / GIB

    def pinned_peak_gib(self) -> Optional[float]:
        """Peak pinned host memory held by torch's caching host allocator (what the offload savers pin, rounded to
        the blocks torch asked CUDA for); None without CUDA."""
        import torch

        if not self.use_cuda:
            return None
        stats = torch.cuda.host_memory_stats()
        peak = stats.get("allocated_bytes.peak", stats.get("allocated_bytes.all.peak"))
        return None if peak is None else peak / GIB

    @staticmethod
    def rss_peak_gib() -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def gather(value: Any, place: Placement) -> list:
    """VALUE from every rank, in rank order (this process's alone when it trains by itself)."""
    if place.world_size == 1:
        return [value]
    import torch.distributed as dist

    if not dist.is_initialized():
        return [value]
    out: list = [None] * place.world_size
    dist.all_gather_object(out, value)
    return out
