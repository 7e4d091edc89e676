"""Per-subject mapping between the canonical anatomy frame and the subject's world (LPS) frame.

``world = L @ u + t`` with ``u`` solving ``u + e(u) = c`` for a canonical point ``c``:
the elastic displacement ``e`` is defined on the *pulled-back* side, so the label map is one
evaluation per voxel (``c = u + e(u)``, exact, no interpolation) and landmarks are pushed forward
by a fixed-point iteration ``u <- c - e(u)``. ``e`` is a sum of a few random plane waves whose
summed gradient bound is kept below 0.5, which makes the iteration a contraction (exact to
1e-9 mm) and the mapping fold-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

#: Upper bound of the elastic gradient norm: keeps the map invertible and the iteration contracting.
MAX_ELASTIC_GRADIENT = 0.5


@dataclass
class SubjectTransform:
    linear: np.ndarray  # (3, 3): u -> world (rotation @ scale)
    translation: np.ndarray  # (3,)
    wavevectors: np.ndarray  # (M, 3) rad/mm
    phases: np.ndarray  # (M,)
    amplitudes: np.ndarray  # (M, 3) mm

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        scale_range: float = 0.10,
        rotation_deg: tuple[float, float, float] = (5.0, 5.0, 10.0),
        translation_mm: float = 15.0,
        n_modes: int = 8,
        wavelength_mm: tuple[float, float] = (160.0, 380.0),
        amplitude_mm: float = 3.5,
    ) -> SubjectTransform:
        """Random affine (per-axis scale +-10 %, rotation about L/P/S up to 5/5/10 deg, shift) + elastic."""
        scale = rng.uniform(1 - scale_range, 1 + scale_range, 3)
        angles = rng.uniform(-1, 1, 3) * np.asarray(rotation_deg)
        rot = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        translation = rng.uniform(-translation_mm, translation_mm, 3)
        dirs = rng.normal(size=(n_modes, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        k = dirs * (2 * np.pi / rng.uniform(*wavelength_mm, n_modes))[:, None]
        phases = rng.uniform(0, 2 * np.pi, n_modes)
        amps = rng.normal(size=(n_modes, 3)) * amplitude_mm / np.sqrt(3)
        bound = float(np.sum(np.linalg.norm(amps, axis=1) * np.linalg.norm(k, axis=1)))
        if bound > MAX_ELASTIC_GRADIENT:
            amps *= MAX_ELASTIC_GRADIENT / bound
        return cls(rot @ np.diag(scale), translation, k, phases, amps)

    @property
    def max_displacement(self) -> float:
        """Upper bound of |e| in mm (used to size bounding boxes conservatively)."""
        return float(np.sum(np.linalg.norm(self.amplitudes, axis=1)))

    def elastic(self, u: np.ndarray) -> np.ndarray:
        u = np.atleast_2d(u)
        return np.sin(u @ self.wavevectors.T + self.phases) @ self.amplitudes

    def world_to_canonical(self, world: np.ndarray) -> np.ndarray:
        w = np.atleast_2d(np.asarray(world, dtype=np.float64))
        u = (w - self.translation) @ np.linalg.inv(self.linear).T
        return u + self.elastic(u)

    def canonical_to_world(self, canon: np.ndarray, iterations: int = 60) -> np.ndarray:
        c = np.atleast_2d(np.asarray(canon, dtype=np.float64))
        u = c.copy()
        for _ in range(iterations):
            u = c - self.elastic(u)
        return u @ self.linear.T + self.translation

    def pull_back_grid(
        self, origin: np.ndarray, axes: np.ndarray, shape_kji: tuple[int, int, int]
    ) -> list[np.ndarray]:
        """Canonical coordinates (x, y, z arrays of shape [k, j, i], float32) of every voxel centre.

        ``axes`` is ``direction @ diag(spacing)``. ``u`` is affine in the voxel index and each plane
        wave ``sin(a*i + b*j + g*k + p)`` equals ``sin(P_i)cos(Q_jk) + cos(P_i)sin(Q_jk)``, so every
        coordinate is a sum of (k, j)-by-(i) separable terms: one small-inner-dimension matrix product
        per axis writes the whole array, with no full-size trigonometry or temporaries.
        """
        nk, nj, ni = shape_kji
        inv = np.linalg.inv(self.linear)
        g = inv @ axes  # u = g @ ijk + g0
        g0 = inv @ (np.asarray(origin, dtype=np.float64) - self.translation)
        i = np.arange(ni, dtype=np.float64)
        j = np.arange(nj, dtype=np.float64)
        k = np.arange(nk, dtype=np.float64)
        m = len(self.phases)
        right = np.empty((2 * m + 2, ni))  # functions of i
        left_waves = np.empty((nk, nj, 2 * m))  # functions of (k, j), before the amplitude
        for n, (kvec, phase) in enumerate(zip(self.wavevectors, self.phases)):
            a, b, c = kvec @ g
            right[2 * n], right[2 * n + 1] = np.sin(a * i), np.cos(a * i)
            q = (k * c + (kvec @ g0 + phase))[:, None] + (j * b)[None, :]
            left_waves[:, :, 2 * n], left_waves[:, :, 2 * n + 1] = np.cos(q), np.sin(q)
        right[2 * m] = 1.0
        coords = []
        for d in range(3):
            right[2 * m + 1] = g[d, 0] * i
            left = np.empty((nk, nj, 2 * m + 2))
            left[:, :, : 2 * m] = left_waves * np.repeat(self.amplitudes[:, d], 2)
            left[:, :, 2 * m] = (g[d, 2] * k + g0[d])[:, None] + (g[d, 1] * j)[None, :]
            left[:, :, 2 * m + 1] = 1.0
            # float64 product, float32 result: rounding differences between BLAS kernels (CPUs,
            # thread counts) stay far below float32 resolution, so labels are reproducible.
            flat = left.reshape(-1, 2 * m + 2) @ right
            coords.append(flat.reshape(nk, nj, ni).astype(np.float32))
        return coords

    def index_box(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        origin: np.ndarray,
        axes: np.ndarray,
        shape_kji: tuple[int, int, int],
    ) -> tuple[slice, slice, slice] | None:
        """Voxel box [k, j, i] that surely holds every voxel whose canonical point lies in [lo, hi]."""
        pad = self.max_displacement + 1.0
        lo = np.asarray(lo, dtype=np.float64) - pad
        hi = np.asarray(hi, dtype=np.float64) + pad
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        world = corners @ self.linear.T + self.translation
        ijk = (world - origin) @ np.linalg.inv(axes).T
        start = np.maximum(np.floor(ijk.min(axis=0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(ijk.max(axis=0)).astype(int) + 2, np.array(shape_kji[::-1]))
        if np.any(stop <= start):
            return None
        return (slice(start[2], stop[2]), slice(start[1], stop[1]), slice(start[0], stop[0]))
