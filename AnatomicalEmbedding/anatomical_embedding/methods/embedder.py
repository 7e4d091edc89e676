"""The contract every method's dense embedder fulfils (matching, few-shot and export rely on it)."""
from __future__ import annotations

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
