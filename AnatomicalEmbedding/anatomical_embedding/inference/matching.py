"""Click-to-correspond: match world points from a source volume to a target volume.

Per query (world LPS):

1. the query's coarse and fine vectors are sampled trilinearly at the query (fine tiles on demand);
2. **coarse search**: cosine similarity of the coarse vector with every valid cell of the target's coarse
   map, top-k local maxima (non-maximum suppression over 3x3x3 cells), each refined to sub-cell
   precision by a parabola;
3. **fine search**: in a box of +-``fine_radius`` voxels around each candidate, the score is
   ``cos_fine + cos_coarse`` (coarse similarity interpolated to voxels), the sum over both levels as in
   SAM/AEFM; the best voxel over all candidates wins;
4. **sub-voxel**: a grid search of the score of the trilinearly interpolated embeddings within +-0.75 voxel
   (steps 1/4, then 1/16; see :func:`refine_subvoxel`); the coarse peaks of step 2 use a parabola;
5. **confidence** from forward-backward consistency: the match is matched back to the source by an
   independent search (the whole source, not seeded at or restricted around the query, so a corrected
   match cannot pass the check by construction), and with
   ``d`` the distance (mm) between the back-match and the query,
   ``confidence = exp(-d^2 / (2 sigma^2)) * max(similarity, 0)``, with ``similarity`` the mean of the
   two cosines at the match and ``sigma`` half a coarse cell in mm by default. Points with confidence
   below ``low_confidence`` are flagged.

The robust prior (:mod:`prior`) restricts steps 2-3 to a ball around the prior's prediction and adds
the predicted position as an extra candidate (re-seeding); both the raw and corrected matches are kept. When the
prior was refined densely (``PriorConfig.refine``, the default), the refined transform's prediction *is* the
corrected match (steps 2-4 are skipped). Its confidence (``MatchConfig.refined_confidence``, ours) is the fine
cosine at the prediction, scaled down in proportion when the refined transform's mean similarity is below
``trusted_fit_similarity``: the backward search of step 5 (still run and reported) tests the raw embedding, which
misses its way back far more often than the refined transform is wrong.
"""
from __future__ import annotations

import logging
from dataclasses import InitVar, dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from anatomical_embedding.inference.embedding import VolumeEmbedding, normalise, trilinear, upsample_linear
from anatomical_embedding.io import Frame, Volume, convert_points, resample_like
from anatomical_embedding.io.settings import check_ranges, in_range, ranged
from anatomical_embedding.inference.prior import PriorConfig, RobustPrior, fit_prior, parabolic_peak

log = logging.getLogger(__name__)


class NoMatchInRegion(ValueError):
    """The prior's search region holds no valid position (the matcher then falls back to the raw match)."""


#: ``MatchConfig.refined_confidence`` choices.
REFINED_CONFIDENCE = ("similarity", "forward-backward")


@dataclass(frozen=True)
class MatchConfig:
    top_k: int = ranged(3, 1)
    #: Coarse similarity is evaluated on a grid this many times finer than the coarse map.
    coarse_upsample: int = ranged(2, 1)
    #: Half-size of the fine search box around each coarse candidate in voxels; ``None``: 3/4 of the coarse stride.
    fine_radius: int | None = None
    subvoxel: bool = True
    forward_backward: bool = True
    #: Forward-backward sigma in mm; ``None``: half a coarse cell (stride/2 x largest model spacing).
    fb_sigma_mm: float | None = None
    low_confidence: float = ranged(0.5, 0.0, 1.0)
    #: Coarse candidates of the backward search (over the whole source; the query is never a seed).
    fb_top_k: int = ranged(1, 1)
    #: Coarse candidates inside the prior's search ball (its prediction is always added as a seed).
    prior_top_k: int = ranged(1, 1)
    #: Confidence of a match the refined prior answers. "similarity" (ours): the fine cosine at the prediction
    #: (clipped to [0, 1]) times min(1, the refined transform's mean similarity / ``trusted_fit_similarity``).
    #: "forward-backward": step 5's, as for raw matches (this project's earlier rule). With the default models on
    #: all of bench_real's pairs (benchmarks/results/real_confidence.md) the backward search flagged 863 of the
    #: 2122 matches within 3 mm of the truth (41 %; 62-72 % on slabs), the similarity 29 (1.4 %); of the 50 over
    #: 10 mm off, 42 against 38. ``trusted_fit_similarity`` was chosen on 9 of its 16 volumes (on the other 7:
    #: 46 % against 1.0 % of 902 correct matches flagged, 8 of 8 against 7 of 8 wrong ones).
    refined_confidence: str = "similarity"
    #: The refined transform's mean similarity (``FeatureTransform.similarity``) from which its matches are trusted
    #: fully; real intra-subject pairs end at 0.75-0.92, slabs of the same scan mostly above 0.6, cross-subject
    #: pairs at 0.36-0.49 (bench_real).
    trusted_fit_similarity: float = ranged(0.7, 0.0, 1.0)

    def __post_init__(self) -> None:
        check_ranges(self, "")
        if self.fine_radius is not None:
            in_range(self.fine_radius, "fine_radius", 1)
        if self.refined_confidence not in REFINED_CONFIDENCE:
            raise ValueError(f"refined_confidence must be one of {', '.join(REFINED_CONFIDENCE)}, "
                             f"got {self.refined_confidence!r}")


