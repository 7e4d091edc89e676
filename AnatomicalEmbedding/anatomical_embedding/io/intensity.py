"""Intensity presets as data: each paper's CT window, MRI percentile scaling, z-score.

A preset is a small frozen dataclass so that it can be stored in a model card (``to_dict``)
and rebuilt at inference time (``from_dict``) without any code changes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

Kind = Literal["window", "percentile", "zscore", "minmax"]


@dataclass(frozen=True)
class IntensityPreset:
    name: str
    kind: Kind
    #: window: HU bounds; percentile: lower/upper percentiles (0..100).
    lower: float = 0.0
    upper: float = 1.0
    out_min: float = 0.0
    out_max: float = 1.0
    clip: bool = True
    description: str = ""

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Map raw intensities to network input as float32."""
        a = np.asarray(array, dtype=np.float32)
        if self.kind == "zscore":
            std = float(a.std())
            return ((a - float(a.mean())) / (std if std > 0 else 1.0)).astype(np.float32)
        if self.kind == "window":
            lo, hi = self.lower, self.upper
        elif self.kind == "percentile":
            lo, hi = (float(v) for v in np.percentile(a, [self.lower, self.upper]))
        elif self.kind == "minmax":
            lo, hi = float(a.min()), float(a.max())
        else:  # pragma: no cover - guarded by from_dict
            raise ValueError(f"unknown preset kind {self.kind!r}")
        if hi <= lo:
            hi = lo + 1.0
        if self.clip:
            a = np.clip(a, lo, hi)
        out = (a - lo) / (hi - lo) * (self.out_max - self.out_min) + self.out_min
        return out.astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "IntensityPreset":
        if data.get("kind") not in ("window", "percentile", "zscore", "minmax"):
            raise ValueError(f"intensity preset kind must be window/percentile/zscore/minmax, got {data.get('kind')!r}")
        return cls(**data)


PRESETS: dict[str, IntensityPreset] = {
    p.name: p
    for p in (
        IntensityPreset("ct_aefm", "window", -500.0, 750.0, -1.0, 1.0, True,
                        "AEFM (Zhuang et al.): CT window [-500, 750] HU clipped to [-1, 1]"),
        IntensityPreset("ct_hdssl", "window", -1350.0, 1000.0, 0.0, 1.0, True,
                        "HDSSL (Kats et al.) and vox2vec: CT clipped to [-1350, 1000] HU, scaled to [0, 1]"),
        IntensityPreset("ct_zscore", "zscore", description="AnatoMask (Li et al.): z-score normalisation of CT"),
        IntensityPreset("mri_percentile", "percentile", 0.01, 99.9, 0.0, 1.0, True,
                        "HDSSL MRI: clip to the 0.01/99.9 percentiles, scale to [0, 1]"),
        IntensityPreset("xray_minmax", "minmax", description="Adam/Eve 2D radiographs: min-max to [0, 1]"),
    )
}


def intensity_warnings(array: np.ndarray, preset: IntensityPreset, max_samples: int = 1_000_000) -> list[str]:
    """Reasons to believe ``array`` is not what a model with ``preset`` expects (empty list: plausible).

    A CT model expects Hounsfield units (air near -1000, a span of hundreds of HU); an 8-bit 0..255 export,
    for instance, is windowed into nonsense and matches land a hundred mm off without any error.
    """
    a = np.asarray(array).ravel()
    if a.size > max_samples:  # an even subsample is enough for percentiles
        a = a[:: a.size // max_samples]
    a = a[np.isfinite(a)].astype(np.float64)
    if a.size == 0:
        return ["the image has no finite voxels"]
    lo, p1, p99, hi = np.percentile(a, [0, 1, 99, 100])
    out = []
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        return [f"the image is constant ({lo:g}): it has no structure to match"]
    if preset.kind == "window":  # HU presets
        if lo >= 0 and hi <= 255:
            out.append(f"intensities {lo:g}..{hi:g} look like an 8-bit image, not CT in Hounsfield units "
                       f"(expected air near -1000 HU; the model's window is {preset.lower:g}..{preset.upper:g} HU)")
        elif p99 < preset.lower or p1 > preset.upper:
            out.append(f"intensities (1st-99th percentile {p1:g}..{p99:g}) lie outside the model's CT window "
                       f"{preset.lower:g}..{preset.upper:g} HU; is this CT in Hounsfield units?")
        elif p99 - p1 < 0.02 * (preset.upper - preset.lower):
            out.append(f"intensities barely vary inside the model's CT window (1st-99th percentile {p1:g}..{p99:g} HU)")
    return out


def get_preset(name_or_dict: str | dict | IntensityPreset) -> IntensityPreset:
    """Look up a preset by name, or rebuild one from a model card dictionary."""
    if isinstance(name_or_dict, IntensityPreset):
        return name_or_dict
    if isinstance(name_or_dict, dict):
        return IntensityPreset.from_dict(name_or_dict)
    try:
        return PRESETS[name_or_dict]
    except KeyError:
        raise ValueError(f"unknown intensity preset {name_or_dict!r}; known: {', '.join(PRESETS)}") from None
