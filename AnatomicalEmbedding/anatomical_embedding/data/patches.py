"""Overlapping patch pairs (AEFM section 2.1; also usable for vox2vec/HDSSL-style positive pairs).

A patch is an axis-aligned box in the voxel space of the cached, preprocessed image, with a
continuous start and extent, resampled to the preset size with ``grid_sample`` (trilinear for images,
nearest for labels). Arrays and sizes here are in network order (k, j, i).

Coordinates: voxel ``c`` of an axis of length ``D`` covers the edge interval ``[c, c + 1]``; a box is
``[x0, x0 + s]`` in edge units, and voxel ``n`` of a patch resampled to ``P`` voxels has its centre at
edge coordinate ``x0 + (n + 0.5) * s / P`` (i.e. ``align_corners=False`` semantics).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchPairConfig:
    patch_size: tuple[int, int, int]  # (k, j, i) voxels after resampling
    n_pos: int = 1000
    scale_range: tuple[float, float] = (0.9, 1.1)  # patch side / preset side (paper)
    overlap_range: tuple[float, float] = (0.5, 1.0)  # overlap / smaller side, per axis (paper)
    # Spatial deformation of box B (our addition; 0 = the paper's axis-aligned boxes): a random rotation
    # about B's centre of up to ``rotation_deg`` per axis plus a smooth displacement field (std
    # ``elastic_voxels`` source voxels on a ``elastic_grid``^3 control grid). It shows the network the
    # pose and shape differences that separate subjects, which the paper's crops alone never show.
    rotation_deg: float = 0.0
    elastic_voxels: float = 0.0
    elastic_grid: int = 4

    @property
    def deforms(self) -> bool:
        return self.rotation_deg > 0 or self.elastic_voxels > 0


def _axis_boxes(d: int, p: int, cfg: PatchPairConfig, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Starts and extents (edge units) of boxes A and B on one axis of length ``d``."""
    sa = float(np.clip(p * rng.uniform(*cfg.scale_range), 1.0, d))
    sb = float(np.clip(p * rng.uniform(*cfg.scale_range), 1.0, d))
    ov = rng.uniform(*cfg.overlap_range) * min(sa, sb)
    union = sa + sb - ov
    if union > d:  # the volume is too short for this overlap: overlap more (never less than asked)
        union = float(d)
    u0 = rng.uniform(0.0, d - union)
    if rng.random() < 0.5:
        a0, b0 = u0, u0 + union - sb
    else:
        b0, a0 = u0, u0 + union - sa
    return a0, sa, b0, sb


