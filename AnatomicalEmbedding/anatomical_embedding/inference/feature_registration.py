"""Dense registration in embedding space: refine the robust prior into an affine + smooth deformation.

The robust prior (:mod:`prior`) fits an affine to a few hundred coarse matches, whose cell is 8 voxels (32 mm
at 4 mm): its predictions are off by several mm. Following SAME (Liu et al., MICCAI 2021: SAM-affine, then
SAM-coarse and deformable stages driven by the embedding similarity), this module maximises the mean
similarity ``cos_coarse + cos_fine`` between the source's embedding at thousands of foreground voxels and the
target's embedding at their transformed positions, first over an affine, then over a smooth displacement
field. Every voxel votes, so the transform is far more precise than any single match at the model's spacing.

Ours differs from SAME: no network is trained for the deformation (a CPU-friendly L-BFGS fit of a trilinear
displacement grid with a membrane-energy penalty replaces their registration network), and the loss is the
dot product with the interpolated (not re-normalised) target vectors, which keeps the gradient analytic.
numpy and scipy only: it runs on the ONNX path without PyTorch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.sparse import csr_matrix

from anatomical_embedding.inference.embedding import VolumeEmbedding, normalise, trilinear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    #: Source voxels sampled (foreground of the valid region, seeded).
    max_points: int = 20000
    #: The first affine stage (the capture, which moves furthest) uses an even, seeded subset of this many of
    #: them; ``None``: all. Ours, not SAME's: on 36 intra-subject real pairs (18 CT, 18 MR) 5000 points there gave
    #: the same mean errors as 20000 (1.537 vs 1.541 mm CT, 0.656 vs 0.655 mm MR) with matching 22-33 %
    #: faster; 2500 cost 0.03 mm on MR.
    capture_points: int | None = 5000
    #: (coarse, fine) weights of the similarity in each affine stage, run in turn (0: level unused). The coarse
    #: level widens the capture range from the prior; the fine level alone is the more precise (the coarse
    #: map's 8-voxel cells bias it).
    affine_stages: tuple[tuple[float, float], ...] = ((1.0, 1.0), (0.0, 1.0))
    #: (coarse, fine) weights of the deformable stage.
    deformable_weights: tuple[float, float] = (0.0, 1.0)
    affine_iterations: int = 100
    #: Smooth displacement after the affine (trilinear grid of ``grid_mm`` spacing).
    deformable: bool = True
    grid_mm: float = 32.0
    #: Membrane energy weight: lambda x mean squared displacement difference between grid neighbours (mm^2).
    smoothness: float = 0.05
    deformable_iterations: int = 100
    #: L-BFGS-B stops when the objective (a mean cosine similarity, ~1) improves by less than this fraction. SciPy's
    #: default (2.2e-9) cost 30 % more time on 21 real pairs for a 0.01 mm lower mean error (1.013 vs 1.024 mm).
    tolerance: float = 1e-6
    #: Foreground: voxels whose prepared intensity exceeds background by this fraction of the range.
    foreground_fraction: float = 0.05
    #: Dense fine maps of both images must fit in this many bytes (float32); wider models skip the refinement.
    max_feature_bytes: int = 1 << 30
    seed: int = 0
    #: Extra starts of the affine stages, each from the same initial affine on another seeded sample, tried when
    #: the first ends implausible or below ``restart_below`` similarity; the plausible result with the highest
    #: similarity on the first sample wins. Ours, not SAME's: on the cross-subject CT slab pairs one sample's
    #: optimum decided between 27 and 59 mm (or a refusal), while the best similarity picked the lowest error.
    restarts: int = 4
    #: Intra-subject real pairs end at 0.74-0.92, cross-subject CT at 0.20-0.50: only doubtful fits pay restarts.
    restart_below: float = 0.6
    #: More starts of a doubtful fit, on the first sample: the initial affine shifted along each world axis on
    #: which the target's foreground is longer than the source's, evenly up to half the difference both ways
    #: (at least half a coarse cell apart), at most this many (:func:`shift_offsets`). Ours: a slab's start from
    #: the centres of mass can sit tens of mm off along the axis it was cut from; on two real brain slabs
    #: (bench_real's lowest) starts 15-30 mm lower ended at similarity 0.74-0.80 and 0.5-1.3 mm, every other
    #: start at 0.17-0.47 or implausible, 74-768 mm off.
    shift_starts: int = 8


def world_to_index_matrix(emb: VolumeEmbedding) -> np.ndarray:
    """4x4 matrix of the (affine) LPS world -> voxel index map of the prepared grid."""
    pts = np.vstack([np.zeros(3), np.eye(3) * 100.0])
    ijk = emb.world_to_index(pts)
    m = np.eye(4)
    m[:3, :3] = ((ijk[1:] - ijk[0]) / 100.0).T
    m[:3, 3] = ijk[0]
    return m


def channels_last(grid: np.ndarray) -> np.ndarray:
    """(C, K, J, I) -> contiguous float32 (K, J, I, C): one corner gather reads a row (fast on a CPU)."""
    return np.ascontiguousarray(np.moveaxis(grid, 0, -1), dtype=np.float32)


#: Offsets (i, j, k) of the 8 trilinear corners, in the order :func:`projected_trilinear` combines them.
_CORNERS = np.array([(di, dj, dk) for dk in (0, 1) for dj in (0, 1) for di in (0, 1)], dtype=np.intp)


def projected_trilinear(grid: np.ndarray, coords: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``q . v(c)`` (N,) and its derivative (N, 3) along (i, j, k), where ``v`` is the trilinear value of ``grid``
    (K, J, I, C) at ``coords`` (N, 3) and ``q`` the matching row of ``query`` (N, C).

    Trilinear interpolation is linear in the corner vectors, so each point's 8 corners are projected on its
    query first and the interpolation and its derivatives run on scalars: the (N, C) work is one gather and one
    dot product per corner (a dense refinement's cost), not the value and gradient of every channel.
    ``grid`` is channels-last (:func:`channels_last`); coordinates are clamped to the grid and outside it the
    derivative is zero.
    """
    K, J, I, C = grid.shape
    hi = np.array([I - 1, J - 1, K - 1], dtype=np.float64)
    c = np.clip(coords, 0, hi)
    inside = np.all((coords >= 0) & (coords <= hi), axis=1)
    i0 = np.minimum(np.floor(c).astype(np.intp), np.maximum(hi.astype(np.intp) - 1, 0))
    f = c - i0
    step = np.array([1 if I > 1 else 0, I if J > 1 else 0, I * J if K > 1 else 0], dtype=np.intp)
    base = i0[:, 0] + I * i0[:, 1] + I * J * i0[:, 2]
    flat = grid.reshape(-1, C)
    q = np.asarray(query, dtype=grid.dtype)
    # (8, N): corner (di, dj, dk) at row di + 2 dj + 4 dk. One np.take of all corners and a batched matmul: ~3x
    # faster than a fancy-index gather and an einsum per corner.
    corners = np.take(flat, (base[:, None] + _CORNERS @ step).ravel(), axis=0).reshape(len(base), 8, C)
    p = np.matmul(corners, q[:, :, None])[..., 0].T.astype(np.float64)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    p00, p10 = p[0] + (p[1] - p[0]) * fx, p[2] + (p[3] - p[2]) * fx   # along i, at (j, k) = (0, 0), (1, 0)
    p01, p11 = p[4] + (p[5] - p[4]) * fx, p[6] + (p[7] - p[6]) * fx   # (0, 1), (1, 1)
    p0, p1 = p00 + (p10 - p00) * fy, p01 + (p11 - p01) * fy
    val = p0 + (p1 - p0) * fz
    dx = ((p[1] - p[0]) * (1 - fy) + (p[3] - p[2]) * fy) * (1 - fz) + ((p[5] - p[4]) * (1 - fy) + (p[7] - p[6]) * fy) * fz
    dy = (p10 - p00) * (1 - fz) + (p11 - p01) * fz
    dz = p1 - p0
    return val, np.stack([dx, dy, dz], axis=1) * inside[:, None]