@dataclass
class Match:
    """One match of a query; world points are LPS."""

    query_lps: np.ndarray
    point_lps: np.ndarray
    similarity: float
    coarse_similarity: float
    fine_similarity: float
    back_lps: np.ndarray | None = None
    fb_distance_mm: float | None = None
    confidence: float | None = None
    low_confidence: bool = False
    method: str = "raw"

    def as_dict(self, frame: Frame = "LPS") -> dict:
        d = {
            "query": convert_points(self.query_lps, "LPS", frame).round(4).tolist(),
            "point": convert_points(self.point_lps, "LPS", frame).round(4).tolist(),
            "similarity": round(self.similarity, 5), "coarse_similarity": round(self.coarse_similarity, 5),
            "fine_similarity": round(self.fine_similarity, 5), "method": self.method,
            "confidence": None if self.confidence is None else round(self.confidence, 5),
            "fb_distance_mm": None if self.fb_distance_mm is None else round(self.fb_distance_mm, 4),
            "low_confidence": bool(self.low_confidence), "frame": frame,
        }
        return d


@dataclass
class PointMatch:
    """Raw and prior-corrected match of one query; ``final`` is the corrected one when available."""

    raw: Match
    corrected: Match | None = None
    name: str = ""

    @property
    def final(self) -> Match:
        return self.corrected if self.corrected is not None else self.raw


@dataclass
class _Search:
    ijk: np.ndarray
    score: float
    coarse: float
    fine: float


