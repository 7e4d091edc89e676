"""The one image type of the engine, and every coordinate transform it needs.

Conventions (all code in the engine follows them):

* ``Volume.array`` is indexed ``[k, j, i]`` (slice, row, column), exactly like
  ``SimpleITK.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``, so no transpose
  happens at either boundary. Networks see it as ``(N, C, k, j, i)``.
* ``spacing``, ``origin`` and the columns of ``direction`` are given along ``(i, j, k)``.
* The world frame stored in a ``Volume`` is **LPS**, as in ITK, DICOM, NIfTI/NRRD as read by
  SimpleITK. Slicer's scene and markups use **RAS**. The only place where the two meet is
  :func:`convert_points` / :data:`LPS_TO_RAS`; every other module calls those.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

Frame = Literal["LPS", "RAS"]

#: Flip of the first two axes: maps LPS to RAS and back (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def convert_points(points: np.ndarray | Sequence[float], src: Frame, dst: Frame) -> np.ndarray:
    """Convert world points of shape (3,) or (N, 3) between the LPS and RAS frames."""
    pts = np.asarray(points, dtype=np.float64)
    for name in (src, dst):
        if name not in ("LPS", "RAS"):
            raise ValueError(f"unknown world frame {name!r}: use 'LPS' (ITK, files) or 'RAS' (Slicer)")
    if src == dst:
        return pts.copy()
    return pts @ LPS_TO_RAS.T


def convert_matrix(matrix: np.ndarray, src: Frame, dst: Frame) -> np.ndarray:
    """Convert a 4x4 matrix whose output is a world point (e.g. voxel-to-world) between frames."""
    m = np.asarray(matrix, dtype=np.float64).copy()
    if src != dst:
        flip = np.eye(4)
        flip[:3, :3] = LPS_TO_RAS
        m = flip @ m
    return m


@dataclass
class Volume:
    """A 3D scalar image with its geometry in LPS world coordinates (see module doc)."""

    array: np.ndarray
    spacing: np.ndarray = field(default_factory=lambda: np.ones(3))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(
                f"Volume needs a 3D array indexed [k, j, i], got shape {self.array.shape}; "
                "store a 2D image as a single-slice volume of shape (1, rows, columns)"
            )
        self.spacing = np.asarray(self.spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if np.any(self.spacing <= 0):
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if abs(abs(np.linalg.det(self.direction)) - 1.0) > 1e-3:
            raise ValueError(f"direction must be orthonormal, got {self.direction.tolist()}")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size along (i, j, k), the ITK order."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def is_2d(self) -> bool:
        return self.array.shape[0] == 1

    def ijk_to_world(self, frame: Frame = "LPS") -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to world (x, y, z, 1) in ``frame``."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return convert_matrix(m, "LPS", frame)

    def world_to_ijk(self, frame: Frame = "LPS") -> np.ndarray:
        return np.linalg.inv(self.ijk_to_world(frame))

    def index_to_world(self, ijk: np.ndarray | Sequence[float], frame: Frame = "LPS") -> np.ndarray:
        """Continuous voxel indices (i, j, k), shape (3,) or (N, 3), to world points."""
        pts = np.asarray(ijk, dtype=np.float64)
        m = self.ijk_to_world(frame)
        return pts @ m[:3, :3].T + m[:3, 3]

    def world_to_index(self, points: np.ndarray | Sequence[float], frame: Frame = "LPS") -> np.ndarray:
        """World points, shape (3,) or (N, 3), to continuous voxel indices (i, j, k)."""
        pts = np.asarray(points, dtype=np.float64)
        m = self.world_to_ijk(frame)
        return pts @ m[:3, :3].T + m[:3, 3]

    def contains_index(self, ijk: np.ndarray, margin: float = 0.5) -> np.ndarray:
        """True for continuous indices inside the voxel grid (voxel edges count as inside)."""
        ijk = np.atleast_2d(ijk)
        upper = np.asarray(self.shape_ijk, dtype=np.float64) - 1 + margin
        return np.all((ijk >= -margin) & (ijk <= upper), axis=1)

    def physical_extent(self) -> np.ndarray:
        """Side lengths in mm along (i, j, k)."""
        return np.asarray(self.shape_ijk) * self.spacing

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, new voxel data (shape must match)."""
        if np.asarray(array).shape != self.array.shape:
            raise ValueError(f"array shape {np.asarray(array).shape} != volume shape {self.array.shape}")
        return Volume(array, self.spacing.copy(), self.origin.copy(), self.direction.copy())

    def same_geometry(self, other: "Volume", atol: float = 1e-4) -> bool:
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    # ---- SimpleITK ------------------------------------------------------------------------
    def to_sitk(self):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.reshape(-1)])
        return image

    @classmethod
    def from_sitk(cls, image) -> "Volume":
        import SimpleITK as sitk

        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(
                f"image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                "convert colour or vector images to a single scalar channel first"
            )
        if image.GetDimension() == 2:
            image = sitk.JoinSeries(image)
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 2D or 3D image, got {image.GetDimension()}D")
        return cls(
            sitk.GetArrayFromImage(image),
            np.array(image.GetSpacing()),
            np.array(image.GetOrigin()),
            np.array(image.GetDirection()).reshape(3, 3),
        )


