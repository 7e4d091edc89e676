"""AEFM embedding network: the published ``sam_unet_3d`` (Zhuang et al.), a 3D residual U-Net.

Built from MONAI's ``ResidualUnit``/``Convolution`` exactly as MONAI ``UNet``'s block factories do, with
the module names of ``network/sam_unet_3d.py`` so that ``state_dict()`` keys equal the published
checkpoint keys minus their ``sam.`` prefix (see ``/work/shared/reference-networks/aefm/NOTES.md``).

Five levels, two residual units per encoder level, InstanceNorm (no affine) + PReLU, decoder widths
``max(w, T)`` so the decoder stops shrinking at ``T`` = ``feature_dim`` (64 in the paper). Outputs:
``global`` (T channels, stride 8, from ``up_layer_4``) and ``local`` (T channels, full resolution), both
L2-normalised along channels. As an :class:`Embedder`: ``coarse = global``, ``fine = local``.

Axis order: the published model saw MONAI arrays in (x, y, z) = LPS order, we feed (k, j, i). The net is
a pure convolutional map, so the weights are layout-agnostic in code; a converted published checkpoint
needs the input permuted (the importer's job, another issue).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from torch import nn

from anatomical_embedding.nets.embedder import Embedder

_COMMON = dict(spatial_dims=3, kernel_size=3, act="PRELU", norm="INSTANCE", dropout=0.0, bias=True, adn_ordering="NDA")


def _down(cin: int, cout: int, stride: int) -> nn.Module:
    # MONAI UNet._get_down_layer with num_res_units=2; strided residual is a full 3x3x3 conv (MONAI's rule).
    return ResidualUnit(in_channels=cin, out_channels=cout, strides=stride, subunits=2, **_COMMON)


def _up(cin: int, cout: int, is_top: bool) -> nn.Module:
    # MONAI UNet._get_up_layer: transposed conv (x2) then a one-subunit residual unit; the top one ends in a bare conv.
    conv = Convolution(in_channels=cin, out_channels=cout, strides=2, is_transposed=True, conv_only=False, **_COMMON)
    ru = ResidualUnit(in_channels=cout, out_channels=cout, strides=1, subunits=1, last_conv_only=is_top, **_COMMON)
    return nn.Sequential(conv, ru)


class AEFMUNet(Embedder):
    """``sam_unet_3d`` with configurable widths; ``forward(x) -> (global, local)`` (coarse, fine)."""

    coarse_stride = 8
    size_multiple = 16

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), feature_dim: int = 64) -> None:
        super().__init__()
        if len(widths) != 4:
            raise ValueError(f"AEFM U-Net needs 4 encoder widths, got {list(widths)}")
        w1, w2, w3, w4 = (int(w) for w in widths)
        t = int(feature_dim)
        self.widths = (w1, w2, w3, w4)
        self.feature_dim = t
        # Instance attributes shadow the Embedder class defaults so tiny nets report their real sizes.
        self.coarse_channels = t
        self.fine_channels = t
        o4, o3, o2 = max(w3, t), max(w2, t), max(w1, t)
        self.down_layer_1 = _down(1, w1, 2)
        self.down_layer_2 = _down(w1, w2, 2)
        self.down_layer_3 = _down(w2, w3, 2)
        self.down_layer_4 = _down(w3, w4, 2)
        self.bottom_layer = _down(w4, w4, 1)
        self.up_layer_4 = _up(2 * w4, o4, False)
        self.up_layer_3 = _up(w3 + o4, o3, False)
        self.up_layer_2 = _up(w2 + o3, o2, False)
        self.up_layer_1 = _up(w1 + o2, t, True)
        self.global_full_connection = nn.Conv3d(o4, t, kernel_size=1)

    def _encode_to_u4(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d1 = self.down_layer_1(x)
        d2 = self.down_layer_2(d1)
        d3 = self.down_layer_3(d2)
        d4 = self.down_layer_4(d3)
        b = self.bottom_layer(d4)
        # Skip concatenation puts the decoder tensor first (as the published forward).
        return d1, d2, d3, self.up_layer_4(torch.cat([b, d4], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d1, d2, d3, u4 = self._encode_to_u4(x)
        u3 = self.up_layer_3(torch.cat([u4, d3], dim=1))
        u2 = self.up_layer_2(torch.cat([u3, d2], dim=1))
        u1 = self.up_layer_1(torch.cat([u2, d1], dim=1))
        g = self.global_full_connection(u4)
        return F.normalize(g, dim=1), F.normalize(u1, dim=1)

    def forward_coarse(self, x: torch.Tensor) -> torch.Tensor:
        """The global (coarse) embedding alone: the coarse map comes from ``up_layer_4``, so the three
        full-resolution decoder blocks are skipped (most of the cost of embedding a whole volume)."""
        return F.normalize(self.global_full_connection(self._encode_to_u4(x)[3]), dim=1)


class SegmentationHead(nn.Module):
    """AEFM's light head M_S: two fully connected layers per voxel (1x1x1 convs) on the embedding map."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Conv3d(in_channels, hidden, kernel_size=1)
        self.act = nn.PReLU()
        self.fc2 = nn.Conv3d(hidden, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