@dataclass
class Matcher:
    """Matches points between two embedded volumes (same model); fits the robust prior lazily."""

    source: VolumeEmbedding
    target: VolumeEmbedding
    config: MatchConfig = field(default_factory=MatchConfig)
    prior_config: PriorConfig | None = field(default_factory=PriorConfig)
    #: A prior already fitted elsewhere (the viewer fits it in a child process), or the reason its fit was refused
    #: (``fit_prior``'s ValueError message): :attr:`prior` then fits nothing itself.
    fitted_prior: InitVar[RobustPrior | None] = None
    prior_refusal: InitVar[str | None] = None
    _prior: RobustPrior | None = field(default=None, init=False, repr=False)
    _prior_error: str | None = field(default=None, init=False, repr=False)
    _reverse: "Matcher | None" = field(default=None, init=False, repr=False)

    def __post_init__(self, fitted_prior: RobustPrior | None, prior_refusal: str | None) -> None:
        if self.source.model.model_hash != self.target.model.model_hash:
            raise ValueError("source and target were embedded with different models; embed both with the same one")
        if fitted_prior is not None and prior_refusal is not None:
            raise ValueError("give a fitted prior or the reason it was refused, not both")
        self._prior = fitted_prior
        if prior_refusal is not None:
            self._prior_error = str(prior_refusal)
            log.warning("%s; using raw matching only", prior_refusal)  # as when the fit is refused here

    # ---- prior ---------------------------------------------------------------------------------
    @property
    def prior(self) -> RobustPrior | None:
        if self._prior is None and self._prior_error is None and self.prior_config is not None:
            try:
                self._prior = fit_prior(self.source, self.target, self.prior_config)
            except ValueError as exc:
                self._prior_error = str(exc)
                log.warning("%s; using raw matching only", exc)
        return self._prior

    def reverse(self) -> "Matcher":
        if self._reverse is None:
            self._reverse = Matcher(self.target, self.source, self.config, None)
        return self._reverse

    # ---- public -----------------------------------------------------------------------------------
    def match(self, points: np.ndarray, frame: Frame = "LPS", use_prior: bool = True,
              names: list[str] | None = None, with_raw: bool = True) -> list[PointMatch]:
        """Match world points (shape (3,) or (N, 3) in ``frame``); raises ValueError for points outside the source.

        With the prior, ``with_raw=False`` skips the raw (unrestricted) search (the viewer's fast path); the
        raw result is then the corrected one.
        """
        pts = np.atleast_2d(convert_points(points, frame, "LPS"))
        ijk = self.source.world_to_index(pts)
        outside = ~self.source.inside(ijk)
        if np.any(outside):
            bad = np.flatnonzero(outside)
            raise ValueError(
                f"{len(bad)} query point(s) lie outside the source image (first: #{bad[0]} at "
                f"{convert_points(pts[bad[0]], 'LPS', frame).round(2).tolist()} {frame}); "
                f"check the point frame (--frame RAS|LPS) and that the points belong to the source image"
            )
        prior = self.prior if use_prior else None
        out = []
        for n, (p, q) in enumerate(zip(pts, ijk)):
            name = names[n] if names else f"P-{n + 1}"
            corrected, fallback = None, False
            if prior is not None:
                try:
                    corrected = self._match_one(p, q, prior)
                    corrected.method = "prior"
                except NoMatchInRegion as exc:
                    # One hopeless point must not abort the batch: keep its raw match, flagged.
                    log.warning("%s: %s; using its raw match (low confidence)", name, exc)
                    fallback = True
            raw = self._match_one(p, q, None) if (with_raw or corrected is None) else corrected
            if fallback:
                raw.low_confidence, raw.method = True, "raw-fallback"
            out.append(PointMatch(raw, corrected, name))
        if out and not has_structure(self.target):
            # Cosines on a constant image are meaningless however high they are.
            log.warning("the target image has no structure (constant intensities): every match is flagged low confidence")
            for r in out:
                for m in (r.raw, r.corrected):
                    if m is not None:
                        m.low_confidence = True
        return out

    def heatmap(self, point: np.ndarray, reference: Volume | None = None, frame: Frame = "LPS") -> Volume:
        """Coarse cosine similarity to the query as a Volume on ``reference``'s grid (default: the target image).

        Only the coarse level is used (the fine map exists only near candidates), evaluated as the cosine to
        interpolated coarse vectors every ``stride / 2`` voxels and resampled linearly to the reference grid.
        Padding and positions outside the target read -1.
        """
        p = convert_points(point, frame, "LPS")
        q = self.source.world_to_index(p)
        if not self.source.inside(q)[0]:
            raise ValueError(f"heatmap query {np.round(point, 2).tolist()} {frame} is outside the source image")
        qc = self.source.sample_coarse(q)[0]
        u = max(1, self.target.stride // 2)  # cosine to interpolated vectors on a grid of s/2 voxels
        sim = upsample_linear(np.einsum("c,ckji->kji", qc, self.target.coarse), u) / self.target.upsampled_norms(u)
        sim = np.where(self.target.upsampled_valid_mask(u), sim, -1.0)
        ref = reference if reference is not None else self.target.source
        if ref is None:
            raise ValueError("heatmap needs a reference volume")
        return resample_like(self.target.coarse_volume(sim, u), ref, default_value=-1.0)

    def likely_tiles(self, points: np.ndarray, frame: Frame = "LPS", use_prior: bool = True,
                     with_raw: bool = False) -> list[tuple[VolumeEmbedding, list[tuple[int, int, int]]]]:
        """The fine tiles that matching ``points`` (source, e.g. its landmarks) will read, for warming.

        Returns (embedding, tiles) chunks in priority order, two per point (its source tiles, then its target
        tiles), nearest first within each; points outside the source are skipped. Only coarse maps and the prior
        are used (no network), and every radius is the one :func:`search` uses:

        * target, with the prior: the prior's search ball around its prediction (plus the coarse slack of
          :func:`coarse_candidates`), widened by the fine reach (fine box and sub-voxel block around a candidate);
          without it (or ``with_raw``): the fine reach around the raw search's coarse candidates;
        * source: the fine reach plus one coarse cell around the point (its own fine vector, and the backward
          search of a consistent match), and around the backward search's coarse candidates from the predicted
          match. A click near a point reads the same tiles; an inconsistent match may read a few more.
        """
        pts = np.atleast_2d(convert_points(points, frame, "LPS"))
        if not len(pts):
            return []
        pts = pts[self.source.inside(self.source.world_to_index(pts))]
        prior = self.prior if use_prior else None
        cell_mm = self.source.stride * float(np.max(self.source.prepared.spacing))
        src_reach = fine_reach_mm(self.source, self.config) + cell_mm
        out: list[tuple[VolumeEmbedding, list[tuple[int, int, int]]]] = []
        for p in pts:
            q = self.source.world_to_index(p)[0]
            qc = self.source.sample_coarse(q)[0]
            centres, target_tiles = self._likely_target(p, qc, prior, with_raw)
            back = [self.source.index_to_world(c) for c in self._backward_candidates(centres)]
            out.append((self.source, self.source.tiles_near(np.vstack([p[None]] + back), src_reach)))
            out.append((self.target, target_tiles))
        return out

    def _likely_target(self, p_lps: np.ndarray, qc: np.ndarray, prior: RobustPrior | None,
                       with_raw: bool) -> tuple[list[np.ndarray], list[tuple[int, int, int]]]:
        """(search centres ijk, target tiles nearest first) of one query (see :meth:`likely_tiles`)."""
        t, cfg = self.target, self.config
        reach = fine_reach_mm(t, cfg)
        centres: list[np.ndarray] = []
        tiles: list[tuple[int, int, int]] = []
        if prior is not None:
            centre = t.world_to_index(prior.predict(p_lps))[0]
            slack = 0.5 * t.stride / max(1, int(cfg.coarse_upsample)) * float(np.max(t.prepared.spacing))
            # The prediction may lie outside the image: search clamps its seed to the valid box.
            ball = t.index_to_world(np.vstack([centre, t.clamp_to_valid(centre)]))
            # A refined prior's prediction is the match (read at that point, no search ball).
            radius = 0.0 if prior.refined is not None else prior.search_radius_mm + slack
            tiles += t.tiles_near(ball, radius + reach)
            centres.append(centre)
        if prior is None or with_raw:
            raw = coarse_candidates(t, qc, cfg.coarse_upsample, cfg.top_k)
            if raw:
                tiles += t.tiles_near(t.index_to_world(np.vstack([t.clamp_to_valid(c) for c in raw])), reach)
            centres += raw
        return centres, list(dict.fromkeys(tiles))

    def _backward_candidates(self, centres: list[np.ndarray]) -> list[np.ndarray]:
        """Coarse candidates of the backward search from the target's search centres (voxel ijk in the source)."""
        out = []
        for c in centres:
            bc = self.target.sample_coarse(self.target.clamp_to_valid(c))[0]
            out += [self.source.clamp_to_valid(b) for b in
                    coarse_candidates(self.source, bc, self.config.coarse_upsample, self.config.fb_top_k)]
        return out

    # ---- internals ----------------------------------------------------------------------------
    def _fb_sigma(self) -> float:
        if self.config.fb_sigma_mm is not None:
            return self.config.fb_sigma_mm
        return 0.5 * self.target.stride * float(np.max(self.target.model.spacing))

    def _match_one(self, p_lps: np.ndarray, q_ijk: np.ndarray, prior: RobustPrior | None) -> Match:
        qc = self.source.sample_coarse(q_ijk)[0]
        qf = self.source.sample_fine(q_ijk)[0]
        refined = prior is not None and prior.refined is not None
        if refined:
            res = _at(self.target, qc, qf, self.target.world_to_index(prior.predict(p_lps))[0])
        else:
            centre = radius = None
            if prior is not None:
                centre = self.target.world_to_index(prior.predict(p_lps))[0]
                radius = prior.search_radius_mm
            res = search(self.target, qc, qf, self.config, centre, radius,
                         top_k=self.config.prior_top_k if prior is not None else None)
        point = self.target.index_to_world(res.ijk)
        m = Match(p_lps.copy(), point, 0.5 * (res.coarse + res.fine), res.coarse, res.fine)
        if self.config.forward_backward:
            back = self.reverse()
            bc = self.target.sample_coarse(res.ijk)[0]
            bf = self.target.sample_fine(res.ijk)[0]
            # Backward search independent of the query: no seed at it, no ball around it (either would make a
            # corrected match look consistent by construction).
            bres = search(back.target, bc, bf, self.config, top_k=self.config.fb_top_k)
            m.back_lps = self.source.index_to_world(bres.ijk)
            m.fb_distance_mm = float(np.linalg.norm(m.back_lps - p_lps))
            m.confidence = fb_confidence(m.fb_distance_mm, m.similarity, self._fb_sigma())
            m.low_confidence = m.confidence < self.config.low_confidence
        if refined and self.config.refined_confidence == "similarity":
            m.confidence = refined_confidence(res.fine, prior.refined.similarity, self.config)
            m.low_confidence = m.confidence < self.config.low_confidence
        return m


def fb_confidence(fb_distance_mm: float, similarity: float, sigma_mm: float) -> float:
    """Step 5's confidence: ``exp(-d^2 / (2 sigma^2)) * max(similarity, 0)``."""
    return float(np.exp(-fb_distance_mm ** 2 / (2 * sigma_mm ** 2)) * max(similarity, 0.0))


def refined_confidence(fine_similarity: float, fit_similarity: float, config: MatchConfig) -> float:
    """Confidence of a refined-prior match (``MatchConfig.refined_confidence == "similarity"``): the query's fine
    cosine at the prediction, clipped to [0, 1], times ``min(1, fit_similarity / trusted_fit_similarity)``."""
    fit = float(fit_similarity) if np.isfinite(fit_similarity) else 0.0
    scale = min(1.0, max(fit, 0.0) / config.trusted_fit_similarity) if config.trusted_fit_similarity > 0 else 1.0
    return float(np.clip(fine_similarity, 0.0, 1.0) * scale)


def _at(target: VolumeEmbedding, qc: np.ndarray, qf: np.ndarray, ijk: np.ndarray) -> _Search:
    """The dense transform's prediction as the match, with its similarities (no search)."""
    if not target.inside(ijk)[0]:
        raise NoMatchInRegion("the refined prior maps the point outside the target image")
    c = float(target.sample_coarse(ijk)[0] @ qc)
    f = float(target.sample_fine(ijk)[0] @ qf)
    return _Search(np.asarray(ijk, dtype=np.float64), c + f, c, f)


def has_structure(emb: VolumeEmbedding) -> bool:
    """False when the image's valid region is constant after the intensity preset (e.g. all zeros)."""
    a, b = emb.valid_start, emb.valid_start + emb.valid_size
    region = emb.prepared.array[a[2]:b[2], a[1]:b[1], a[0]:b[0]]
    return bool(region.size) and float(np.ptp(region)) > 1e-6


def fine_radius(target: VolumeEmbedding, config: MatchConfig) -> int:
    """Half-size in voxels of the fine search box around each coarse candidate."""
    s = target.stride
    return config.fine_radius if config.fine_radius is not None else max(1, s // 2 + s // 4)


def fine_reach_mm(target: VolumeEmbedding, config: MatchConfig) -> float:
    """How far (mm) from a search centre the fine search reads voxels: half a voxel of rounding to the box
    centre, the corner of the +-r box, and the sub-voxel block (two voxels past the best voxel); tiles within
    this distance cover all three."""
    return float(np.sqrt(3.0) * (fine_radius(target, config) + 3) * np.max(target.prepared.spacing))


def _ball_mask(emb: VolumeEmbedding, ijk: np.ndarray, centre: np.ndarray, radius_mm: float) -> np.ndarray:
    d = (ijk - centre) * emb.prepared.spacing
    return np.linalg.norm(d, axis=-1) <= radius_mm


def search(target: VolumeEmbedding, qc: np.ndarray, qf: np.ndarray, config: MatchConfig,
           centre_ijk: np.ndarray | None = None, radius_mm: float | None = None,
           seeds: Sequence[np.ndarray] = (), top_k: int | None = None) -> _Search:
    """Coarse-to-fine search of the best voxel for query vectors (qc, qf) in ``target``.

    The coarse similarity is evaluated on a grid ``coarse_upsample`` times finer than the coarse map, as the
    cosine to trilinearly interpolated target vectors (see ``VolumeEmbedding.upsampled_norms``).
    """
    candidates = coarse_candidates(target, qc, config.coarse_upsample,
                                   config.top_k if top_k is None else top_k, centre_ijk, radius_mm)
    if centre_ijk is not None:
        candidates.append(np.asarray(centre_ijk, dtype=np.float64))  # re-seed at the prior's prediction
    candidates += [np.asarray(c, dtype=np.float64) for c in seeds]
    if not candidates:
        if centre_ijk is not None:
            raise NoMatchInRegion("the prior's search region lies outside the target image")
        raise ValueError("no valid search position in the image searched (its embedding has no valid cell)")
    r = fine_radius(target, config)
    best: _Search | None = None
    for cand in candidates:
        v = np.round(target.clamp_to_valid(cand)).astype(int)
        lo = np.maximum(v - r, target.valid_start)
        hi = np.minimum(v + r + 1, target.valid_start + target.valid_size)
        fine = target.fine_block(lo, hi - lo)
        sim_f = np.einsum("c,ckji->kji", qf, fine)
        kk, jj, ii = np.meshgrid(*[np.arange(lo[a], hi[a]) for a in (2, 1, 0)], indexing="ij")
        vox = np.stack([ii, jj, kk], -1).astype(np.float64)
        sim_cv = coarse_cosine_box(target, qc, lo, hi)
        score = sim_f + sim_cv
        if centre_ijk is not None:
            score = np.where(_ball_mask(target, vox, centre_ijk, radius_mm), score, -np.inf)
        if not np.isfinite(score).any():
            continue
        b = np.unravel_index(int(np.argmax(score)), score.shape)
        if best is not None and score[b] <= best.score:
            continue
        best = _Search(vox[b].copy(), float(score[b]), float(sim_cv[b]), float(sim_f[b]))
    if best is None:
        raise NoMatchInRegion("no valid match found inside the search region")
    if config.subvoxel:
        best = refine_subvoxel(target, qc, qf, best)
    return best


def coarse_candidates(target: VolumeEmbedding, qc: np.ndarray, upsample: int, top_k: int,
                      centre_ijk: np.ndarray | None = None, radius_mm: float | None = None) -> list[np.ndarray]:
    """The ``top_k`` best coarse peaks (voxel ijk) on a grid ``upsample`` times finer than the coarse map.

    The score is the cosine to trilinearly interpolated target vectors (``upsample(q . T) / upsampled_norms``);
    a peak is a local maximum within one coarse cell, refined by a parabola. With a prior only the box around
    its search ball is scored, and peaks are picked from the best few hundred positions (``argpartition``)
    rather than by a maximum filter over the whole grid, which keeps a click fast on a large CT.
    """
    u = max(1, int(upsample))
    coarse = target.coarse
    n_cells = np.asarray(coarse.shape[1:])  # (k, j, i)
    lo_c, hi_c = np.zeros(3, dtype=int), n_cells.copy()
    spacing = target.prepared.spacing
    if centre_ijk is not None:
        reach = (radius_mm + target.stride * float(np.max(spacing))) / spacing  # voxels along (i, j, k)
        c_lo = np.floor(target.voxel_to_coarse(np.asarray(centre_ijk) - reach))[::-1].astype(int)
        c_hi = np.ceil(target.voxel_to_coarse(np.asarray(centre_ijk) + reach))[::-1].astype(int) + 1
        lo_c, hi_c = np.maximum(c_lo, 0), np.minimum(c_hi, n_cells)
        if np.any(hi_c <= lo_c):
            return []
    cells = coarse[:, lo_c[0]:hi_c[0], lo_c[1]:hi_c[1], lo_c[2]:hi_c[2]]
    sim = (cells.reshape(cells.shape[0], -1).T @ qc.astype(cells.dtype)).reshape(cells.shape[1:])
    view = tuple(slice(a * u, (b - 1) * u + 1) for a, b in zip(lo_c, hi_c))
    ok = target.upsampled_valid_mask(u)[view]
    masked_shape = ok.shape
    if centre_ijk is not None:
        grid = np.stack(np.meshgrid(*[np.arange(v.start, v.stop) for v in view], indexing="ij"), -1)[..., ::-1]
        slack = 0.5 * target.stride / u * float(np.max(spacing))
        ok = ok & _ball_mask(target, target.coarse_to_voxel(grid / u), centre_ijk, radius_mm + slack)
    masked = np.where(ok, upsample_linear(sim, u) / target.upsampled_norms(u)[view], -np.inf)
    flat = masked.ravel()
    m = min(flat.size, 256 * max(1, top_k))
    best = np.argpartition(-flat, m - 1)[:m] if m < flat.size else np.arange(flat.size)
    best = best[np.argsort(-flat[best], kind="stable")]
    out: list[np.ndarray] = []
    for pos in zip(*np.unravel_index(best, masked_shape)):
        if len(out) >= top_k or not np.isfinite(masked[pos]):
            break
        window = tuple(slice(max(p - u, 0), p + u + 1) for p in pos)
        if masked[pos] < masked[window].max():  # not a local maximum within one cell
            continue
        off = parabolic_peak(masked, pos)
        out.append(target.coarse_to_voxel(((lo_c * u + np.asarray(pos) + off) / u)[::-1]))
    return out


def _axis_weights(target: VolumeEmbedding, axis_ijk: int, lo: int, hi: int) -> tuple[int, np.ndarray]:
    """Linear interpolation weights (voxels x cells) from coarse cells to voxels lo..hi-1 along one axis."""
    n = target.coarse.shape[3 - axis_ijk]
    c = np.clip(target.voxel_to_coarse(np.arange(lo, hi, dtype=np.float64)), 0, n - 1)
    c0 = np.minimum(np.floor(c).astype(int), max(n - 2, 0))
    f = c - c0
    base = int(c0.min())
    width = min(int(c0.max()) + 2, n) - base
    w = np.zeros((hi - lo, width))
    rows = np.arange(hi - lo)
    w[rows, c0 - base] += 1 - f
    up = np.minimum(c0 + 1, n - 1) - base
    w[rows, up] += f
    return base, w


def coarse_cosine_box(target: VolumeEmbedding, qc: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Cosine of ``qc`` with the trilinearly interpolated coarse vectors at every voxel of [lo, hi) (k, j, i array).

    Separable interpolation of the few cells under the box: the same numbers as ``trilinear`` at each voxel,
    without per-voxel gathers.
    """
    bi, wi = _axis_weights(target, 0, int(lo[0]), int(hi[0]))
    bj, wj = _axis_weights(target, 1, int(lo[1]), int(hi[1]))
    bk, wk = _axis_weights(target, 2, int(lo[2]), int(hi[2]))
    cells = target.coarse[:, bk:bk + wk.shape[1], bj:bj + wj.shape[1], bi:bi + wi.shape[1]].astype(np.float64)
    vec = np.einsum("zkji,ak,bj,ci->zabc", cells, wk, wj, wi, optimize=True)
    return np.einsum("z,zabc->abc", qc, vec) / np.maximum(np.linalg.norm(vec, axis=0), 1e-12)


def _scores_at(target: VolumeEmbedding, qc: np.ndarray, qf: np.ndarray, pts: np.ndarray,
               block: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = normalise(trilinear(block, pts - lo))
    c = normalise(trilinear(target.coarse, target.voxel_to_coarse(pts)))
    sf, sc = f @ qf, c @ qc
    return sf + sc, sc, sf


def refine_subvoxel(target: VolumeEmbedding, qc: np.ndarray, qf: np.ndarray, best: "_Search") -> "_Search":
    """Sub-voxel peak: grid search of the interpolated score within +-0.75 voxel (steps 1/4 then 1/16).

    Evaluating the trilinearly interpolated embeddings (rather than fitting a parabola to voxel scores)
    makes the refinement exact for an exact copy: the score peaks where the interpolated target vector
    equals the query.
    """
    lo = np.floor(best.ijk).astype(int) - 1
    block = target.fine_block(lo, np.full(3, 4))
    lo = np.clip(lo, 0, np.asarray(target.prepared.shape_ijk) - 1)  # fine_block clamps the same way
    vmin = target.valid_start.astype(np.float64)
    vmax = (target.valid_start + target.valid_size - 1).astype(np.float64)
    centre = best.ijk.copy()
    score, sc, sf = -np.inf, best.coarse, best.fine  # the grid includes the start point (offset 0)
    for step, n_steps in ((0.25, 3), (0.0625, 2)):
        offs = np.arange(-n_steps, n_steps + 1) * step
        grid = np.stack(np.meshgrid(offs, offs, offs, indexing="ij"), -1).reshape(-1, 3)
        pts = np.clip(centre + grid, np.maximum(vmin, best.ijk - 1.0), np.minimum(vmax, best.ijk + 1.0))
        pts = np.clip(pts, lo, lo + np.asarray(block.shape[1:][::-1]) - 1)
        s_all, c_all, f_all = _scores_at(target, qc, qf, pts, block, lo)
        n = int(np.argmax(s_all))
        if s_all[n] > score:
            centre, score, sc, sf = pts[n], float(s_all[n]), float(c_all[n]), float(f_all[n])
    return _Search(centre, score, sc, sf)
