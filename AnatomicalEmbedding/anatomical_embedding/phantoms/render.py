"""Voxelise a subject's anatomy on its image grid: a label map and a CT-like HU image.

Every voxel centre is pulled back to the canonical frame once (``SubjectTransform.pull_back_grid``);
shapes are then painted in a fixed priority order (later overwrites earlier), each only inside a
conservative voxel box so small organs cost little. HU values are non-contrast CT (documented
choice: vessels are blood at ~45 HU, seen against retroperitoneal fat), with a smooth per-tissue
texture, partial-volume blur (Gaussian, 0.5 voxel) and white noise added after the blur.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy import ndimage

from anatomical_embedding.phantoms.anatomy import BODY_Z, LEVELS, Anatomy
from anatomical_embedding.phantoms.labels import LABEL_IDS
from anatomical_embedding.phantoms.transform import SubjectTransform

L = LABEL_IDS

#: Mean HU per tissue (non-contrast abdomen CT).
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "visceral_fat": -95.0,
    "skin": 30.0,
    "muscle": 50.0,
    "liver": 60.0,
    "liver_vessel": 38.0,
    "spleen": 48.0,
    "kidney_cortex": 35.0,
    "kidney_medulla": 27.0,
    "renal_sinus": -40.0,
    "stomach_wall": 40.0,
    "gastric_fluid": 12.0,
    "gas": -950.0,
    "pancreas": 42.0,
    "blood": 45.0,
    "cortical_bone": 650.0,
    "cancellous_bone": 230.0,
    "posterior_elements": 450.0,
    "disc": 85.0,
    "csf": 15.0,
    "lung": -860.0,
    "heart": 40.0,
    "bowel_wall": 35.0,
    "bowel_content": 18.0,
}

#: Amplitude (HU) of the smooth texture field per label (organ heterogeneity, fat stranding, lung vessels).
TEXTURE_HU = {
    0: 0.0,
    L["liver"]: 5.0,
    L["spleen"]: 4.0,
    L["kidney_left"]: 4.0,
    L["kidney_right"]: 4.0,
    L["stomach"]: 6.0,
    L["pancreas"]: 10.0,
    L["aorta"]: 2.0,
    L["ivc"]: 2.0,
    L["vertebrae"]: 40.0,
    L["intervertebral_discs"]: 4.0,
    L["ribs"]: 30.0,
    L["bowel"]: 8.0,
    L["lungs"]: 30.0,
    L["subcutaneous_fat"]: 10.0,
    L["body_soft_tissue"]: 8.0,
}


@dataclass
class Grid:
    origin: np.ndarray  # world LPS of voxel (0, 0, 0)
    direction: np.ndarray  # (3, 3), columns = i, j, k axes
    spacing: np.ndarray  # (3,) along i, j, k
    shape_kji: tuple[int, int, int]

    @property
    def axes(self) -> np.ndarray:
        return self.direction @ np.diag(self.spacing)


def _linear_upsampling_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of linear interpolation with the end points aligned."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] = 1 - w
    m[np.arange(n_out), lo + 1] = w
    return m


def smooth_noise(shape: tuple[int, ...], stride_vox: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance random field correlated over ~``stride_vox`` voxels.

    Coarse white noise upsampled by separable linear interpolation, done as three small matrix
    products (several times faster than ``ndimage.zoom`` on a full volume).
    """
    coarse = tuple(int(np.ceil(n / max(s, 1.0))) + 2 for n, s in zip(shape, stride_vox))
    field = rng.standard_normal(coarse).astype(np.float32)
    mk, mj, mi = (_linear_upsampling_matrix(n, c) for n, c in zip(shape, coarse))
    field = field @ mi.T  # (ck, cj, ni)
    field = np.einsum("jb,abi->aji", mj, field, optimize=True)  # (ck, nj, ni)
    out = (mk @ field.reshape(coarse[0], -1)).reshape(shape)
    return out / max(float(out.std()), 1e-6)