def _box_edges(starts, extents, size) -> torch.Tensor:
    """Source edge coordinates (Pk, Pj, Pi, 3), (k, j, i) float64, of the voxel centres of a box resampled to ``size``."""
    axes = [x0 + (torch.arange(p, dtype=torch.float64) + 0.5) * s / p for x0, s, p in zip(starts, extents, size)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _edges_to_grid(edges: torch.Tensor, shape_in) -> torch.Tensor:
    """``grid_sample`` grid (1, Pk, Pj, Pi, 3) of source edge coordinates; last dim (x=i, y=j, z=k), align_corners=False."""
    d = torch.tensor(shape_in, dtype=torch.float64)
    return (2.0 * edges / d - 1.0).flip(-1).float().unsqueeze(0)


def _grid(starts, extents, shape_in, size) -> torch.Tensor:
    """``grid_sample`` grid of an axis-aligned box."""
    return _edges_to_grid(_box_edges(starts, extents, size), shape_in)


def _distinct_pairs(na: np.ndarray, nb: np.ndarray, n_pos: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n_pos`` candidate pairs (in their random draw order) whose A voxel and B voxel each occur once.

    Positives are drawn without replacement (as HDSSL's): a repeated point would be its own negative under
    in-image negatives (a false negative). Only when the overlap holds fewer distinct pairs than ``n_pos`` are the
    missing ones repeated (so every sample has ``n_pos`` points for collation).
    """
    keep = np.arange(len(na))
    for pts in (na, nb):
        _, first = np.unique(pts[keep], axis=0, return_index=True)
        keep = keep[np.sort(first)]
    if len(keep) >= n_pos:
        return keep[:n_pos]
    return np.concatenate([keep, keep[rng.integers(0, len(keep), size=n_pos - len(keep))]])


def _box_points(a0, sa, b0, sb, size, n_pos: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Positives of two axis-aligned boxes: distinct integer voxels of A inside the overlap, and the nearest voxel
    of B (distinct too), drawn without replacement."""
    lo_idx, dims = [], []
    for ax, p in enumerate(size):
        lo = max(a0[ax], b0[ax])
        hi = min(a0[ax] + sa[ax], b0[ax] + sb[ax])
        n_lo = int(np.ceil((lo - a0[ax]) * p / sa[ax] - 0.5))
        n_hi = int(np.floor((hi - a0[ax]) * p / sa[ax] - 0.5))
        n_lo, n_hi = max(n_lo, 0), min(max(n_hi, n_lo), p - 1)
        lo_idx.append(n_lo)
        dims.append(n_hi - n_lo + 1)
    total = int(np.prod(dims))
    # Extra candidates: distinct A voxels can share their nearest B voxel when B's voxels are larger.
    flat = rng.choice(total, size=min(total, 4 * n_pos), replace=False)
    na = np.stack(np.unravel_index(flat, dims), axis=1).astype(np.int64) + np.asarray(lo_idx, dtype=np.int64)
    nb = np.empty_like(na)
    for ax, p in enumerate(size):
        edge = a0[ax] + (na[:, ax] + 0.5) * sa[ax] / p
        nb[:, ax] = np.clip(np.rint((edge - b0[ax]) * p / sb[ax] - 0.5), 0, p - 1).astype(np.int64)
    pick = _distinct_pairs(na, nb, n_pos, rng)
    return na[pick], nb[pick]


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation (3, 3) acting on (k, j, i) vectors: a product of three axis rotations of up to ``max_deg``."""
    r = np.eye(3)
    for a, b in ((1, 2), (0, 2), (0, 1)):
        t = np.deg2rad(rng.uniform(-max_deg, max_deg))
        m = np.eye(3)
        m[a, a], m[a, b], m[b, a], m[b, b] = np.cos(t), -np.sin(t), np.sin(t), np.cos(t)
        r = m @ r
    return r


def _deformed_edges(starts, extents, size, cfg: PatchPairConfig, rng: np.random.Generator) -> torch.Tensor:
    """Source edge coordinates (Pk, Pj, Pi, 3) (k, j, i) sampled by each voxel of a deformed box."""
    e = _box_edges(starts, extents, size)
    centre = torch.tensor([x0 + 0.5 * s for x0, s in zip(starts, extents)], dtype=torch.float64)
    if cfg.rotation_deg > 0:
        rot = torch.from_numpy(_rotation(rng, cfg.rotation_deg))
        e = (e - centre) @ rot.T + centre
    if cfg.elastic_voxels > 0:
        g = cfg.elastic_grid
        coarse = torch.from_numpy(rng.normal(0.0, cfg.elastic_voxels, size=(1, 3, g, g, g)))
        disp = F.interpolate(coarse, size=tuple(size), mode="trilinear", align_corners=True)[0]
        e = e + disp.permute(1, 2, 3, 0)
    return e


def _deformed_points(edges_b: torch.Tensor, a0, sa, size, n_pos: int, rng: np.random.Generator):
    """Positives for a deformed box B: voxels of B whose source point falls inside box A (nearest A voxel)."""
    cand = np.stack([rng.integers(0, p, size=8 * n_pos) for p in size], axis=1)
    src = edges_b[cand[:, 0], cand[:, 1], cand[:, 2]].numpy()  # (M, 3) source edge coordinates
    na = np.rint((src - np.asarray(a0)) * np.asarray(size) / np.asarray(sa) - 0.5).astype(np.int64)
    ok = np.all((na >= 0) & (na < np.asarray(size)), axis=1)
    if not ok.any():
        return None
    idx = np.flatnonzero(ok)
    pick = idx[_distinct_pairs(na[idx], cand[idx], n_pos, rng)]  # candidates come in random order
    return na[pick], cand[pick].astype(np.int64), src[pick]


def _resample(volume: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    out = F.grid_sample(volume[None, None].float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out[0, 0]


def voxel_to_world(centres_kji: np.ndarray, ijk_to_lps: np.ndarray) -> np.ndarray:
    """(N, 3) continuous voxel centres (k, j, i) of the cached image -> (N, 3) LPS mm."""
    ijk = np.asarray(centres_kji, dtype=np.float64)[:, ::-1]
    return ijk @ np.asarray(ijk_to_lps)[:3, :3].T + np.asarray(ijk_to_lps)[:3, 3]


def sample_patch_pair(image: torch.Tensor, cfg: PatchPairConfig, rng: np.random.Generator,
                      label: torch.Tensor | None = None, ijk_to_lps: np.ndarray | None = None) -> dict:
    """Draw two overlapping boxes, resample both to ``cfg.patch_size`` and pick ``n_pos`` shared points.

    Returns ``patch_a``, ``patch_b`` (1, Pk, Pj, Pi) float32; ``points_a``, ``points_b`` (n_pos, 3) int64
    voxel indices (k, j, i) in each resampled patch of the same anatomical point: integer voxels of
    patch A inside the overlap, and the nearest voxel of patch B (so they agree to half a B voxel); with
    ``cfg.deforms``, voxels of the deformed B and the nearest voxel of A (half an A voxel);
    ``box_a``/``box_b`` (2, 3) float64 (start; extent) per axis in source voxels;
    ``label_a``/``label_b`` (Pk, Pj, Pi) int64 when a label is given; ``world_a``/``world_b`` (n_pos, 3)
    float64 LPS mm when ``ijk_to_lps`` is given.
    """
    shape = tuple(int(s) for s in image.shape)
    size = tuple(int(p) for p in cfg.patch_size)
    boxes = [_axis_boxes(d, p, cfg, rng) for d, p in zip(shape, size)]
    a0 = [b[0] for b in boxes]
    sa = [b[1] for b in boxes]
    b0 = [b[2] for b in boxes]
    sb = [b[3] for b in boxes]
    grid_a = _grid(a0, sa, shape, size)
    found = None
    if cfg.deforms:
        edges_b = _deformed_edges(b0, sb, size, cfg, rng)
        found = _deformed_points(edges_b, a0, sa, size, cfg.n_pos, rng)
    if found is not None:
        points_a, points_b, src_b = found  # src_b: source edge coordinates of B's points
        grid_b = _edges_to_grid(edges_b, shape)
    else:  # the paper's boxes (or, never seen, a deformation that left no point of B inside A)
        points_a, points_b = _box_points(a0, sa, b0, sb, size, cfg.n_pos, rng)
        src_b = None
        grid_b = _grid(b0, sb, shape, size)
    out = {
        "patch_a": _resample(image, grid_a, "bilinear")[None],
        "patch_b": _resample(image, grid_b, "bilinear")[None],
        "points_a": torch.from_numpy(points_a),
        "points_b": torch.from_numpy(points_b),
        # (start, extent) per axis (k, j, i) of each box in source voxel edge units.
        "box_a": torch.tensor([a0, sa], dtype=torch.float64),
        "box_b": torch.tensor([b0, sb], dtype=torch.float64),
    }
    if label is not None:
        out["label_a"] = _resample(label, grid_a, "nearest").round().long()
        out["label_b"] = _resample(label, grid_b, "nearest").round().long()
    if ijk_to_lps is not None:
        def centres(pts, x0, s):
            return np.stack([x0[a] + (pts[:, a] + 0.5) * s[a] / size[a] - 0.5 for a in range(3)], axis=1)
        out["world_a"] = torch.from_numpy(voxel_to_world(centres(points_a, a0, sa), ijk_to_lps))
        cb = centres(points_b, b0, sb) if src_b is None else src_b - 0.5
        out["world_b"] = torch.from_numpy(voxel_to_world(cb, ijk_to_lps))
    return out


def jitter_intensity(patch: torch.Tensor, rng: np.random.Generator, scale: float, shift: float,
                     noise_std: float) -> torch.Tensor:
    """Random contrast scale ``1 +- scale``, offset ``+- shift`` and Gaussian noise (all 0 = identity)."""
    if scale > 0:
        patch = patch * float(1.0 + rng.uniform(-scale, scale))
    if shift > 0:
        patch = patch + float(rng.uniform(-shift, shift))
    if noise_std > 0:
        noise = rng.standard_normal(size=tuple(patch.shape)).astype(np.float32) * noise_std
        patch = patch + torch.from_numpy(noise)
    return patch


def gather_points(fmap: torch.Tensor, points: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Features of ``fmap`` (N, C, a, b, c) at input voxels ``points`` (N, P, 3) (k, j, i) -> (N, P, C).

    ``fmap`` may have a coarser resolution than the input (e.g. AEFM's stride-8 global map); the value
    is trilinearly interpolated at the voxel centre (exact lookup at full resolution).
    """
    sizes = torch.tensor(input_size, dtype=torch.float32, device=fmap.device)
    norm = (2.0 * (points.float() + 0.5) / sizes - 1.0).flip(-1)  # (N, P, 3) as (x=i, y=j, z=k)
    grid = norm[:, :, None, None, :].to(fmap.dtype)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, :, 0, 0].transpose(1, 2)
