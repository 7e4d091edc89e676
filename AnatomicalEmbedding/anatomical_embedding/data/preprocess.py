"""Preprocessing of one image (reorientation, optional body crop, resampling, intensity preset, padding), free of
MONAI and torch: few-shot training and applying on the ONNX Runtime path use it without either (``datasets``
wraps it in MONAI's cache for training)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from anatomical_embedding.io import Volume, get_preset, resample_to_spacing


@dataclass(frozen=True)
class PreprocessConfig:
    """How raw images become network input: target spacing (mm, along i, j, k) and intensity preset."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    preset: str | dict = "ct_aefm"
    #: Pad (with the preset's value for air) up to at least this size in voxels (i, j, k); 0 = no padding.
    min_size: tuple[int, int, int] = field(default=(0, 0, 0))
    #: Crop each image to the bounding box of its voxels above this value (raw units, HU for CT) before
    #: resampling; ``None`` = no crop. HDSSL §3.1 crops CTs to the body, voxels above -500 HU.
    body_crop_hu: float | None = None

    def key(self) -> str:
        d = asdict(self)
        if d["body_crop_hu"] is None:  # keys of configs without the crop stay as they were
            del d["body_crop_hu"]
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def body_crop(image: Volume, threshold: float, label: Volume | None = None) -> tuple[Volume, Volume | None]:
    """``image`` (and ``label``) cropped to the bounding box of the voxels above ``threshold``; unchanged when
    no voxel is above it (HDSSL §3.1: the body of a CT, voxels above -500 HU)."""
    from anatomical_embedding.io import crop

    inside = np.argwhere(np.asarray(image.array) > threshold)  # (k, j, i)
    if len(inside) == 0:
        return image, label
    lo = inside.min(0)[::-1]
    size = inside.max(0)[::-1] - lo + 1
    return crop(image, lo, size), (crop(label, lo, size) if label is not None else None)


def preprocess_volume(image: Volume, config: PreprocessConfig, label: Volume | None = None
                      ) -> tuple[Volume, Volume | None]:
    """Reorient to canonical axes, resample to the config's spacing and apply the intensity preset.

    Labels are resampled with nearest neighbour. Callers that need the result on the input grid
    resample back with ``resample_like`` (world geometry is preserved throughout).
    """
    from anatomical_embedding.io import pad, reorient_to_canonical

    image = reorient_to_canonical(image)
    label = reorient_to_canonical(label) if label is not None else None
    if config.body_crop_hu is not None:
        image, label = body_crop(image, float(config.body_crop_hu), label)

    preset = get_preset(config.preset)
    spacing = np.asarray(config.spacing, dtype=np.float64)
    # Air in HU is about -1000; resampling outside the image must not invent tissue.
    res = resample_to_spacing(image, spacing, is_label=False, default_value=float(image.array.min()))
    out = res.with_array(preset.apply(res.array))
    lab = None
    if label is not None:
        lab = resample_to_spacing(label, spacing, is_label=True).array
        if lab.shape != out.array.shape:
            raise ValueError(f"label grid {lab.shape} differs from image grid {out.array.shape} after resampling")
        lab = out.with_array(lab.astype(np.int16))
    need = np.maximum(0, np.asarray(config.min_size, dtype=int) - np.asarray(out.shape_ijk))
    if need.any():
        before = need // 2
        fill = float(out.array.min())
        out = pad(out, before, need - before, fill)
        if lab is not None:
            lab = pad(lab, before, need - before, 0)
    return out, lab