@dataclass
class _Features:
    """Target feature volumes and source samples for one level."""

    grid: np.ndarray          # (K, J, I, C) target features on their own grid (channels last)
    to_grid: np.ndarray       # 4x4: target LPS world -> grid index (i, j, k)
    query: np.ndarray         # (N, C) normalised source features at the sample points
    weight: float


def _coarse_query(source: VolumeEmbedding, src_ijk: np.ndarray) -> np.ndarray:
    return normalise(trilinear(source.coarse, source.voxel_to_coarse(src_ijk))).astype(np.float32)


def _fine_query(source: VolumeEmbedding, src_ijk: np.ndarray) -> np.ndarray:
    return normalise(trilinear(source.dense_fine(), src_ijk)).astype(np.float32)


#: Each level's source features at sample points (the part of a level that depends on the sample).
_QUERIES = {"coarse": _coarse_query, "fine": _fine_query}


def _coarse_level(source: VolumeEmbedding, target: VolumeEmbedding, src_ijk: np.ndarray, weight: float) -> _Features:
    s = target.stride
    to_vox = world_to_index_matrix(target)
    to_cells = np.eye(4)
    to_cells[:3, :3] /= s
    to_cells[:3, 3] = -(s - 1) / 2.0 / s
    return _Features(channels_last(target.coarse), to_cells @ to_vox, _coarse_query(source, src_ijk), weight)


