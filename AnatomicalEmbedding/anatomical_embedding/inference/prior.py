"""Robust source->target transform from stable embedding matches (SAM-v2 style prior).

Raw argmax matching has far outliers (a look-alike structure elsewhere wins). Following SAM-v2's use of
stable points, we match a grid of source points at the coarse level, keep the *stable* ones
(forward-backward consistent and similar enough), fit an affine by RANSAC followed by an
iteratively re-weighted least-squares refit on the inliers, and optionally a smooth thin-plate-spline
correction of the inliers' residuals (scipy ``RBFInterpolator``). The result predicts, for any source
point, where it should land in the target; :mod:`matching` uses it to restrict and re-seed the search.

Differences from SAM-v2: their stable points come from full coarse+fine matching; ours are matched on
the coarse map only (with sub-cell parabolic refinement) because that is cheap for a few hundred points
on a CPU. By default the fitted affine is then refined densely in embedding space
(:mod:`feature_registration`: every foreground voxel votes, then a smooth deformation), and that transform
predicts the match; with ``PriorConfig(refine=None)`` the fine search around each query recovers the detail.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from anatomical_embedding.inference.embedding import VolumeEmbedding
from anatomical_embedding.inference.feature_registration import (
    FeatureTransform, RefineConfig, foreground_centroid, foreground_count, refine_transform)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PriorConfig:
    #: Grid step of candidate stable points, in coarse cells.
    grid_cells: int = 1
    #: At most this many grid points (subsampled evenly, seeded).
    max_points: int = 800
    #: Stable points need coarse cosine similarity at least this.
    min_similarity: float = 0.5
    #: ...and must match back to within this many coarse cells of where they started.
    fb_tolerance_cells: float = 1.0
    ransac_iterations: int = 400
    #: RANSAC inlier threshold in mm; ``None``: one coarse cell.
    inlier_mm: float | None = None
    #: Thin-plate-spline correction of inlier residuals after the affine.
    deformable: bool = True
    #: RBF smoothing (larger = smoother; scipy's ``smoothing``), in mm^2 per point.
    rbf_smoothing: float = 10.0
    #: Search radius around the prior's prediction in mm; ``None``: max(1.5 cells, 3 x held-out RMS), the RMS
    #: of each inlier's residual under a prior fitted without it (``cv_folds``-fold cross-validation).
    search_radius_mm: float | None = None
    #: Folds of the held-out residuals (the fitting points' own residuals under-estimate the error, most of
    #: all with the thin-plate spline, which bends towards them).
    cv_folds: int = 5
    #: Foreground: coarse cells whose mean prepared intensity exceeds background by this fraction of the range.
    foreground_fraction: float = 0.05
    seed: int = 0
    # Sanity limits: a fit outside them is degenerate (e.g. a weak model's few look-alike matches), and a
    # search ball around its predictions can miss the target altogether; the matcher then matches raw.
    #: Fewest RANSAC inliers for an accepted fit.
    min_inliers: int = 8
    #: Smallest share of the stable points that must be inliers.
    min_inlier_fraction: float = 0.2
    #: Accepted range of the affine's singular values (scale per direction) and of its determinant.
    scale_range: tuple[float, float] = (0.6, 1.6)
    #: Dense refinement of the fitted affine in embedding space (:mod:`feature_registration`, SAME-style); the
    #: matcher then answers with the refined transform's prediction. ``None``: the coarse prior only, whose
    #: search ball the fine search explores (this project's earlier behaviour).
    refine: RefineConfig | None = field(default_factory=RefineConfig)
    #: Fit with the images' roles swapped (target -> source, then inverted) when the target's foreground volume
    #: is below this fraction of the source's: the refinement samples the source, and only a source contained in
    #: the target has a match for every sample (registration's usual rule: the fixed image lies inside the
    #: moving one). Ours, not SAM's or SAME's. On bench_real's 60 mm slab pairs it lowered the mean error from
    #: 13.4 to 4.9 mm (CT) and from 24.1 to 13.4 mm (MR), before RefineConfig.shift_starts existed
    #: (benchmarks/results/real_no_reverse). ``None``: never.
    reverse_below: float | None = 0.5


@dataclass
class RobustPrior:
    """Affine (4x4, LPS world source -> target) plus optional smooth residual field."""

    affine: np.ndarray
    rbf: object | None
    inlier_rms_mm: float  # residual RMS of the inliers under the prior fitted on them (optimistic)
    search_radius_mm: float
    n_candidates: int
    n_stable: int
    n_inliers: int
    stable_source_lps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 3)))
    stable_target_lps: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 3)))
    heldout_rms_mm: float = float("nan")  # cross-validated residual RMS (sets the default search radius)
    #: The dense refinement (``PriorConfig.refine``); when present it makes the predictions.
    refined: FeatureTransform | None = None
    #: Where the refinement started: the stable points' affine, or the centres of mass when that was refused.
    initialisation: str = "stable points"
    #: Fitted with the roles swapped (``PriorConfig.reverse_below``): every stored part (affine, spline, stable
    #: points as source/target of that fit, refinement) maps target -> source, and the predictions invert it; the
    #: search radius alone is in the target's mm (:func:`forward_radius`).
    reversed: bool = False

    def predict(self, points_lps: np.ndarray) -> np.ndarray:
        if self.refined is not None:
            forward = self.refined.predict
            return invert_map(forward, self.refined.affine, points_lps) if self.reversed else forward(points_lps)
        return self.coarse_predict(points_lps)

    def coarse_predict(self, points_lps: np.ndarray) -> np.ndarray:
        """The prediction of the affine (+ spline) fitted on the coarse stable points."""
        if self.reversed:
            return invert_map(self._coarse_forward, self.affine, points_lps)
        return self._coarse_forward(points_lps)

    def _coarse_forward(self, points_lps: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
        out = p @ self.affine[:3, :3].T + self.affine[:3, 3]
        if self.rbf is not None:
            out = out + self.rbf(p)
        return out

    def summary(self) -> dict:
        return {
            "candidates": self.n_candidates, "stable": self.n_stable, "inliers": self.n_inliers,
            "inlier_rms_mm": round(self.inlier_rms_mm, 3), "heldout_rms_mm": round(self.heldout_rms_mm, 3),
            "search_radius_mm": round(self.search_radius_mm, 3),
            "deformable": self.rbf is not None, "affine": np.round(self.affine, 5).tolist(),
            "refined": None if self.refined is None else self.refined.summary(),
            "initialisation": self.initialisation, "reversed": self.reversed,
        }

    # ---- plain arrays (the viewer's child process hands its fitted prior over in an .npz) -------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for ``np.savez`` (no pickle); :meth:`from_arrays` rebuilds a prior whose ``predict`` and
        ``coarse_predict`` give the same results, bit for bit. The spline must be a ``RBFInterpolator`` (as
        :func:`fit_prior` makes) without ``neighbors``."""
        out = {"affine": np.asarray(self.affine, dtype=np.float64),
               "inlier_rms_mm": np.float64(self.inlier_rms_mm), "search_radius_mm": np.float64(self.search_radius_mm),
               "heldout_rms_mm": np.float64(self.heldout_rms_mm), "n_candidates": np.int64(self.n_candidates),
               "n_stable": np.int64(self.n_stable), "n_inliers": np.int64(self.n_inliers),
               "stable_source_lps": np.asarray(self.stable_source_lps, dtype=np.float64),
               "stable_target_lps": np.asarray(self.stable_target_lps, dtype=np.float64),
               "initialisation": np.str_(self.initialisation), "reversed": np.bool_(self.reversed)}
        if self.rbf is not None:
            out.update({f"rbf_{k}": v for k, v in _rbf_arrays(self.rbf).items()})
        if self.refined is not None:
            out.update({f"refined_{k}": v for k, v in self.refined.to_arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "RobustPrior":
        """The prior of :meth:`to_arrays`' arrays (a dict or an ``np.load(..., allow_pickle=False)`` file)."""
        names = list(arrays.keys())
        rbf = {k[4:]: arrays[k] for k in names if k.startswith("rbf_")}
        refined = {k[8:]: arrays[k] for k in names if k.startswith("refined_")}
        return cls(np.array(arrays["affine"], dtype=np.float64), _rbf_from_arrays(rbf) if rbf else None,
                   float(arrays["inlier_rms_mm"]), float(arrays["search_radius_mm"]), int(arrays["n_candidates"]),
                   int(arrays["n_stable"]), int(arrays["n_inliers"]), np.array(arrays["stable_source_lps"]),
                   np.array(arrays["stable_target_lps"]), float(arrays["heldout_rms_mm"]),
                   FeatureTransform.from_arrays(refined) if refined else None, str(arrays["initialisation"]),
                   bool(arrays["reversed"]) if "reversed" in names else False)  # (saved before it existed)


def invert_map(forward, affine: np.ndarray, points_lps: np.ndarray, tolerance_mm: float = 1e-3,
               iterations: int = 50) -> np.ndarray:
    """Points ``y`` with ``forward(y) = p`` for a map ``forward`` = ``affine`` + a smooth displacement: the
    fixed-point iteration ``y += A^-1 (p - forward(y))``, which converges while the displacement's gradient is
    small next to the affine (the prior's fields are smooth: a 32 mm grid or a smoothed spline)."""
    p = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    a_inv = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    y = (p - affine[:3, 3]) @ a_inv.T
    for _ in range(iterations):
        r = p - forward(y)
        if not len(r) or np.abs(r).max() <= tolerance_mm:
            break
        y = y + r @ a_inv.T
    else:
        log.warning("inverting the reversed prior: residual %.3f mm after %d iterations",
                    float(np.abs(r).max()), iterations)
    return y


def save_prior(path, prior: RobustPrior) -> None:
    """Write ``prior`` as an uncompressed ``.npz`` of plain arrays (see :meth:`RobustPrior.to_arrays`)."""
    with open(path, "wb") as f:
        np.savez(f, **prior.to_arrays())


def load_prior(path) -> RobustPrior:
    """The prior :func:`save_prior` wrote (no pickle is ever loaded)."""
    with np.load(path, allow_pickle=False) as f:
        return RobustPrior.from_arrays(f)


#: The fitted state of a scipy ``RBFInterpolator`` (private since scipy 1.7, and in its pickle state since).
_RBF_FITTED = ("_shift", "_scale", "_coeffs")


def _rbf_arrays(rbf) -> dict[str, np.ndarray]:
    """A thin-plate spline's data and settings, and its fitted coefficients, as plain arrays."""
    from scipy.interpolate import RBFInterpolator

    if not isinstance(rbf, RBFInterpolator) or rbf.neighbors is not None:
        raise TypeError(f"only a global scipy RBFInterpolator can be stored, not {rbf!r}")
    powers = np.asarray(rbf.powers)
    out = {"y": np.asarray(rbf.y), "d": np.asarray(rbf.d).reshape(len(rbf.y), *rbf.d_shape),
           "smoothing": np.asarray(rbf.smoothing), "kernel": np.str_(rbf.kernel), "epsilon": np.float64(rbf.epsilon),
           "degree": np.int64(powers.sum(axis=1).max() if len(powers) else -1)}
    out.update({name[1:]: np.asarray(getattr(rbf, name)) for name in _RBF_FITTED if hasattr(rbf, name)})
    return out


def _rbf_from_arrays(arrays: dict):
    """The spline of :func:`_rbf_arrays`: fitted again from its data, then given the stored coefficients, so that
    it predicts exactly what the writer's did (a refit is exact for one BLAS, not across thread counts or builds)."""
    from scipy.interpolate import RBFInterpolator

    rbf = RBFInterpolator(arrays["y"], arrays["d"], smoothing=arrays["smoothing"], kernel=str(arrays["kernel"]),
                          epsilon=float(arrays["epsilon"]), degree=int(arrays["degree"]))
    for name in _RBF_FITTED:
        stored = arrays.get(name[1:])
        if stored is not None and np.shape(getattr(rbf, name, None)) == stored.shape:
            setattr(rbf, name, np.array(stored))
    return rbf


def parabolic_peak(values: np.ndarray, idx: tuple[int, int, int]) -> np.ndarray:
    """Sub-sample offset (along array axes k, j, i) of a peak by a 1D parabola per axis, in [-0.5, 0.5]."""
    off = np.zeros(3)
    for axis in range(3):
        if idx[axis] - 1 < 0 or idx[axis] + 1 >= values.shape[axis]:
            continue
        lo = list(idx)
        hi = list(idx)
        lo[axis] -= 1
        hi[axis] += 1
        a, b, c = values[tuple(lo)], values[tuple(idx)], values[tuple(hi)]
        if not (np.isfinite(a) and np.isfinite(c)):
            continue
        denom = a - 2 * b + c
        if denom < 0:
            off[axis] = np.clip(0.5 * (a - c) / denom, -0.5, 0.5)
    return off


def fit_affine(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted least-squares affine (4x4) mapping src (N, 3) to dst (N, 3)."""
    n = len(src)
    X = np.hstack([src, np.ones((n, 1))])
    w = np.ones(n) if weights is None else weights
    sw = np.sqrt(w)[:, None]
    sol, *_ = np.linalg.lstsq(X * sw, dst * sw, rcond=None)
    m = np.eye(4)
    m[:3, :] = sol.T
    return m


def ransac_affine(src: np.ndarray, dst: np.ndarray, threshold: float, iterations: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RANSAC on minimal 4-point samples, then IRLS (Cauchy weights) refit on the inliers."""
    n = len(src)
    best = np.zeros(n, dtype=bool)
    for _ in range(iterations):
        idx = rng.choice(n, 4, replace=False)
        s = src[idx]
        if abs(np.linalg.det(np.hstack([s, np.ones((4, 1))]))) < 1e-6 * max(1.0, np.ptp(s) ** 3):
            continue  # degenerate (coplanar) sample
        m = fit_affine(s, dst[idx])
        inl = np.linalg.norm(src @ m[:3, :3].T + m[:3, 3] - dst, axis=1) < threshold
        if inl.sum() > best.sum():
            best = inl
    if best.sum() < 4:
        raise ValueError("robust prior: RANSAC found no consistent affine between the stable points")
    m = fit_affine(src[best], dst[best])
    for _ in range(5):  # IRLS with Cauchy weights, scale = threshold
        r = np.linalg.norm(src @ m[:3, :3].T + m[:3, 3] - dst, axis=1)
        inl = r < threshold
        if inl.sum() < 4:
            break
        w = 1.0 / (1.0 + (r[inl] / threshold) ** 2)
        m = fit_affine(src[inl], dst[inl], w)
        best = inl
    return m, best


def _coarse_matches(q: np.ndarray, grid: np.ndarray, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Argmax index and value of q (N, C) against grid (C, M), chunked to bound memory."""
    idx = np.empty(len(q), dtype=int)
    val = np.empty(len(q), dtype=np.float32)
    for a in range(0, len(q), chunk):
        s = q[a:a + chunk] @ grid
        idx[a:a + chunk] = s.argmax(1)
        val[a:a + chunk] = s[np.arange(len(s)), idx[a:a + chunk]]
    return idx, val


def stable_points(source: VolumeEmbedding, target: VolumeEmbedding, config: PriorConfig
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """Forward-backward consistent coarse matches: (source LPS (N,3), target LPS (N,3), candidates)."""
    rng = np.random.default_rng(config.seed)
    s = source.stride
    smask = source.coarse_valid_mask()
    # Foreground cells: mean prepared intensity clearly above the background.
    arr = source.prepared.array
    K, J, I = (np.asarray(arr.shape) // s)
    means = arr[:K * s, :J * s, :I * s].reshape(K, s, J, s, I, s).mean(axis=(1, 3, 5))
    lo, hi = float(arr.min()), float(arr.max())
    smask &= means > lo + config.foreground_fraction * (hi - lo)
    g = config.grid_cells
    sub = np.zeros_like(smask)
    sub[::g, ::g, ::g] = True
    cells = np.argwhere(smask & sub)
    n_candidates = len(cells)
    if len(cells) > config.max_points:
        cells = cells[np.sort(rng.choice(len(cells), config.max_points, replace=False))]
    C = source.coarse.shape[0]
    sflat = source.coarse.reshape(C, -1)
    tmask = target.coarse_valid_mask()
    tflat = np.where(tmask.reshape(1, -1), target.coarse.reshape(C, -1), 0.0).astype(np.float32)
    q = source.coarse[:, cells[:, 0], cells[:, 1], cells[:, 2]].T
    fidx, fval = _coarse_matches(q, tflat)
    tcells = np.stack(np.unravel_index(fidx, target.coarse.shape[1:]), axis=1)
    back_q = target.coarse[:, tcells[:, 0], tcells[:, 1], tcells[:, 2]].T
    sflat_valid = np.where(source.coarse_valid_mask().reshape(1, -1), sflat, 0.0).astype(np.float32)
    bidx, _ = _coarse_matches(back_q, sflat_valid)
    bcells = np.stack(np.unravel_index(bidx, source.coarse.shape[1:]), axis=1)
    ok = (np.linalg.norm(bcells - cells, axis=1) <= config.fb_tolerance_cells) & (fval >= config.min_similarity)
    # Sub-cell refinement of each kept target peak (parabola on its similarity map around the argmax).
    tgt_kji = tcells[ok].astype(np.float64)
    kept_q = q[ok]
    tshape = target.coarse.shape[1:]
    for n in range(len(tgt_kji)):
        c = tcells[ok][n]
        lo_ = np.maximum(c - 1, 0)
        hi_ = np.minimum(c + 2, tshape)
        block = np.einsum("c,ckji->kji", kept_q[n], target.coarse[:, lo_[0]:hi_[0], lo_[1]:hi_[1], lo_[2]:hi_[2]])
        tgt_kji[n] += parabolic_peak(block, tuple(c - lo_))
    src_ijk = source.coarse_to_voxel(cells[ok][:, ::-1].astype(np.float64))
    tgt_ijk = target.coarse_to_voxel(tgt_kji[:, ::-1])
    return source.index_to_world(src_ijk), target.index_to_world(tgt_ijk), n_candidates


def _fit_inliers(src: np.ndarray, dst: np.ndarray, config: PriorConfig, weights: np.ndarray | None = None):
    """(affine, rbf or None) fitted on a fixed set of inliers."""
    m = fit_affine(src, dst, weights)
    rbf = None
    if config.deformable and len(src) >= 12:
        from scipy.interpolate import RBFInterpolator

        resid = dst - (src @ m[:3, :3].T + m[:3, 3])
        rbf = RBFInterpolator(src, resid, kernel="thin_plate_spline", smoothing=config.rbf_smoothing * len(src))
    return m, rbf


def _predict(m: np.ndarray, rbf, p: np.ndarray) -> np.ndarray:
    out = p @ m[:3, :3].T + m[:3, 3]
    return out + rbf(p) if rbf is not None else out


def heldout_rms(src: np.ndarray, dst: np.ndarray, config: PriorConfig, rng: np.random.Generator) -> float:
    """RMS (mm) of each point's residual under an affine (+ spline) fitted on the other folds (k-fold CV)."""
    n = len(src)
    folds = min(max(2, int(config.cv_folds)), n)
    order = rng.permutation(n)
    resid = np.empty((n, 3))
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        if len(train) < 4:
            return float("nan")
        m, rbf = _fit_inliers(src[train], dst[train], config)
        resid[test] = dst[test] - _predict(m, rbf, src[test])
    return float(np.sqrt(np.mean(np.sum(resid ** 2, axis=1))))


def affine_problems(affine: np.ndarray, config: PriorConfig) -> list[str]:
    """Why an affine is implausible between two scans (a mirroring, or scales outside ``config.scale_range``)."""
    lo, hi = config.scale_range
    scales = np.linalg.svd(affine[:3, :3], compute_uv=False)
    det = float(np.linalg.det(affine[:3, :3]))
    problems = []
    if det <= 0:
        problems.append(f"determinant {det:.3f} (a mirroring)")
    elif not (lo ** 3 <= det <= hi ** 3):
        problems.append(f"determinant {det:.3f} (need {lo ** 3:.3f} to {hi ** 3:.3f})")
    if scales.min() < lo or scales.max() > hi:
        problems.append(f"scales {np.round(scales, 2).tolist()} (need {lo} to {hi})")
    return problems


def check_fit(affine: np.ndarray, n_inliers: int, n_stable: int, config: PriorConfig) -> None:
    """ValueError (the matcher then falls back to raw matching) for a fit that cannot be trusted."""
    problems = []
    if n_inliers < config.min_inliers:
        problems.append(f"{n_inliers} inliers (need {config.min_inliers})")
    if n_stable and n_inliers / n_stable < config.min_inlier_fraction:
        problems.append(f"inlier fraction {n_inliers / n_stable:.2f} (need {config.min_inlier_fraction})")
    problems += affine_problems(affine, config)
    if problems:
        raise ValueError(f"robust prior: degenerate fit refused ({'; '.join(problems)})")


def _fit_stable(source: VolumeEmbedding, target: VolumeEmbedding, config: PriorConfig) -> RobustPrior:
    """The coarse prior: RANSAC affine (+ spline) on the stable points (ValueError when it cannot be trusted)."""
    src, dst, n_cand = stable_points(source, target, config)
    cell_mm = float(np.max(target.prepared.spacing)) * target.stride
    if len(src) < 8:
        raise ValueError(f"robust prior: only {len(src)} stable points (need 8); the images may not overlap")
    threshold = config.inlier_mm or cell_mm
    m, inl = ransac_affine(src, dst, threshold, config.ransac_iterations, np.random.default_rng(config.seed))
    check_fit(m, int(inl.sum()), len(src), config)
    resid = dst[inl] - (src[inl] @ m[:3, :3].T + m[:3, 3])
    rbf = None
    if config.deformable and inl.sum() >= 12:
        from scipy.interpolate import RBFInterpolator

        rbf = RBFInterpolator(src[inl], resid, kernel="thin_plate_spline",
                              smoothing=config.rbf_smoothing * inl.sum())
        resid = resid - rbf(src[inl])
    rms = float(np.sqrt(np.mean(np.sum(resid ** 2, axis=1))))
    # Held out: the affine refitted (plain least squares) and the spline on the other folds of the inliers.
    cv = heldout_rms(src[inl], dst[inl], config, np.random.default_rng([config.seed, 1]))
    radius = config.search_radius_mm or max(1.5 * cell_mm, 3.0 * (cv if np.isfinite(cv) else rms))
    return RobustPrior(m, rbf, rms, radius, n_cand, len(src), int(inl.sum()), src, dst, heldout_rms_mm=cv)


def _refine(source: VolumeEmbedding, target: VolumeEmbedding, initial: np.ndarray, config: PriorConfig
            ) -> FeatureTransform:
    """The dense refinement from ``initial``; ValueError when it cannot run or ends implausible."""
    refined = refine_transform(source, target, initial, config.refine,
                               plausible=lambda a: not affine_problems(a, config))
    problems = affine_problems(refined.affine, config)
    if problems:
        raise ValueError(f"feature registration: implausible result refused ({'; '.join(problems)})")
    return refined


def foreground_ml(emb: VolumeEmbedding, config: PriorConfig) -> float:
    """Foreground volume (ml) of the embedding's valid region, as the refinement's sample counts it."""
    refine = config.refine or RefineConfig()
    return foreground_count(emb, refine) * float(np.prod(emb.prepared.spacing)) / 1000.0


def forward_radius(radius_mm: float, reversed_affine: np.ndarray) -> float:
    """A reversed fit's search radius (its held-out residuals, measured in the source) in the target's mm.

    An error ``e`` at the reversed map's output moves the inverted prediction by ``J e``, with ``J`` the inverse of
    the reversed affine's linear part: at most ``|e| / s_min``, its smallest singular value (scale up to 1.6 in
    each direction is accepted, so the radius could otherwise be too small by that factor)."""
    return float(radius_mm / np.linalg.svd(np.asarray(reversed_affine)[:3, :3], compute_uv=False).min())


def fit_prior(source: VolumeEmbedding, target: VolumeEmbedding, config: PriorConfig | None = None) -> RobustPrior:
    """Fit the robust prior between two embedded volumes (ValueError when no trustworthy prior exists).

    With ``config.refine``, the coarse prior is refined densely; when the coarse prior itself is refused (too few
    or inconsistent stable points, e.g. a thin slab), the refinement starts from the translation that aligns the
    images' foreground centres of mass (as registration's moments initialiser does) instead of giving up.
    """
    config = config or PriorConfig()
    if config.reverse_below is not None:
        src_ml, tgt_ml = foreground_ml(source, config), foreground_ml(target, config)
        if tgt_ml < config.reverse_below * src_ml:
            log.info("robust prior: the target's foreground (%.0f ml) is under %.2f of the source's (%.0f ml): "
                     "fitted target -> source and inverted", tgt_ml, config.reverse_below, src_ml)
            rev = fit_prior(target, source, replace(config, reverse_below=None))
            radius = rev.search_radius_mm  # the user's radius is in the target's mm already
            if not config.search_radius_mm:
                radius = forward_radius(radius, rev.affine)
            return replace(rev, reversed=True, search_radius_mm=radius)
    try:
        prior = _fit_stable(source, target, config)
    except ValueError as exc:
        if config.refine is None:
            raise
        init = np.eye(4)
        try:
            init[:3, 3] = foreground_centroid(target, config.refine) - foreground_centroid(source, config.refine)
            refined = _refine(source, target, init, config)
        except ValueError as exc2:
            raise ValueError(f"{exc}; refining from the centres of mass failed too ({exc2})") from exc
        log.warning("%s; refined from the images' centres of mass instead", exc)
        cell_mm = float(np.max(target.prepared.spacing)) * target.stride
        prior = RobustPrior(refined.affine, None, float("nan"), 1.5 * cell_mm, 0, 0, 0, refined=refined,
                            initialisation="centres of mass")
    else:
        if config.refine is not None:
            try:
                prior.refined = _refine(source, target, prior.affine, config)
            except ValueError as exc:  # e.g. too wide a model for dense fine maps: the coarse prior still serves
                log.warning("%s; using the coarse prior", exc)
    log.info("robust prior: %s", prior.summary())
    return prior
