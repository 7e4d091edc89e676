"""Building blocks shared by the vox2vec and HDSSL networks: the vox2vec ``FPN3d``, pyramid-to-voxel-vector
helpers, the array layout conversion (our ``[k, j, i]`` <-> RAS-canonical) and the pyramid dense embedder.

HDSSL's backbone (``hb_ssl/nn/fpn.py``) is a verbatim copy of vox2vec's ``FPN3d``, so both live here once.
Module names mirror the published code so that ``state_dict()`` keys equal the published checkpoint keys
(``first_conv``, ``left_blocks.L``, ``down_blocks.L.1``, ``bottom_block``, ``up_blocks.j.0``,
``skip_blocks.j``, ``right_blocks.j``, ``<stack>.layers.r.layers.{0,2,3,5}``); see
``/work/shared/reference-networks/vox2vec/NOTES.md`` and the parity tests in
``Testing/test_reference_networks.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anatomical_embedding.io.geometry import LPS_TO_RAS
from anatomical_embedding.nets.embedder import Embedder


class ResBlock3d(nn.Module):
    """Pre-activation residual block with an identity skip (in == out channels, as everywhere in FPN3d).

    ``layers`` indices are those of the reference ``nn.Sequential`` (0 BN, 1 ReLU, 2 conv, 3 BN, 4 ReLU, 5
    conv), which fixes the checkpoint key names.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm3d(channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            nn.BatchNorm3d(channels),
            nn.ReLU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x


class ResStack3d(nn.Module):
    """``num_blocks`` ResBlocks in a row (the published ``deep=False`` nets always use 2)."""

    def __init__(self, channels: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(ResBlock3d(channels) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FPN3d(nn.Module):
    """vox2vec's 3D feature pyramid U-Net (``vox2vec/nn/fpn.py: FPN3d`` with ``deep=False``).

    ``forward(x)`` with ``x`` of shape (N, in_channels, a, b, c) returns a list of ``num_scales`` raw
    (un-normalised) feature maps, finest first: level L has ``base_channels * 2**L`` channels and
    ``ceil(n / 2**L)`` voxels per axis (ceil-mode pooling, so any input size works). The network is
    layout-agnostic, but the published weights expect RAS-canonical (x, y, z) arrays; see the embedders.

    BatchNorm running statistics are part of the published weights: call ``.eval()`` for inference.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 16, num_scales: int = 6) -> None:
        super().__init__()
        if num_scales < 2:
            raise ValueError(f"FPN3d needs num_scales >= 2, got {num_scales}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_scales = num_scales
        c = [base_channels * 2**level for level in range(num_scales)]
        self.first_conv = nn.Conv3d(in_channels, c[0], kernel_size=3, padding=1)
        self.left_blocks = nn.ModuleList(ResStack3d(c[level]) for level in range(num_scales - 1))
        # Pool first, then a 1x1 conv doubles the channels (the reference order; keys down_blocks.L.1.*).
        self.down_blocks = nn.ModuleList(
            nn.Sequential(
                nn.MaxPool3d(kernel_size=2, stride=2, ceil_mode=True),
                nn.Conv3d(c[level], 2 * c[level], kernel_size=1),
            )
            for level in range(num_scales - 1)
        )
        self.bottom_block = ResStack3d(c[-1])
        # Decoder modules are stored coarse to fine: index j belongs to level L = num_scales - 2 - j.
        decoder_levels = list(reversed(range(num_scales - 1)))
        self.up_blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(2 * c[level], c[level], kernel_size=1),
                nn.Upsample(scale_factor=2, mode="nearest"),
            )
            for level in decoder_levels
        )
        self.skip_blocks = nn.ModuleList(
            nn.Conv3d(c[level], c[level], kernel_size=1) for level in decoder_levels
        )
        self.right_blocks = nn.ModuleList(ResStack3d(c[level]) for level in decoder_levels)

    @property
    def level_channels(self) -> list[int]:
        return [self.base_channels * 2**level for level in range(self.num_scales)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_levels(x, 0)

    def forward_levels(self, x: torch.Tensor, min_level: int = 0) -> list[torch.Tensor]:
        """Levels ``min_level .. num_scales-1`` (finest first); the decoder stops at ``min_level``, skipping
        the expensive high-resolution stages when only coarse levels are needed."""
        x = self.first_conv(x)
        skips = []
        for left, down in zip(self.left_blocks, self.down_blocks):
            x = left(x)
            skips.append(x)
            x = down(x)
        x = self.bottom_block(x)
        pyramid = [x]
        for j, (up, skip_conv, right) in enumerate(zip(self.up_blocks, self.skip_blocks, self.right_blocks)):
            level = self.num_scales - 2 - j
            if level < min_level:
                break
            skip = skips[level]
            x = up(x)
            # Ceil-mode pooling can make the upsampled map one voxel larger than the skip: crop it.
            x = x[..., : skip.shape[-3], : skip.shape[-2], : skip.shape[-1]]
            x = right(x + skip_conv(skip))
            pyramid.insert(0, x)
        return pyramid


def upsample_to(level_map: torch.Tensor, stride: int, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest upsampling of a level map by an integer ``stride``, cropped to ``size``.

    Exactly ``out[v] = level_map[v // stride]``, the voxel lookup of vox2vec's ``select_from_pyramid``
    (an index broadcast, not ``F.interpolate``: no float scale rounding can shift an index; one copy).
    """
    if stride == 1:
        return level_map[..., : size[0], : size[1], : size[2]]
    *lead, a, b, c = level_map.shape
    out = level_map[..., :, None, :, None, :, None].expand(*lead, a, stride, b, stride, c, stride)
    return out.reshape(*lead, a * stride, b * stride, c * stride)[..., : size[0], : size[1], : size[2]]


def select_from_pyramid(pyramid: list[torch.Tensor], voxels: torch.Tensor) -> torch.Tensor:
    """Per-voxel concatenation of all pyramid levels, as vox2vec's ``select_from_pyramid``.

    ``voxels`` is (V, 3) integer indices into the input grid (in the network's own array layout);
    returns (N, V, sum of level channels), unnormalised.
    """
    voxels = voxels.long()
    parts = []
    for level, fmap in enumerate(pyramid):
        v = torch.div(voxels, 2**level, rounding_mode="floor")
        parts.append(fmap[:, :, v[:, 0], v[:, 1], v[:, 2]].transpose(1, 2))
    return torch.cat(parts, dim=2)


def concat_upsampled(
    pyramid: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    levels: list[int],
    base_level: int,
    size: tuple[int, int, int],
) -> torch.Tensor:
    """Concatenate ``pyramid[L]`` for ``L in levels``, nearest-upsampled to the grid of ``base_level``.

    ``size`` is the spatial size of the ``base_level`` grid. Levels must be ``>= base_level``.
    """
    parts = []
    for level in levels:
        if level < base_level:
            raise ValueError(f"level {level} is finer than the target level {base_level}")
        parts.append(upsample_to(pyramid[level], 2 ** (level - base_level), size))
    return torch.cat(parts, dim=1)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the channel axis (dim 1)."""
    return F.normalize(x, dim=1)


def normalized_concat(
    pyramid: Mapping[int, torch.Tensor], levels: list[int], base_level: int, size: tuple[int, int, int]
) -> torch.Tensor:
    """``l2_normalize(concat_upsampled(...))`` without materialising the unnormalised concatenation.

    The squared norm of the concatenated vector is the sum of each level's squared norm, which is computed at
    the level's own (low) resolution; every output channel is written once. For a 1008-channel vox2vec map
    this saves two full-size passes. Falls back to the plain path while tracing (ONNX) or when a level's grid
    does not tile ``size`` exactly, and while autograd records (training).
    """
    # In-place writes (``out=``) cannot be differentiated: training takes the plain path.
    grad = torch.is_grad_enabled() and any(pyramid[lv].requires_grad for lv in levels)
    if torch.jit.is_tracing() or grad:
        return l2_normalize(concat_upsampled(pyramid, levels, base_level, size))
    strides = {level: 2 ** (level - base_level) for level in levels}
    exact = all(
        tuple(pyramid[lv].shape[-3:]) == tuple(n // strides[lv] for n in size)
        and all(n % strides[lv] == 0 for n in size)
        for lv in levels
    )
    if not exact:
        return l2_normalize(concat_upsampled(pyramid, levels, base_level, size))
    batch = tuple(pyramid[levels[0]].shape[:-4])
    sumsq = sum(upsample_to(pyramid[lv].pow(2).sum(dim=-4, keepdim=True), strides[lv], size) for lv in levels)
    inv_norm = sumsq.sqrt_().clamp_(min=1e-12).reciprocal_()  # the eps of F.normalize
    channels = sum(int(pyramid[lv].shape[-4]) for lv in levels)
    out = pyramid[levels[0]].new_empty(*batch, channels, *size)
    offset = 0
    for level in levels:
        fmap, st = pyramid[level], strides[level]
        c, a, b, d = fmap.shape[-4:]
        # View each output voxel block (st^3 voxels per level cell) so the level map broadcasts over it.
        target = out[..., offset : offset + c, :, :, :].view(*batch, c, a, st, b, st, d, st)
        inv = inv_norm.view(*batch, 1, a, st, b, st, d, st)
        torch.mul(fmap[..., :, None, :, None, :, None], inv, out=target)
        offset += c
    return out


# ---- array layout: our (k, j, i) arrays <-> the network's RAS-canonical (x, y, z) arrays ----------------
@dataclass(frozen=True)
class AxisLayout:
    """Axis permutation + flips taking an array indexed ``[k, j, i]`` to a network's expected layout.

    Network axis ``n`` is our array axis ``perm[n]`` (0 = k, 1 = j, 2 = i), reversed when ``flips[n]``.
    Works on numpy arrays and torch tensors whose last three axes are spatial; ``to_network`` and
    ``from_network`` are exact inverses (pure index shuffles, no interpolation). A map at a lower
    resolution (stride s) maps back correctly as long as the input sizes were multiples of s.
    """

    perm: tuple[int, int, int] = (2, 1, 0)
    flips: tuple[bool, bool, bool] = (True, True, False)

    def _apply(self, x, perm: tuple[int, ...], flip_dims: list[int]):
        lead = x.ndim - 3
        order = list(range(lead)) + [lead + p for p in perm]
        if isinstance(x, torch.Tensor):
            x = x.permute(*order)
            return x.flip(flip_dims) if flip_dims else x
        x = np.transpose(x, order)
        return np.ascontiguousarray(np.flip(x, flip_dims) if flip_dims else x)

    def to_network(self, x):
        """``[..., k, j, i]`` -> ``[..., a0, a1, a2]`` in the network layout."""
        lead = x.ndim - 3
        return self._apply(x, self.perm, [lead + n for n in range(3) if self.flips[n]])

    def from_network(self, x):
        """Inverse of :meth:`to_network` (network-layout outputs back to ``[..., k, j, i]``)."""
        lead = x.ndim - 3
        if isinstance(x, torch.Tensor):
            x = x.flip([lead + n for n in range(3) if self.flips[n]]) if any(self.flips) else x
        else:
            x = np.flip(x, [lead + n for n in range(3) if self.flips[n]]) if any(self.flips) else x
        inverse = tuple(int(np.argsort(self.perm)[d]) for d in range(3))
        return self._apply(x, inverse, [])

    def network_spacing_to_ijk(self, spacing_network: Sequence[float]) -> np.ndarray:
        """Spacing along the network axes (e.g. vox2vec's (1, 1, 2) mm along x, y, z) -> along (i, j, k)."""
        sp = np.asarray(spacing_network, dtype=np.float64).reshape(3)
        per_array_axis = np.empty(3)
        per_array_axis[list(self.perm)] = sp  # array axis perm[n] gets network axis n's spacing
        return per_array_axis[::-1].copy()  # array axes are (k, j, i); Volume spacing is (i, j, k)


def layout_for_direction(
    direction: np.ndarray, target: str = "RAS", max_angle_deg: float = 20.0
) -> AxisLayout:
    """The :class:`AxisLayout` whose network axes increase toward ``target`` (``"RAS"`` or ``"LPS"``).

    ``direction`` is a Volume's LPS direction matrix (columns = world directions of i, j, k). Each network
    axis gets the array axis most parallel to it, flipped if it points the other way; this is what
    ``SimpleITK.DICOMOrient(img, 'RAS')`` + transpose does. Oblique grids are refused (rather than silently
    mis-oriented) when an axis is more than ``max_angle_deg`` off: resample onto an axis-aligned grid first
    (``io.resample_like`` with an identity-direction reference).
    """
    if target not in ("RAS", "LPS"):
        raise ValueError(f"target layout must be 'RAS' or 'LPS', got {target!r}")
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if target == "RAS":
        d = LPS_TO_RAS @ d
    # cols[:, a] is the world direction (in the target frame) of array axis a (a = 0 k, 1 j, 2 i).
    cols = d[:, ::-1]
    perm = tuple(int(np.argmax(np.abs(cols[n]))) for n in range(3))
    if sorted(perm) != [0, 1, 2]:
        raise ValueError(
            f"direction {d.tolist()} is too oblique to map its axes onto {target}; "
            "resample the volume onto an axis-aligned grid first"
        )
    cosines = np.array([abs(cols[n, perm[n]]) / np.linalg.norm(cols[:, perm[n]]) for n in range(3)])
    worst = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    if worst > max_angle_deg:
        raise ValueError(
            f"volume axes are up to {worst:.1f} degrees off the {target} axes (limit {max_angle_deg}); "
            "the network expects an axis-aligned array, so resample onto an identity-direction grid first "
            "(io.resample_like)"
        )
    flips = tuple(bool(cols[n, perm[n]] < 0) for n in range(3))
    return AxisLayout(perm, flips)  # type: ignore[arg-type]


def to_network_layout(volume, target: str = "RAS", max_angle_deg: float = 20.0):
    """``volume.array`` ([k, j, i], LPS geometry) in the network layout, plus the function mapping back.

    Returns ``(array, inverse_fn)``: ``inverse_fn`` takes any array/tensor whose last three axes are in the
    network layout (e.g. the embedder's fine output) and returns it indexed ``[..., k, j, i]``.
    """
    layout = layout_for_direction(volume.direction, target, max_angle_deg)
    return layout.to_network(volume.array), layout.from_network


# ---- dense embedder on top of an FPN pyramid -------------------------------------------------------------
class PyramidEmbedder(Embedder):
    """Dense embedder from an FPN3d pyramid (shared by vox2vec and HDSSL).

    * ``fine``: at input resolution, the concatenation over ``fine_levels`` of each level's feature at
      ``v // 2**L`` (nearest upsampling) -- with all levels this is exactly vox2vec's voxel embedding
      (``select_from_pyramid``), the vector its contrastive loss and linear probes use.
    * ``coarse``: the same concatenation restricted to levels ``>= coarse_level``, on the ``coarse_level``
      grid (stride ``2**coarse_level``): the coarse half of the vox2vec vector, at the resolution where it is
      constant anyway, like AEFM's stride-8 global map.

    Both are L2-normalised along channels (the reference vectors are not; cosine similarity is what we match).
    ``forward`` takes our ``(N, 1, k, j, i)`` tensors and returns ``(k, j, i)``-indexed maps; inside, input is
    permuted/flipped to the network's ``input_layout`` with ``self.layout`` (default: an identity-direction
    LPS volume; call :meth:`set_volume_layout` for any other direction).
    """

    input_layout: str = "RAS"

    def __init__(
        self,
        pyramid_channels: Sequence[int],
        coarse_level: int = 3,
        fine_levels: Sequence[int] | None = None,
        layout: AxisLayout | None = None,
    ) -> None:
        super().__init__()
        num_scales = len(pyramid_channels)
        if not 0 <= coarse_level < num_scales:
            raise ValueError(f"coarse_level must be in [0, {num_scales - 1}], got {coarse_level}")
        self.coarse_level = coarse_level
        self.coarse_levels = list(range(coarse_level, num_scales))
        self.fine_levels = (
            list(range(num_scales)) if fine_levels is None else sorted(int(v) for v in fine_levels)
        )
        if not self.fine_levels or not all(0 <= v < num_scales for v in self.fine_levels):
            raise ValueError(
                f"fine_levels must be a non-empty subset of 0..{num_scales - 1}, got {fine_levels}"
            )
        # Instance attributes shadow the class defaults (which describe the published configuration).
        self.coarse_stride = 2**coarse_level
        self.size_multiple = 2 ** (num_scales - 1)  # every level's grid aligns with the input, as in training
        self.coarse_channels = sum(pyramid_channels[v] for v in self.coarse_levels)
        self.fine_channels = sum(pyramid_channels[v] for v in self.fine_levels)
        self.layout = layout or layout_for_direction(np.eye(3), self.input_layout)

    def set_volume_layout(self, direction: np.ndarray, max_angle_deg: float = 20.0) -> None:
        """Use the axis mapping of a Volume's ``direction`` for subsequent ``forward`` calls."""
        self.layout = layout_for_direction(direction, self.input_layout, max_angle_deg)

    def pyramid(self, image_network_layout: torch.Tensor, min_level: int = 0) -> dict[int, torch.Tensor]:
        """Feature maps ``{level: map}``, levels ``>= min_level``, of an input in the network layout."""
        raise NotImplementedError

    def _network_input(self, image: torch.Tensor) -> torch.Tensor:
        spatial = tuple(image.shape[-3:])
        # Skipped while tracing (ONNX export): sizes are symbolic there and checked by the caller at run time.
        if not torch.jit.is_tracing() and any(s % self.size_multiple for s in spatial):
            raise ValueError(
                f"input size {spatial} must be a multiple of {self.size_multiple} per axis; "
                "pad it first (io.pad_to_multiple)"
            )
        return self.layout.to_network(image)

    def _coarse(self, levels: Mapping[int, torch.Tensor], size: tuple[int, ...]) -> torch.Tensor:
        coarse_size = tuple(s // self.coarse_stride for s in size)
        return self.layout.from_network(
            normalized_concat(levels, self.coarse_levels, self.coarse_level, coarse_size)
        )

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._network_input(image)
        size = tuple(x.shape[-3:])
        levels = self.pyramid(x, min(self.fine_levels[0], self.coarse_level))
        fine = normalized_concat(levels, self.fine_levels, 0, size)
        return self._coarse(levels, size), self.layout.from_network(fine)

    def forward_coarse(self, image: torch.Tensor) -> torch.Tensor:
        """The coarse output alone: the decoder stops at ``coarse_level`` (export uses it for coarse.onnx)."""
        x = self._network_input(image)
        return self._coarse(self.pyramid(x, self.coarse_level), tuple(x.shape[-3:]))