def _fine_level(source: VolumeEmbedding, target: VolumeEmbedding, src_ijk: np.ndarray, weight: float) -> _Features:
    return _Features(channels_last(target.dense_fine()), world_to_index_matrix(target), _fine_query(source, src_ijk),
                     weight)


def _foreground(source: VolumeEmbedding, config: RefineConfig) -> np.ndarray:
    """Boolean foreground mask (k, j, i) of the source's valid region."""
    a, n = source.valid_start, source.valid_size
    arr = source.prepared.array[a[2]:a[2] + n[2], a[1]:a[1] + n[1], a[0]:a[0] + n[0]]
    lo, hi = float(arr.min()), float(arr.max())
    return arr > lo + config.foreground_fraction * (hi - lo)


def foreground_count(source: VolumeEmbedding, config: RefineConfig) -> int:
    """How many voxels :func:`sample_points` draws from."""
    return int(np.count_nonzero(_foreground(source, config)))


def _sample(source: VolumeEmbedding, config: RefineConfig) -> tuple[np.ndarray, int]:
    """(:func:`sample_points`, how many foreground voxels they were drawn from)."""
    a = source.valid_start
    kji = np.argwhere(_foreground(source, config))
    foreground = len(kji)
    if foreground > config.max_points:
        kji = kji[np.sort(np.random.default_rng(config.seed).choice(foreground, config.max_points, replace=False))]
    return kji[:, ::-1].astype(np.float64) + a, foreground


def sample_points(source: VolumeEmbedding, config: RefineConfig) -> np.ndarray:
    """Foreground voxels (i, j, k) of the source's valid region, at most ``max_points`` (seeded)."""
    return _sample(source, config)[0]


def capture_rows(n: int, config: RefineConfig) -> np.ndarray | None:
    """Rows of the first affine stage among ``n`` sample points: an even, seeded subset of
    ``config.capture_points`` in their original (memory-friendly) order, or ``None`` for all of them."""
    k = config.capture_points
    if k is None or k >= n:
        return None
    return np.sort(np.random.default_rng([config.seed, 2]).choice(n, k, replace=False))


def _foreground_world(emb: VolumeEmbedding, config: RefineConfig) -> np.ndarray:
    """LPS positions of all the foreground voxels :func:`sample_points` draws from, not a seeded sample (ValueError
    if none: a constant image has no centre or extent to align)."""
    points = sample_points(emb, replace(config, max_points=np.iinfo(np.int64).max))
    if not len(points):
        raise ValueError("feature registration: the image has no foreground (its valid region is constant)")
    return emb.index_to_world(points)


def foreground_centroid(emb: VolumeEmbedding, config: RefineConfig) -> np.ndarray:
    """LPS centre of mass of the foreground voxels that :func:`sample_points` draws from (ValueError if none): all of
    them, so every restart of the refinement starts from the same translation."""
    return _foreground_world(emb, config).mean(axis=0)