class Canvas:
    """Label and HU arrays on the grid plus the canonical coordinates of every voxel."""

    def __init__(self, anatomy: Anatomy, tf: SubjectTransform, grid: Grid):
        self.anat, self.tf, self.grid = anatomy, tf, grid
        self.x, self.y, self.z = tf.pull_back_grid(grid.origin, grid.axes, grid.shape_kji)
        self.lab = np.zeros(grid.shape_kji, dtype=np.uint8)
        self.hu = np.full(grid.shape_kji, HU["air"], dtype=np.float32)
        self.cavity_depth: np.ndarray | None = None  # mm outside the muscle boundary, set by _paint_body

    def region(self, lo, hi):
        sl = self.tf.index_box(
            np.asarray(lo, float),
            np.asarray(hi, float),
            self.grid.origin,
            self.grid.axes,
            self.grid.shape_kji,
        )
        if sl is None:
            return None, (None, None, None)
        return sl, (self.x[sl], self.y[sl], self.z[sl])

    def paint(self, sl, mask, label: int | None = None, hu=None, inside_labels=None) -> np.ndarray:
        if inside_labels is not None:
            mask = mask & np.isin(self.lab[sl], inside_labels)
        if label is not None:
            self.lab[sl][mask] = label
        if hu is not None:
            self.hu[sl][mask] = hu if np.isscalar(hu) else hu[mask]
        return mask

    def world_axis(self, sl, axis: int) -> np.ndarray:
        """World coordinate ``axis`` (0=L, 1=P, 2=S) of the voxels in box ``sl``."""
        a = self.grid.axes[axis]
        k = np.arange(sl[0].start, sl[0].stop)[:, None, None]
        j = np.arange(sl[1].start, sl[1].stop)[None, :, None]
        i = np.arange(sl[2].start, sl[2].stop)[None, None, :]
        return (self.grid.origin[axis] + a[0] * i + a[1] * j + a[2] * k).astype(np.float32)

    def paint_shape(self, shape, label=None, hu=None, inside_labels=None, shrink: float = 0.0):
        """Paint an Ellipsoid (optionally shrunk) or every capsule of a Tube."""
        if hasattr(shape, "segments"):
            for a, b, ra, rb, lo, hi in shape.segments():
                sl, (x, y, z) = self.region(lo, hi)
                if sl is not None:
                    self.paint(
                        sl, shape.capsule_mask(x, y, z, a, b, ra, rb, shrink), label, hu, inside_labels
                    )
            return
        if shrink:
            shape = shape.shrunk(shrink)
        sl, (x, y, z) = self.region(*shape.aabb())
        if sl is not None:
            self.paint(sl, shape.mask(x, y, z), label, hu, inside_labels)