# ---- resampling, cropping, padding ----------------------------------------------------------
def resample_to_spacing(
    volume: Volume,
    spacing: Sequence[float] | float,
    is_label: bool = False,
    default_value: float | None = None,
) -> Volume:
    """Resample onto a grid of new spacing covering the same physical box, same direction.

    Voxel *edges* of the old and new grid coincide at the low corner, so the field of view is
    preserved (the usual convention of MONAI ``Spacing`` and SimpleITK scripts). Images use
    linear interpolation, labels nearest neighbour. Axes whose old size is 1 (2D images) keep
    their single slice and spacing.
    """
    import SimpleITK as sitk

    new_spacing = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    size_old = np.asarray(volume.shape_ijk)
    flat = size_old == 1
    new_spacing[flat] = volume.spacing[flat]
    extent = size_old * volume.spacing
    new_size = np.maximum(1, np.round(extent / new_spacing).astype(int))
    # Shift the first voxel centre so that the low edges of both grids coincide.
    offset_ijk = 0.5 * (new_spacing - volume.spacing) / volume.spacing
    new_origin = volume.index_to_world(offset_ijk)
    if default_value is None:
        default_value = 0 if is_label else float(volume.array.min()) if volume.array.size else 0.0
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([float(s) for s in new_spacing])
    f.SetSize([int(s) for s in new_size])
    f.SetOutputOrigin([float(o) for o in new_origin])
    f.SetOutputDirection([float(d) for d in volume.direction.reshape(-1)])
    f.SetInterpolator(sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear)
    f.SetDefaultPixelValue(float(default_value))
    src = volume.to_sitk()
    if not is_label and src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        src = sitk.Cast(src, sitk.sitkFloat32)
    return Volume.from_sitk(f.Execute(src))


def resample_like(
    volume: Volume, reference: Volume, is_label: bool = False, default_value: float | None = None
) -> Volume:
    """Resample ``volume`` onto the voxel grid of ``reference`` (world positions are kept)."""
    import SimpleITK as sitk

    if default_value is None:
        default_value = 0 if is_label else float(volume.array.min()) if volume.array.size else 0.0
    src = volume.to_sitk()
    if not is_label and src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        src = sitk.Cast(src, sitk.sitkFloat32)
    out = sitk.Resample(
        src,
        reference.to_sitk(),
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear,
        float(default_value),
    )
    return Volume.from_sitk(out)


def crop(volume: Volume, start_ijk: Sequence[int], size_ijk: Sequence[int]) -> Volume:
    """Crop a box given in voxel indices (i, j, k); the box must lie inside the volume."""
    start = np.asarray(start_ijk, dtype=int)
    size = np.asarray(size_ijk, dtype=int)
    shape = np.asarray(volume.shape_ijk)
    if np.any(start < 0) or np.any(start + size > shape) or np.any(size < 1):
        raise ValueError(f"crop box start={start.tolist()} size={size.tolist()} is outside volume {shape.tolist()}")
    i0, j0, k0 = start
    i1, j1, k1 = start + size
    return Volume(
        volume.array[k0:k1, j0:j1, i0:i1].copy(),
        volume.spacing.copy(),
        volume.index_to_world(start.astype(np.float64)),
        volume.direction.copy(),
    )


