"""Known-deformation pairs from one real volume: the moved image, structure points picked in it, and their exact
positions in the original (``benchmarks/bench_real.py`` intra-subject pairs and the demo's real CT pair).

``moved(q) = gain * source(T(q)) + offset + noise``: SimpleITK's resampling convention (the transform maps points of
the output grid to the input), so the truth of a point ``q`` picked in the moved image is ``T(q)`` in the source and
no transform is ever inverted. ``T`` is a random rotation (up to 10 degrees about a random axis through the
centre), translation (up to 20 mm), isotropic scale (within 5 %) and a cubic B-spline displacement (4 x 4 x 4 mesh,
coefficients N(0, 2 mm)). Structure points: local maxima of the local standard deviation (Gaussian window, sigma
4 mm) inside the body (foreground above Otsu, largest component, holes filled, eroded by 6 mm), greedily at least
20 mm apart, the point and its truth at least 10 mm inside both fields of view.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from anatomical_embedding.io import Volume


# ---- known transforms -------------------------------------------------------------------------------------
def volume_centre(volume) -> np.ndarray:
    return volume.index_to_world((np.asarray(volume.shape_ijk, dtype=float) - 1) / 2.0)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def random_transform(volume, seed: int, max_rotation_deg: float = 10.0, max_translation_mm: float = 20.0,
                     max_scale: float = 0.05, bspline_sigma_mm: float = 2.0, mesh: int = 4):
    """A known transform ``T`` (SimpleITK composite: B-spline first, then the affine) and its parameters."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    angle = rng.uniform(0.3, 1.0) * max_rotation_deg
    direction = rng.normal(size=3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.3, 1.0) * max_translation_mm
    scale = 1.0 + rng.uniform(-max_scale, max_scale)
    matrix = scale * _rotation(axis, np.deg2rad(angle))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(volume_centre(volume).tolist())
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(shift.tolist())
    transforms = [affine]
    if bspline_sigma_mm > 0:
        bspline = sitk.BSplineTransformInitializer(volume.to_sitk(), [mesh] * 3, order=3)
        bspline.SetParameters(rng.normal(0.0, bspline_sigma_mm, len(bspline.GetParameters())).tolist())
        transforms.append(bspline)
    params = {"seed": seed, "rotation_deg": round(float(angle), 3),
              "rotation_axis": (axis / np.linalg.norm(axis)).round(4).tolist(),
              "translation_mm": shift.round(3).tolist(), "scale": round(float(scale), 5),
              "bspline_mesh": mesh, "bspline_sigma_mm": bspline_sigma_mm}
    return sitk.CompositeTransform(transforms), params


def map_points(transform, points: np.ndarray) -> np.ndarray:
    """World points through a SimpleITK transform (moved-image point -> source point)."""
    return np.array([transform.TransformPoint([float(v) for v in p]) for p in np.atleast_2d(points)])


def random_intensity(seed: int, volume) -> dict:
    rng = np.random.default_rng(seed + 10_000)
    lo, hi = np.percentile(volume.array, [0.5, 99.5])
    span = float(hi - lo) or 1.0
    return {"gain": round(float(rng.uniform(0.85, 1.15)), 4),
            "offset": round(float(rng.uniform(-0.05, 0.05) * span), 4),
            "noise_sd": round(0.02 * span, 4), "seed": seed + 20_000}


def deform(volume, transform, intensity: dict | None = None):
    """``moved(q) = gain * volume(T(q)) + offset + noise`` on the volume's own grid (outside: the volume minimum)."""
    import SimpleITK as sitk

    src = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    moved = Volume.from_sitk(sitk.Resample(src, src, transform, sitk.sitkLinear, float(volume.array.min())))
    arr = moved.array.astype(np.float32)
    if intensity:
        rng = np.random.default_rng(intensity["seed"])
        arr = intensity["gain"] * arr + intensity["offset"] + rng.normal(0.0, intensity["noise_sd"], arr.shape)
    return moved.with_array(arr.astype(np.float32))


# ---- structure points ------------------------------------------------------------------------------------
def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an intensity sample (maximum between-class variance over a histogram)."""
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64).ravel(), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def body_mask(volume, erode_mm: float = 6.0) -> np.ndarray:
    """Foreground above Otsu's threshold, largest component, holes filled (3D and per slice), eroded."""
    from scipy import ndimage

    arr = volume.array
    fg = arr > otsu_threshold(arr)
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = ndimage.sum_labels(fg, lab, index=np.arange(1, n + 1))
        fg = lab == (1 + int(np.argmax(sizes)))
    fg = ndimage.binary_fill_holes(fg)
    for axis in range(3):  # lungs and bowel gas open to a border slice are filled slice by slice
        moved = np.moveaxis(fg, axis, 0)
        moved[:] = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    r = np.maximum(0, np.round(erode_mm / volume.spacing[::-1]).astype(int))
    if r.any():
        zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
        ball = (zz / max(r[0], 1)) ** 2 + (yy / max(r[1], 1)) ** 2 + (xx / max(r[2], 1)) ** 2 <= 1.0
        fg = ndimage.binary_erosion(fg, ball)
    return fg