def render(
    anat: Anatomy,
    tf: SubjectTransform,
    grid: Grid,
    rng: np.random.Generator,
    noise_hu: float,
    tissue_hu_jitter: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels uint8, HU float32 rounded to integers) on ``grid``, both indexed [k, j, i]."""
    hu_of = {k: v + (rng.normal(0, tissue_hu_jitter) if abs(v) < 200 else 0.0) for k, v in HU.items()}
    cv = Canvas(anat, tf, grid)
    _paint_body(cv, hu_of)
    _paint_thorax(cv, hu_of)
    _paint_bowel(cv, hu_of, rng)
    for name in ("psoas_left", "psoas_right"):
        cv.paint_shape(anat.tubes[name], L["body_soft_tissue"], hu_of["muscle"])
    _paint_organs(cv, hu_of, rng)
    _paint_vessels(cv, hu_of)
    _paint_spine(cv, hu_of)
    _paint_ribs(cv, hu_of)

    spacing_kji = grid.spacing[::-1]
    texture = smooth_noise(grid.shape_kji, 10.0 / spacing_kji, rng)
    lut = np.zeros(256, dtype=np.float32)
    for lab, amp in TEXTURE_HU.items():
        lut[lab] = amp
    hu = cv.hu
    hu += lut[cv.lab] * texture
    # Partial-volume blur: the scanner's point spread is about one voxel wide.
    hu = ndimage.gaussian_filter(hu, sigma=0.5, truncate=2.5)
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_hu)
    np.clip(hu, -1024, 3071, out=hu)
    return cv.lab, np.rint(hu)


# ---- painting stages ----------------------------------------------------------------------
def _paint_body(cv: Canvas, h: dict) -> None:
    t = cv.anat.torso
    x, y, z = cv.x, cv.y, cv.z
    yy = y - np.float32(t.yc)
    # Pelvis a little wider than the waist.
    a = np.float32(t.a) + np.float32(12.0) * np.clip((np.float32(-40.0) - z) / np.float32(120.0), 0, 1)
    b = np.where(yy < 0, np.float32(t.b_ant), np.float32(t.b_post))
    rn = np.sqrt((x / a) ** 2 + (yy / b) ** 2)
    rp = np.sqrt(x * x + yy * yy)
    # Radial distance (mm) outside the muscle boundary along the ray from the body axis.
    d = rp - rp / np.maximum(rn, np.float32(1e-6))
    full = (slice(None),) * 3
    inz = (z >= BODY_Z[0]) & (z <= BODY_Z[1])
    body = inz & (d <= t.fat + t.skin)
    cv.paint(full, body, L["subcutaneous_fat"], h["fat"])
    cv.paint(full, body & (d > t.fat), L["body_soft_tissue"], h["skin"])
    cv.paint(full, inz & (d <= 0), L["body_soft_tissue"], h["muscle"])
    cv.paint(full, inz & (d <= -t.wall), L["body_soft_tissue"], h["visceral_fat"])
    cv.cavity_depth = d  # kept for the thorax and bowel stages
    # Paraspinal muscles behind the spine.
    sl, (x, y, z) = cv.region([-70, 60, BODY_Z[0]], [70, 115, BODY_Z[1]])
    if sl is not None:
        m = ((np.abs(x) - 38) / 27) ** 2 + ((y - 90) / 24) ** 2 <= 1
        cv.paint(
            sl,
            m,
            L["body_soft_tissue"],
            h["muscle"],
            inside_labels=[L["body_soft_tissue"], L["subcutaneous_fat"]],
        )


def _diaphragm_z(cv: Canvas, x, y):
    o = cv.anat.organs
    lr, sp = o["liver_right"], o["spleen"]
    dome_r = lr.aabb()[1][2] + 3.0
    dome_l = max(sp.aabb()[1][2], o["stomach"].aabb()[1][2]) - 5.0
    zr = dome_r - ((x - np.float32(lr.center[0])) / np.float32(90.0)) ** 2 * 40
    zl = dome_l - ((x - np.float32(60.0)) / np.float32(80.0)) ** 2 * 40
    return np.maximum(zr, zl) - np.float32(0.3) * np.clip(y - np.float32(20.0), 0, None)


def _paint_thorax(cv: Canvas, h: dict) -> None:
    t = cv.anat.torso
    sl, (x, y, z) = cv.region([-t.a, t.yc - t.b_ant, 90.0], [t.a, t.yc + t.b_post, BODY_Z[1]])
    if sl is None:
        return
    d = cv.cavity_depth[sl]
    zd = _diaphragm_z(cv, x, y)
    cavity = (d <= -t.wall) & (z > zd - 7)
    cv.paint(sl, cavity, L["body_soft_tissue"], h["muscle"])  # diaphragm
    above = (d <= -14) & (z > zd)
    # Heart (anterior, left of centre) and the posterior mediastinum around the spine.
    mediastinum = ((x - 12) / np.float32(72)) ** 2 + ((y + 18) / np.float32(55)) ** 2 <= 1
    spine = (x / np.float32(30)) ** 2 + ((y - 42) / np.float32(34)) ** 2 <= 1
    cv.paint(sl, above & ~mediastinum & ~spine, L["lungs"], h["lung"])
    cv.paint(sl, above & mediastinum, L["body_soft_tissue"], h["heart"])


def _paint_bowel(cv: Canvas, h: dict, rng: np.random.Generator) -> None:
    anat = cv.anat
    shapes = [anat.organs["bowel"]] + [
        anat.tubes[n] for n in ("colon_ascending", "colon_transverse", "colon_descending")
    ]
    los, his = zip(
        *[
            s.aabb()
            if hasattr(s, "aabb")
            else (s.points.min(0) - s.radii.max(), s.points.max(0) + s.radii.max())
            for s in shapes
        ]
    )
    sl, (x, y, z) = cv.region(np.min(los, axis=0), np.max(his, axis=0))
    if sl is None:
        return
    small = anat.organs["bowel"].mask(x, y, z)
    colon = np.zeros_like(small)
    for tube in shapes[1:]:
        for a, b, ra, rb, _, _ in tube.segments():
            colon |= tube.capsule_mask(x, y, z, a, b, ra, rb)
    region = (
        (small | colon) & (cv.cavity_depth[sl] <= -anat.torso.wall) & (cv.lab[sl] == L["body_soft_tissue"])
    )
    f = smooth_noise(x.shape, 9.0 / cv.grid.spacing[::-1], rng)
    hu = np.where(np.abs(f) < 0.35, np.float32(h["bowel_wall"]), np.float32(h["bowel_content"]) + 8 * f)
    hu = np.where(f < -1.1, np.float32(h["visceral_fat"]), hu)
    gas = np.where(colon, f > 0.5, f > 1.2)
    hu = np.where(gas, np.float32(h["gas"]), hu).astype(np.float32)
    cv.paint(sl, region, L["bowel"], hu)


def _paint_organs(cv: Canvas, h: dict, rng: np.random.Generator) -> None:
    anat, tf = cv.anat, cv.tf
    o = anat.organs
    for name in ("liver_right", "liver_left"):
        cv.paint_shape(o[name], L["liver"], h["liver"])
    for name in ("hepatic_veins", "hepatic_vein_left", "portal_vein"):
        cv.paint_shape(anat.tubes[name], None, h["liver_vessel"], inside_labels=[L["liver"]])
    # The stomach lies behind the left lobe; where the shapes overlap the stomach wins.
    st = o["stomach"]
    sl, (x, y, z) = cv.region(*st.aabb())
    if sl is not None:
        cv.paint(sl, st.mask(x, y, z), L["stomach"], h["stomach_wall"])
        lumen = st.shrunk(4.0).mask(x, y, z)
        centre_world = tf.canonical_to_world(st.center)[0]
        # Supine patient: gas rises anteriorly (-y in world, whatever the subject's rotation).
        level = centre_world[1] - rng.uniform(0.1, 0.6) * st.semi[1]
        cv.paint(sl, lumen, None, h["gastric_fluid"])
        cv.paint(sl, lumen & (cv.world_axis(sl, 1) < level), None, h["gas"])
    cv.paint_shape(o["spleen"], L["spleen"], h["spleen"])
    for side in ("left", "right"):
        k = o[f"kidney_{side}"]
        lab = L[f"kidney_{side}"]
        cv.paint_shape(k, lab, h["kidney_cortex"])
        cv.paint_shape(k.scaled(0.72), None, h["kidney_medulla"], inside_labels=[lab])
        medial = np.array([-np.sign(k.center[0]), -0.3, 0.0])
        sinus = type(k)(k.center + medial * 0.45 * k.semi[0], k.semi * 0.36, k.rot)
        cv.paint_shape(sinus, None, h["renal_sinus"], inside_labels=[lab])
    cv.paint_shape(anat.tubes["pancreas"], L["pancreas"], h["pancreas"])


def _paint_vessels(cv: Canvas, h: dict) -> None:
    for name in ("ivc", "iliac_vein_-1", "iliac_vein_1"):
        cv.paint_shape(cv.anat.tubes[name], L["ivc"], h["blood"])
    for name in ("aorta", "iliac_artery_-1", "iliac_artery_1", "celiac", "sma"):
        cv.paint_shape(cv.anat.tubes[name], L["aorta"], h["blood"])


def _paint_spine(cv: Canvas, h: dict) -> None:
    anat = cv.anat
    pitch = anat.level_z["L3"] - anat.level_z["L4"]
    for n, level in enumerate(LEVELS):
        c, semi, half = anat.vertebral_body(level)
        zc = c[2]
        ycanal = c[1] + semi[1] + 9.0
        sl, (x, y, z) = cv.region([-45, 20, zc - pitch / 2], [45, ycanal + 45, zc + pitch / 2])
        if sl is None:
            continue
        dz = np.abs(z - np.float32(zc))
        rr = (x / np.float32(semi[0])) ** 2 + ((y - np.float32(c[1])) / np.float32(semi[1])) ** 2
        body = (rr <= 1) & (dz <= half)
        cv.paint(sl, body, L["vertebrae"], h["cortical_bone"])
        inner = (x / np.float32(semi[0] - 2.5)) ** 2 + (
            (y - np.float32(c[1])) / np.float32(semi[1] - 2.5)
        ) ** 2 <= 1
        cv.paint(sl, inner & (dz <= half - 2.0), None, h["cancellous_bone"])
        yc = y - np.float32(ycanal)
        rc = np.sqrt(x * x + yc * yc)
        arch = (rc >= 8.5) & (rc <= 15.0) & (yc >= -6) & (dz <= 0.8 * half)
        spinous = (
            (np.abs(x) <= 4.5)
            & (yc >= 12)
            & (yc <= 40)
            & (np.abs(z - np.float32(zc) + 0.25 * (yc - 12)) <= 9)
        )
        transverse = (
            (np.abs(x) >= 12)
            & (np.abs(x) <= 40 - 0.8 * n)
            & (np.abs(yc + 1) <= 5)
            & (np.abs(z - np.float32(zc + 2)) <= 6)
        )
        cv.paint(sl, arch | spinous | transverse, L["vertebrae"], h["posterior_elements"])
        cv.paint(sl, (rc < 8.5) & (np.abs(z - np.float32(zc)) <= pitch / 2), L["body_soft_tissue"], h["csf"])
    for upper, lower in pairwise(LEVELS):
        c, semi, half = anat.disc(upper, lower)
        sl, (x, y, z) = cv.region(c - [semi[0], semi[1], half], c + [semi[0], semi[1], half])
        if sl is None:
            continue
        rr = (x / np.float32(semi[0])) ** 2 + ((y - np.float32(c[1])) / np.float32(semi[1])) ** 2
        cv.paint(sl, (rr <= 1) & (np.abs(z - np.float32(c[2])) <= half), L["intervertebral_discs"], h["disc"])
    # Sacrum: a wedge below L5 that curves posteriorly; L5/S1 disc above it.
    c5, semi5, half5 = anat.vertebral_body("L5")
    s_top = c5[2] - half5 - anat.disc_gap
    sl, (x, y, z) = cv.region([-60, 20, BODY_Z[0]], [60, 130, s_top + anat.disc_gap])
    if sl is not None:
        depth = np.float32(s_top) - z
        yc = np.float32(c5[1]) + 0.45 * depth
        sx = np.float32(semi5[0] + 20) - 0.2 * depth
        rr = (x / sx) ** 2 + ((y - yc) / np.float32(semi5[1])) ** 2
        sac = (rr <= 1) & (depth >= 0)
        cv.paint(sl, sac, L["vertebrae"], h["cortical_bone"])
        cv.paint(sl, sac & (rr <= 0.6) & (depth >= 2), None, h["cancellous_bone"])
        rr5 = (x / np.float32(semi5[0])) ** 2 + ((y - np.float32(c5[1])) / np.float32(semi5[1])) ** 2
        cv.paint(
            sl, (rr5 <= 1) & (depth < 0) & (depth >= -anat.disc_gap), L["intervertebral_discs"], h["disc"]
        )


#: Rib n (attached to vertebra Tn) runs from this angle (rad from the posterior midline) to its end.
RIB_END = {"T8": 2.75, "T9": 2.65, "T10": 2.45, "T11": 1.9, "T12": 1.45}


def _paint_ribs(cv: Canvas, h: dict) -> None:
    """Ribs as tubes around an elliptic ring, descending anteriorly (one angle field for all ribs)."""
    t = cv.anat.torso
    a_r, b_post, b_ant = t.a - 9.0, 84.0, t.b_ant - 18.0
    theta0, theta_max, drop, radius = 0.45, 2.75, 95.0, 5.5
    tops = {level: cv.anat.level_z[level] + 6.0 for level in RIB_END}
    sl, (x, y, z) = cv.region(
        [-a_r - 8, t.yc - b_ant - 8, min(tops.values()) - drop - 10],
        [a_r + 8, t.yc + b_post + 8, max(tops.values()) + 10],
    )
    if sl is None:
        return
    yy = y - np.float32(t.yc)
    theta = np.arctan2(np.abs(x), yy)
    rho = np.sqrt(x * x + yy * yy)
    b = np.where(yy > 0, np.float32(b_post), np.float32(b_ant))
    # Ring radius along the ray: rho / (normalised elliptic radius of the point).
    ring = rho / np.maximum(np.sqrt((x / np.float32(a_r)) ** 2 + (yy / b) ** 2), np.float32(1e-6))
    radial2 = (rho - ring) ** 2
    fall = np.float32(drop) * np.clip(
        (theta - np.float32(theta0)) / np.float32(theta_max - theta0), 0, None
    ) ** np.float32(1.1)
    zrel = z + fall  # the rib centreline is at zrel == its top height
    near = (theta >= theta0) & (radial2 <= radius**2)
    for level, theta_end in RIB_END.items():
        d2 = radial2 + (zrel - np.float32(tops[level])) ** 2
        span = near & (theta <= theta_end)
        cv.paint(sl, span & (d2 <= radius**2), L["ribs"], h["cortical_bone"])
        cv.paint(sl, span & (d2 <= (radius - 1.8) ** 2), None, h["cancellous_bone"])
