"""Analytic shapes in the canonical frame (mm): rotated ellipsoids and capsule chains (tubes).

Each shape gives a conservative bounding box (``aabb``) and an inside test on coordinate arrays,
and can be shrunk by a wall thickness to paint cortex/wall and interior separately.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


def frame_from_axis(axis: np.ndarray) -> np.ndarray:
    """Rotation whose third column is ``axis`` (normalised): for organs defined by a long axis."""
    z = np.asarray(axis, dtype=np.float64)
    z = z / np.linalg.norm(z)
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = helper - z * (helper @ z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


@dataclass
class Ellipsoid:
    center: np.ndarray
    semi: np.ndarray
    rot: np.ndarray  # columns: principal axes in the canonical frame

    def aabb(self) -> tuple[np.ndarray, np.ndarray]:
        half = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(axis=1))
        return self.center - half, self.center + half

    def level(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared normalised radius: < 1 inside."""
        d = (x - np.float32(self.center[0]), y - np.float32(self.center[1]), z - np.float32(self.center[2]))
        out = None
        for a in range(3):
            r = self.rot[:, a] / self.semi[a]
            q = np.float32(r[0]) * d[0] + np.float32(r[1]) * d[1] + np.float32(r[2]) * d[2]
            out = q * q if out is None else out + q * q
        return out

    def mask(self, x, y, z) -> np.ndarray:
        return self.level(x, y, z) <= 1.0

    def shrunk(self, mm: float) -> Ellipsoid:
        return replace(self, semi=np.maximum(self.semi - mm, 0.5))

    def scaled(self, factor: float, shift: np.ndarray | None = None) -> Ellipsoid:
        """Same orientation, semi-axes times ``factor``, centre moved by ``shift`` in the local frame."""
        c = self.center if shift is None else self.center + self.rot @ (np.asarray(shift) * self.semi)
        return replace(self, center=c, semi=self.semi * factor)

    def point(self, local: np.ndarray) -> np.ndarray:
        """Point at local coordinates given in units of the semi-axes (|local| < 1 is inside)."""
        return self.center + self.rot @ (np.asarray(local, dtype=np.float64) * self.semi)


@dataclass
class Tube:
    """Chain of capsules through ``points`` with radius linearly varying between them."""

    points: np.ndarray  # (P, 3)
    radii: np.ndarray  # (P,)

    def segments(self):
        for a, b, ra, rb in zip(self.points[:-1], self.points[1:], self.radii[:-1], self.radii[1:]):
            r = max(ra, rb)
            yield a, b, ra, rb, np.minimum(a, b) - r, np.maximum(a, b) + r

    @staticmethod
    def capsule_mask(x, y, z, a, b, ra, rb, shrink: float = 0.0) -> np.ndarray:
        ab = b - a
        denom = float(ab @ ab)
        dx, dy, dz = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
        t = (dx * np.float32(ab[0]) + dy * np.float32(ab[1]) + dz * np.float32(ab[2])) / np.float32(denom)
        np.clip(t, 0.0, 1.0, out=t)
        ex = dx - t * np.float32(ab[0])
        ey = dy - t * np.float32(ab[1])
        ez = dz - t * np.float32(ab[2])
        r = np.float32(ra - shrink) + t * np.float32(rb - ra)
        return ex * ex + ey * ey + ez * ez <= r * np.abs(r) * (r > 0)

    def shrunk(self, mm: float) -> Tube:
        return replace(self, radii=np.maximum(self.radii - mm, 0.3))

    def point(self, fraction: float) -> np.ndarray:
        """Point on the centreline at ``fraction`` of its length."""
        seg = np.linalg.norm(np.diff(self.points, axis=0), axis=1)
        s = np.concatenate([[0], np.cumsum(seg)]) / seg.sum()
        return np.array([np.interp(fraction, s, self.points[:, d]) for d in range(3)])