def _similarity(levels: list[_Features], yw: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean weighted similarity at target world points yw (N, 3) and its gradient wrt yw."""
    total = 0.0
    grad = np.zeros_like(yw)
    norm = sum(f.weight for f in levels)
    for f in levels:
        g = yw @ f.to_grid[:3, :3].T + f.to_grid[:3, 3]
        val, dg = projected_trilinear(f.grid, g, f.query)  # d sim / d grid index
        total += f.weight * float(np.mean(val))
        grad += f.weight * dg @ f.to_grid[:3, :3]
    n = len(yw)
    return total / norm, grad / (norm * n)


@dataclass
class FeatureTransform:
    """LPS source -> target: affine then a trilinear displacement grid (mm) over the source's box."""

    affine: np.ndarray
    grid_origin: np.ndarray | None = None   # LPS of grid node (0, 0, 0), axis-aligned in LPS
    grid_step: float = 0.0
    displacement: np.ndarray | None = None  # (Nx, Ny, Nz, 3) mm
    similarity: float = float("nan")
    affine_similarity: float = float("nan")
    #: Starts of the affine stages tried (1 + restarts when the first start was doubtful).
    starts: int = 1

    def summary(self) -> dict:
        d = self.displacement
        return {"affine": np.round(self.affine, 5).tolist(), "affine_similarity": round(self.affine_similarity, 4),
                "starts": self.starts,
                "similarity": round(self.similarity, 4), "grid": None if d is None else list(d.shape[:3]),
                "max_displacement_mm": None if d is None else round(float(np.linalg.norm(d, axis=-1).max()), 2)}

    def predict(self, points_lps: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        out = p @ self.affine[:3, :3].T + self.affine[:3, 3]
        if self.displacement is not None:
            d = self.displacement
            out = out + _interpolation(d.shape[:3], (p - self.grid_origin) / self.grid_step) @ d.reshape(-1, 3)
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (``np.savez``, no pickle); :meth:`from_arrays` rebuilds an equal transform."""
        out = {"affine": np.asarray(self.affine, dtype=np.float64), "grid_step": np.float64(self.grid_step),
               "similarity": np.float64(self.similarity), "affine_similarity": np.float64(self.affine_similarity),
               "starts": np.int64(self.starts)}
        if self.displacement is not None:
            out["grid_origin"] = np.asarray(self.grid_origin, dtype=np.float64)
            out["displacement"] = np.asarray(self.displacement)
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "FeatureTransform":
        """The transform of :meth:`to_arrays`' arrays (a dict or an ``np.load`` file)."""
        displaced = "displacement" in arrays
        return cls(np.array(arrays["affine"], dtype=np.float64),
                   np.array(arrays["grid_origin"], dtype=np.float64) if displaced else None,
                   float(arrays["grid_step"]), np.array(arrays["displacement"]) if displaced else None,
                   float(arrays["similarity"]), float(arrays["affine_similarity"]),
                   int(arrays["starts"]) if "starts" in arrays else 1)  # priors saved before restarts existed


def _interpolation(shape: tuple[int, ...], c: np.ndarray) -> csr_matrix:
    """Trilinear interpolation at grid coordinates c (N, 3) on a grid of ``shape`` (clamped to it) as a sparse
    (N x nodes) matrix over the C-order flattened grid: its product with the grid's values (nodes, 3) is the
    interpolated displacement, and its transpose scatters a gradient back onto the nodes. Shared by
    :meth:`FeatureTransform.predict` and the deformable fit."""
    shape = np.asarray(shape)
    c = np.clip(c, 0, shape - 1)
    i0 = np.minimum(np.floor(c).astype(np.intp), np.maximum(shape - 2, 0))
    f = c - i0
    nodes, weights = [], []
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                idx = np.minimum(i0 + [dx, dy, dz], shape - 1)
                nodes.append(np.ravel_multi_index(idx.T, tuple(shape)))
                weights.append((f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
                               * (f[:, 2] if dz else 1 - f[:, 2]))
    rows = np.tile(np.arange(len(c)), 8)
    return csr_matrix((np.concatenate(weights), (rows, np.concatenate(nodes))), shape=(len(c), int(np.prod(shape))))


def _membrane(disp: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared difference of neighbouring displacements (mm^2) and its gradient."""
    e, g = 0.0, np.zeros_like(disp)
    count = 0
    for axis in range(3):
        if disp.shape[axis] < 2:
            continue
        d = np.diff(disp, axis=axis)
        e += float(np.sum(d * d))
        count += d.size
        pad_lo = [(0, 0)] * 4
        pad_hi = [(0, 0)] * 4
        pad_lo[axis] = (1, 0)
        pad_hi[axis] = (0, 1)
        g += 2 * (np.pad(d, pad_lo) - np.pad(d, pad_hi))
    count = max(count, 1)
    return e / count, g / count


def _levels(source: VolumeEmbedding, target: VolumeEmbedding, src_ijk: np.ndarray,
            weights: tuple[float, float], cache: dict, rows: np.ndarray | None = None) -> list[_Features]:
    """The weighted levels of one stage (feature volumes built once per level and reused), on the sample
    points ``rows`` of ``src_ijk`` (``None``: all)."""
    out = []
    for name, w in zip(("coarse", "fine"), weights):
        if w <= 0:
            continue
        if name not in cache:
            cache[name] = (_coarse_level if name == "coarse" else _fine_level)(source, target, src_ijk, 1.0)
        f = cache[name]
        out.append(_Features(f.grid, f.to_grid, f.query if rows is None else f.query[rows], float(w)))
    return out


def _fit_affine_stage(levels: list[_Features], x: np.ndarray, affine: np.ndarray, iterations: int,
                      tolerance: float) -> tuple[np.ndarray, float, int]:
    """L-BFGS of the 12 affine parameters from ``affine``: (affine, similarity, iterations)."""
    centre = x.mean(axis=0)
    xc = x - centre
    scale = float(np.sqrt(np.mean(np.sum(xc ** 2, axis=1)))) or 1.0  # conditioning: parameters in mm at ~1 radius
    p0 = np.concatenate([(affine[:3, :3] * scale).ravel(), affine[:3, :3] @ centre + affine[:3, 3]])

    def objective(p):
        A, t = p[:9].reshape(3, 3) / scale, p[9:]
        sim, g = _similarity(levels, xc @ A.T + t)
        return -sim, -np.concatenate([(g.T @ xc / scale).ravel(), g.sum(axis=0)])

    r = minimize(objective, p0, jac=True, method="L-BFGS-B", options={"maxiter": iterations, "ftol": tolerance})
    A, t = r.x[:9].reshape(3, 3) / scale, r.x[9:]
    out = np.eye(4)
    out[:3, :3] = A
    out[:3, 3] = t - A @ centre
    return out, -float(r.fun), int(r.nit)


def deformable_objective(levels: list[_Features], x: np.ndarray, y_affine: np.ndarray, config: RefineConfig
                         ) -> tuple[np.ndarray, tuple[int, int, int], Callable[[np.ndarray], tuple[float, np.ndarray]]]:
    """(grid origin, grid shape, objective) of the deformable stage: a trilinear displacement grid of
    ``config.grid_mm`` over x's box; ``objective(p)`` = (-similarity + smoothness x membrane, gradient) for the
    flattened displacements p (mm)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    step = float(config.grid_mm)
    shape = tuple(int(n) for n in np.maximum(np.ceil((hi - lo) / step).astype(int) + 1, 2))
    # The gather is one sparse product and the gradient's scatter onto the nodes one product with the transpose
    # (4x and 10x faster than a corner gather and weighted bincounts).
    interp = _interpolation(shape, (x - lo) / step)
    scatter = interp.T.tocsr()

    def objective(p: np.ndarray) -> tuple[float, np.ndarray]:
        disp = p.reshape(*shape, 3)
        sim, g = _similarity(levels, y_affine + interp @ disp.reshape(-1, 3))
        e, ge = _membrane(disp)
        gd = (scatter @ g).reshape(*shape, 3)
        return -sim + config.smoothness * e, (-gd + config.smoothness * ge).ravel()

    return lo, shape, objective


def _fit_deformable(levels: list[_Features], x: np.ndarray, y_affine: np.ndarray, config: RefineConfig
                    ) -> tuple[np.ndarray, np.ndarray, float, int]:
    """L-BFGS of the displacement grid (:func:`deformable_objective`): (grid origin, displacement, objective,
    iterations)."""
    lo, shape, objective = deformable_objective(levels, x, y_affine, config)
    r = minimize(objective, np.zeros(int(np.prod(shape)) * 3), jac=True, method="L-BFGS-B",
                 options={"maxiter": config.deformable_iterations, "ftol": config.tolerance})
    return lo, r.x.reshape(*shape, 3), -float(r.fun), int(r.nit)


def _affine_stages(source: VolumeEmbedding, target: VolumeEmbedding, src_ijk: np.ndarray, x: np.ndarray,
                   affine: np.ndarray, config: RefineConfig, cache: dict) -> tuple[np.ndarray, float]:
    """The affine stages in turn from ``affine`` on the sample ``src_ijk`` (world ``x``): (affine, similarity)."""
    sim = float("nan")
    for stage, weights in enumerate(config.affine_stages):
        rows = capture_rows(len(x), config) if stage == 0 else None
        affine, sim, nit = _fit_affine_stage(_levels(source, target, src_ijk, weights, cache, rows),
                                             x if rows is None else x[rows], affine, config.affine_iterations,
                                             config.tolerance)
        log.info("feature registration: affine stage %s: similarity %.4f (%d iterations)", weights, sim, nit)
    return affine, sim


def _restart(source: VolumeEmbedding, target: VolumeEmbedding, src_ijk: np.ndarray, x: np.ndarray,
             initial: np.ndarray, first: np.ndarray, first_sim: float, config: RefineConfig, cache: dict,
             plausible: Callable[[np.ndarray], bool], reseed: bool = True,
             offsets: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float, int]:
    """The best of ``first``, ``config.restarts`` more starts from ``initial`` on other seeded samples (when
    ``reseed``) and the starts from ``initial`` shifted by ``offsets`` (:func:`shift_offsets`) on the first sample,
    each scored on the first sample with the last stage's weights (one yardstick): (affine, similarity, starts).
    ``first`` is kept, whatever its score, when no start is plausible (the caller refuses it)."""
    last = _levels(source, target, src_ijk, config.affine_stages[-1], cache)

    def score(a: np.ndarray) -> float:
        return _similarity(last, x @ a[:3, :3].T + a[:3, 3])[0] if plausible(a) else -np.inf

    best, best_score = first, score(first)
    total = 1 + (config.restarts if reseed else 0) + len(offsets)
    for off in offsets:
        shifted = initial.copy()
        shifted[:3, 3] += off
        a, _ = _affine_stages(source, target, src_ijk, x, shifted, config, cache)
        s = score(a)
        log.info("feature registration: start shifted by %s mm: similarity %.4f", np.round(off, 1).tolist(), s)
        if s > best_score:
            best, best_score = a, s
    for r in range(1, (config.restarts if reseed else 0) + 1):
        other = replace(config, seed=config.seed + r)
        ijk = sample_points(source, other)
        # The target's channels-last grids are the first start's; only the source queries follow the sample.
        levels = {name: replace(f, query=_QUERIES[name](source, ijk)) for name, f in cache.items()}
        a, _ = _affine_stages(source, target, ijk, source.index_to_world(ijk), initial, other, levels)
        s = score(a)
        log.info("feature registration: reseeded start %d of %d: similarity %.4f on the first sample", r,
                 config.restarts, s)
        if s > best_score:
            best, best_score = a, s
    if not np.isfinite(best_score):
        return first, first_sim, total
    return best, float(best_score), total


def foreground_box(emb: VolumeEmbedding, config: RefineConfig) -> tuple[np.ndarray, np.ndarray]:
    """LPS (min, max) of the foreground voxels that :func:`sample_points` draws from (all of them)."""
    points = _foreground_world(emb, config)
    return points.min(axis=0), points.max(axis=0)


def shift_offsets(source: VolumeEmbedding, target: VolumeEmbedding, config: RefineConfig) -> list[np.ndarray]:
    """Translations (LPS mm) of :attr:`RefineConfig.shift_starts`: along each world axis where the target's
    foreground box is longer than the source's by ``room``, up to ``room / 2`` both ways in even steps of at least
    half a coarse cell, shared out over those axes; nearest first, at most ``config.shift_starts``."""
    if config.shift_starts <= 0:
        return []
    (s_lo, s_hi), (t_lo, t_hi) = foreground_box(source, config), foreground_box(target, config)
    room = np.maximum((t_hi - t_lo) - (s_hi - s_lo), 0.0)
    min_step = target.stride * float(np.max(target.prepared.spacing)) / 2.0
    axes = [a for a in range(3) if room[a] / 2.0 >= min_step]
    if not axes:
        return []
    per_side = max(1, config.shift_starts // (2 * len(axes)))
    out = []
    for a in axes:
        n = int(min(per_side, room[a] / 2.0 // min_step))
        for k in range(1, n + 1):
            for sign in (-1.0, 1.0):
                off = np.zeros(3)
                off[a] = sign * room[a] / 2.0 * k / n
                out.append(off)
    out.sort(key=lambda o: float(np.abs(o).max()))
    return out[:config.shift_starts]


def _samples_vary(n_points: int, foreground: int, config: RefineConfig) -> bool:
    """Whether another seed changes the sample or the capture subset (else a restart repeats the first start)."""
    return foreground > config.max_points or (config.capture_points is not None and n_points > config.capture_points)


def refine_transform(source: VolumeEmbedding, target: VolumeEmbedding, initial_affine: np.ndarray,
                     config: RefineConfig | None = None,
                     plausible: Callable[[np.ndarray], bool] | None = None) -> FeatureTransform:
    """Affine stages, then a smooth deformation, maximising the embedding similarity from ``initial_affine``.

    ``plausible(affine)`` (default: any) rejects affine results that cannot be right (the robust prior passes its
    scale and mirroring checks); a doubtful first start triggers ``config.restarts`` more, and the shifted starts
    of ``config.shift_starts``.
    """
    config = config or RefineConfig()
    plausible = plausible or (lambda a: True)
    needed = 4 * int(target.model.fine_channels) * int(source.prepared.array.size + target.prepared.array.size)
    if any(w > 0 for w in (*(f for _, f in config.affine_stages), config.deformable_weights[1])) \
            and needed > config.max_feature_bytes:
        raise ValueError(f"feature registration: dense fine maps would need {needed / 2 ** 30:.1f} GiB (limit "
                         f"{config.max_feature_bytes / 2 ** 30:.1f} GiB; raise RefineConfig.max_feature_bytes)")
    src_ijk, foreground = _sample(source, config)
    if len(src_ijk) < 100:
        raise ValueError(f"feature registration: only {len(src_ijk)} foreground voxels in the source")
    x = source.index_to_world(src_ijk)
    cache: dict = {}
    initial = np.asarray(initial_affine, dtype=np.float64)
    affine, sim = _affine_stages(source, target, src_ijk, x, initial, config, cache)
    starts = 1
    if not plausible(affine) or not sim >= config.restart_below:  # doubtful: more starts, if any can differ
        reseed = config.restarts > 0 and _samples_vary(len(x), foreground, config)
        offsets = shift_offsets(source, target, config)
        if reseed or offsets:
            affine, sim, starts = _restart(source, target, src_ijk, x, initial, affine, sim, config, cache,
                                            plausible, reseed, offsets)
    out = FeatureTransform(affine, similarity=sim, affine_similarity=sim, starts=starts)
    if config.deformable:
        levels = _levels(source, target, src_ijk, config.deformable_weights, cache)
        y = x @ affine[:3, :3].T + affine[:3, 3]
        out.grid_origin, out.displacement, out.similarity, nit = _fit_deformable(levels, x, y, config)
        out.grid_step = float(config.grid_mm)
        log.info("feature registration: deformable objective %.4f (%d iterations, grid %s)", out.similarity, nit,
                 list(out.displacement.shape[:3]))
    return out
