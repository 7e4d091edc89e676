"""Adam/Eve's view augmentations (Hosseinzadeh Taher et al.): the two views of an Anatomy Decomposer part.

The paper lists random crop, colour jitter, Gaussian blur and rotation without magnitudes; the magnitudes come
from the caller's settings (``methods.adam.AdamEveConfig``: MoCo v2's crop scale 0.2-1, aspect 3/4-4/3, jitter
0.4 with p = 0.8, blur sigma 0.1-2 with p = 0.5, and +-10 degree rotation). Colour jitter becomes brightness
and contrast jitter on the grey-level image. Deterministic given the ``numpy.random.Generator`` passed in.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

#: A box ``((start, stop), ...)`` per array axis (a decomposer part).
Box = tuple[tuple[int, int], ...]


class ViewSettings(Protocol):
    """The augmentation magnitudes :func:`make_view` reads (defaults: ``methods.adam.AdamEveConfig``)."""

    crop_scale: tuple[float, float]  # view area (volume) / anchor area
    crop_ratio: tuple[float, float]  # per-axis aspect range
    jitter_prob: float
    brightness: float
    contrast: float
    blur_prob: float
    blur_sigma: tuple[float, float]  # voxels of the view
    rotation_deg: float


def make_view(image: torch.Tensor, box: Box, size: Sequence[int], rng: np.random.Generator,
              c: ViewSettings) -> torch.Tensor:
    """One augmented view of the anchor ``box`` of ``image`` (2D or 3D array), resampled to ``size`` (array order).

    Random resized crop inside the anchor (area/volume fraction ``crop_scale``, per-axis aspect ``crop_ratio``),
    rotated by up to ``rotation_deg`` in the plane of the last two axes (2D: the image plane; 3D: the axial
    (j, i) plane), sampled bilinearly in one ``grid_sample``; then brightness/contrast jitter and Gaussian blur.
    ``c``: the magnitudes (:class:`ViewSettings`, e.g. ``methods.adam.AdamEveConfig``).
    """
    d = image.dim()
    shape = np.asarray(image.shape, dtype=np.float64)
    lo = np.array([b[0] for b in box], dtype=np.float64)
    side = np.array([b[1] - b[0] for b in box], dtype=np.float64)
    scale = rng.uniform(*c.crop_scale)
    logr = rng.uniform(np.log(c.crop_ratio[0]), np.log(c.crop_ratio[1]), size=d)
    frac = np.clip(scale ** (1.0 / d) * np.exp(logr - logr.mean()), 1e-3, 1.0)
    ext = side * frac  # edge units (a voxel spans [c, c + 1])
    start = lo + rng.uniform(0.0, 1.0, size=d) * (side - ext)
    centre = start + ext / 2
    theta = np.deg2rad(rng.uniform(-c.rotation_deg, c.rotation_deg))
    axes = [(2.0 * torch.arange(p, dtype=torch.float64) + 1.0) / p - 1.0 for p in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*size, d), in [-1, 1]
    offs = grid * torch.from_numpy(ext / 2)
    a, b = d - 2, d - 1  # rotate in the plane of the last two axes
    cos, sin = float(np.cos(theta)), float(np.sin(theta))
    ra = cos * offs[..., a] - sin * offs[..., b]
    rb = sin * offs[..., a] + cos * offs[..., b]
    offs = torch.stack([offs[..., q] for q in range(a)] + [ra, rb], dim=-1)
    pts = torch.from_numpy(centre) + offs
    norm = (2.0 * pts / torch.from_numpy(shape) - 1.0).flip(-1).float()  # grid_sample wants (x=last axis, ...)
    view = F.grid_sample(image[None, None].float(), norm[None], mode="bilinear", padding_mode="border",
                         align_corners=False)[0, 0]
    if rng.random() < c.jitter_prob:
        view = view * rng.uniform(1 - c.brightness, 1 + c.brightness)
        mean = view.mean()
        view = (view - mean) * rng.uniform(1 - c.contrast, 1 + c.contrast) + mean
    if rng.random() < c.blur_prob:
        from scipy.ndimage import gaussian_filter

        view = torch.from_numpy(gaussian_filter(view.numpy(), rng.uniform(*c.blur_sigma), mode="nearest"))
    return view.contiguous()


__all__ = ["Box", "ViewSettings", "make_view"]