def pad(
    volume: Volume, before_ijk: Sequence[int], after_ijk: Sequence[int], value: float = 0.0
) -> Volume:
    """Pad with a constant; the world position of every existing voxel is unchanged."""
    b = np.asarray(before_ijk, dtype=int)
    a = np.asarray(after_ijk, dtype=int)
    if np.any(b < 0) or np.any(a < 0):
        raise ValueError("pad widths must be non-negative")
    arr = np.pad(volume.array, ((b[2], a[2]), (b[1], a[1]), (b[0], a[0])), constant_values=value)
    return Volume(arr, volume.spacing.copy(), volume.index_to_world(-b.astype(np.float64)), volume.direction.copy())


def crop_or_pad(
    volume: Volume, start_ijk: Sequence[int], size_ijk: Sequence[int], value: float = 0.0
) -> Volume:
    """Extract a box that may extend past the volume; the outside is filled with ``value``."""
    start = np.asarray(start_ijk, dtype=int)
    size = np.asarray(size_ijk, dtype=int)
    shape = np.asarray(volume.shape_ijk)
    before = np.maximum(0, -start)
    after = np.maximum(0, start + size - shape)
    padded = pad(volume, before, after, value) if (before.any() or after.any()) else volume
    return crop(padded, start + before, size)


def pad_to_multiple(volume: Volume, multiple: int, value: float = 0.0, min_size: int = 0) -> tuple[Volume, np.ndarray]:
    """Pad (after the end of each axis) to a multiple of ``multiple`` voxels and at least ``min_size``.

    Returns the padded volume and the pad widths along (i, j, k). Networks with several
    stride-2 levels need this.
    """
    shape = np.asarray(volume.shape_ijk)
    target = np.maximum(np.ceil(shape / multiple).astype(int) * multiple, min_size)
    after = target - shape
    if not after.any():
        return volume, after
    return pad(volume, np.zeros(3, dtype=int), after, value), after


def reorient_to_canonical(volume: Volume) -> Volume:
    """Permute and flip the array axes so that i, j, k point as closely as possible to L, P, S.

    The world geometry is unchanged and no voxel is interpolated (pure index shuffle): a world point
    keeps its intensity. Networks learn on canonically oriented arrays (a phantom's "up" is +k), so an
    axial scan stored upside down or a sagittal acquisition is turned back before it is embedded or
    used for training. Oblique residuals (< 45 degrees) stay in ``direction``.
    """
    d = volume.direction
    # Greedy assignment of array axes to world axes by largest |cosine| (unique for orthonormal d).
    order = [-1, -1, -1]  # order[w] = array axis (0=i, 1=j, 2=k) that points along world axis w
    free_axes, free_world = {0, 1, 2}, {0, 1, 2}
    for _ in range(3):
        w, a = max(((w, a) for w in free_world for a in free_axes), key=lambda wa: abs(d[wa[0], wa[1]]))
        order[w] = a
        free_world.discard(w)
        free_axes.discard(a)
    signs = np.array([np.sign(d[w, order[w]]) or 1.0 for w in range(3)])
    if order == [0, 1, 2] and np.all(signs > 0):
        return volume
    shape = np.asarray(volume.shape_ijk)
    # Array indices are [k, j, i]: ijk axis a is numpy axis 2 - a.
    arr = np.transpose(volume.array, [2 - order[2], 2 - order[1], 2 - order[0]])
    flips = tuple(2 - w for w in range(3) if signs[w] < 0)
    if flips:
        arr = np.flip(arr, axis=flips)
    new_direction = d[:, order] * signs[None, :]
    new_spacing = volume.spacing[order]
    # The new first voxel is the old voxel at the far end of every flipped axis.
    corner = np.zeros(3)
    for w in range(3):
        if signs[w] < 0:
            corner[order[w]] = shape[order[w]] - 1
    origin = volume.index_to_world(corner)
    return Volume(np.ascontiguousarray(arr), new_spacing, origin, new_direction)
