"""The contract every method's dense embedder fulfils (matching, few-shot and export rely on it)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Embedder(nn.Module):
    """Image in, L2-normalised dense embeddings out.

    ``forward(image)`` takes ``(N, 1, k, j, i)`` float32 in the model's intensity preset and returns
    ``(coarse, fine)``:

    * ``coarse``: ``(N, C_coarse, k/s, j/s, i/s)`` with ``s = coarse_stride`` (AEFM's global 1/8 map);
    * ``fine``: ``(N, C_fine, k, j, i)`` at input resolution (AEFM's local map).

    Both are unit vectors along the channel axis. Spatial input sizes must be multiples of
    ``size_multiple``; callers pad (``io.pad_to_multiple``). Subclasses set the class attributes.
    """

    coarse_stride: int = 8
    size_multiple: int = 16
    coarse_channels: int = 64
    fine_channels: int = 64

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


def coarse_forward(embedder: Any, x: torch.Tensor) -> torch.Tensor:
    """Coarse output only: ``embedder.forward_coarse`` when the network has a cheaper coarse path (it skips
    the full-resolution decoder), otherwise the full forward with the fine output dropped."""
    if hasattr(embedder, "forward_coarse"):
        return embedder.forward_coarse(x)
    return embedder(x)[0]


def has_coarse_path(embedder: Any) -> bool:
    return hasattr(embedder, "forward_coarse")
