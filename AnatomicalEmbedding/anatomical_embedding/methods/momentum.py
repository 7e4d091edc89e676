"""Momentum (EMA) updates and the MoCo feature queue, shared by AEFM, Adam/Eve and AnatoMask."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``theta' <- m * theta' + (1 - m) * theta`` for every parameter; buffers (BN stats) are copied."""
    for p_t, p_o in zip(target.parameters(), online.parameters()):
        p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)
    for b_t, b_o in zip(target.buffers(), online.buffers()):
        b_t.copy_(b_o)


def make_momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen deep copy that starts from the online weights (MoCo's initialisation)."""
    import copy

    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class FeatureQueue(nn.Module):
    """A fixed-size FIFO of feature vectors (MoCo's dictionary ``D``), stored as buffers.

    Being buffers, the queue and its pointer travel with ``state_dict()`` (so checkpoints hold them).
    ``filled`` counts valid rows, so the loss uses only real negatives before the first wrap-around
    (MoCo starts from random vectors instead; we prefer no fake negatives).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("features", torch.zeros(self.size, self.dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, dim) at the pointer, overwriting the oldest rows, wrapping around."""
        keys = keys.detach().to(self.features.dtype)
        if keys.shape[0] > self.size:  # only the newest ``size`` rows can survive
            keys = keys[-self.size:]
        n = keys.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.features.device)) % self.size
        self.features[idx] = keys
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def negatives(self) -> torch.Tensor:
        """The valid rows (all of them once the queue has wrapped)."""
        return self.features[: int(self.filled)]
