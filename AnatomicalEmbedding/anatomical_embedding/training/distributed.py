"""DDP setup from ``torchrun`` environment variables (one node or many); gloo on CPU, NCCL on CUDA."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1), else single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 across ranks in rank order (MoCo's ``concat_all_gather``; no gradient)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    dev = values.device
    values = values.clone()
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        values = values.cuda()
    dist.all_reduce(values)
    return (values / dist.get_world_size()).to(dev)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` on every rank (used for per-rank RNG states in checkpoints)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(synchronise: bool = True) -> None:
    """Destroy the process group. After a clean finish every rank first meets at a barrier: a rank that
    tears gloo down while another still has a collective in flight can abort the other ("terminate called
    without an active exception", seen once in CI). After an error, skip it (a failed rank never arrives)."""
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()