def local_contrast(volume, sigma_mm: float = 4.0) -> np.ndarray:
    """Local standard deviation in a Gaussian window (per-voxel contrast score)."""
    from scipy import ndimage

    a = volume.array.astype(np.float64)
    s = sigma_mm / volume.spacing[::-1]
    m = ndimage.gaussian_filter(a, s)
    return np.sqrt(np.maximum(ndimage.gaussian_filter(a * a, s) - m * m, 0.0))


def select_structure_points(volume, n: int = 40, min_distance_mm: float = 20.0,
                            valid: Callable[[np.ndarray], np.ndarray] | None = None,
                            mask: np.ndarray | None = None, score: np.ndarray | None = None) -> np.ndarray:
    """Up to ``n`` world points (LPS) at local maxima of the local contrast inside ``mask`` (default: the body),
    greedily by decreasing score, each at least ``min_distance_mm`` from the others and accepted by ``valid``
    (a function of world points returning a boolean per point). Returns an (m, 3) array, m <= n."""
    from scipy import ndimage

    mask = body_mask(volume) if mask is None else mask
    score = local_contrast(volume) if score is None else score
    peaks = (score == ndimage.maximum_filter(score, size=3)) & mask & (score > 0)
    kji = np.argwhere(peaks)
    if len(kji) == 0:
        return np.zeros((0, 3))
    order = np.argsort(-score[tuple(kji.T)], kind="stable")
    world = volume.index_to_world(kji[order][:, ::-1].astype(float))
    if valid is not None:
        world = world[np.asarray(valid(world), dtype=bool)]
    chosen: list[np.ndarray] = []
    for p in world:
        if not chosen or np.min(np.linalg.norm(np.asarray(chosen) - p, axis=1)) >= min_distance_mm:
            chosen.append(p)
            if len(chosen) == n:
                break
    return np.asarray(chosen).reshape(-1, 3)


def grid_points_above(volume, threshold: float, margin: int, step: int) -> np.ndarray:
    """World points (LPS) on a voxel grid, every ``step`` voxels and ``margin`` from each face, where the image is
    above ``threshold`` (e.g. -300 HU: inside the body of a CT). A denser, simpler alternative to the
    structure points, for quick checks."""
    arr = volume.array
    kk, jj, ii = np.meshgrid(*[np.arange(margin, n - margin, step) for n in arr.shape], indexing="ij")
    above = arr[kk, jj, ii] > threshold
    return volume.index_to_world(np.stack([ii[above], jj[above], kk[above]], 1).astype(float))

def inside_fov(volume, points: np.ndarray, margin_mm: float = 10.0) -> np.ndarray:
    """True for world points at least ``margin_mm`` inside the volume's voxel-centre box."""
    ijk = volume.world_to_index(np.atleast_2d(points))
    m = margin_mm / volume.spacing
    return np.all((ijk >= m) & (ijk <= np.asarray(volume.shape_ijk) - 1 - m), axis=1)


@dataclass
class KnownPair:
    """A moved image, points picked in it (LPS), their truth in the source image, and what made them."""

    moved: Volume
    points: np.ndarray
    truth: np.ndarray
    info: dict = field(default_factory=dict)


def known_pair(volume: Volume, seed: int, n_points: int = 40) -> KnownPair:
    """Deform ``volume`` by a random known transform and intensity change, and pick structure points."""
    transform, params = random_transform(volume, seed)
    intensity = random_intensity(seed, volume)
    moved = deform(volume, transform, intensity)

    def valid(q):
        return inside_fov(moved, q) & inside_fov(volume, map_points(transform, q))

    pts = select_structure_points(moved, n_points, valid=valid)
    truth = map_points(transform, pts) if len(pts) else np.zeros((0, 3))
    disp = np.linalg.norm(truth - pts, axis=1)
    return KnownPair(moved, pts, truth, {
        "transform": params, "intensity": intensity, "n_points": int(len(pts)),
        "true_displacement_mm": {"mean": round(float(disp.mean()), 2) if len(disp) else None,
                                 "max": round(float(disp.max()), 2) if len(disp) else None}})
