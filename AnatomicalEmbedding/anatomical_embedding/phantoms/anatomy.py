"""A subject's anatomy in the canonical frame, and its named landmarks.

Canonical frame: LPS millimetres (+x patient left, +y posterior, +z superior), origin near the
centre of the abdomen, the L3 vertebral body centre at z = -20. Shapes are deliberately simple
(ellipsoids, tubes), sized after adult anatomy; every subject jitters organ sizes (+-8 %) and
positions (+-4 mm), fat thickness and vertebral pitch, on top of the global affine and elastic
deformation in ``transform``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from anatomical_embedding.phantoms.labels import LABEL_IDS
from anatomical_embedding.phantoms.shapes import Ellipsoid, Tube, frame_from_axis

#: Vertebral levels from top to bottom; body centres are spaced by the subject's pitch.
LEVELS = ("T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
L3_Z = -20.0
BODY_Z = (-175.0, 215.0)


@dataclass
class Torso:
    """Body cross-section: ellipse around (0, yc) with separate anterior/posterior semi-axes."""

    yc: float
    a: float  # lateral semi-axis of the muscle boundary (at the waist)
    b_ant: float
    b_post: float
    fat: float  # subcutaneous fat thickness
    wall: float = 10.0  # abdominal wall muscle thickness
    skin: float = 2.5

    def outer_surface_points(self, n_angles: int = 72, n_levels: int = 9) -> np.ndarray:
        """Points on the skin (the widest, pelvic, cross-section at every height: conservative)."""
        grow = self.fat + self.skin
        t = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
        ring = np.stack(
            [
                (self.a + 12.0 + grow) * np.sin(t),
                self.yc
                + np.where(np.cos(t) > 0, self.b_post + grow, -(self.b_ant + grow)) * np.abs(np.cos(t)),
            ],
            axis=1,
        )
        z = np.linspace(BODY_Z[0], BODY_Z[1], n_levels)
        return np.array([[x, y, zz] for zz in z for x, y in ring])


@dataclass
class Anatomy:
    torso: Torso
    level_z: dict[str, float]
    body_half_height: float
    disc_gap: float
    vertebra_semi: dict[str, np.ndarray]  # (x, y) semi-axes of each body
    organs: dict[str, Ellipsoid] = field(default_factory=dict)
    tubes: dict[str, Tube] = field(default_factory=dict)

    # ---- sampling ---------------------------------------------------------------------------
    @classmethod
    def sample(cls, rng: np.random.Generator) -> Anatomy:
        def jit(center, sd=4.0):
            return np.asarray(center, dtype=np.float64) + np.clip(rng.normal(0, sd, 3), -2 * sd, 2 * sd)

        def size(semi, sd=0.08):
            return np.asarray(semi, dtype=np.float64) * rng.uniform(1 - sd, 1 + sd, 3)

        def rot(axis, wobble=0.08):
            return frame_from_axis(np.asarray(axis, dtype=np.float64) + rng.normal(0, wobble, 3))

        torso = Torso(
            yc=15.0,
            a=140.0 * rng.uniform(0.95, 1.05),
            b_ant=125.0 * rng.uniform(0.93, 1.07),
            b_post=103.0,
            fat=rng.uniform(8.0, 35.0),
        )
        pitch = 35.0 * rng.uniform(0.95, 1.05)
        disc_gap = rng.uniform(8.5, 11.0)
        l3 = LEVELS.index("L3")
        level_z = {name: L3_Z + (l3 - n) * pitch for n, name in enumerate(LEVELS)}
        vsemi = {
            name: np.array([19.0 + 0.8 * n, 15.0 + 0.4 * n]) * rng.uniform(0.95, 1.05)
            for n, name in enumerate(LEVELS)
        }
        organs = {
            "liver_right": Ellipsoid(jit([-68, 5, 95]), size([70, 75, 68]), rot([0.15, 0.0, 1.0])),
            "liver_left": Ellipsoid(jit([-5, -40, 115]), size([50, 30, 35]), rot([0.3, 0.0, 1.0])),
            "stomach": Ellipsoid(jit([58, -28, 95]), size([36, 30, 52]), rot([0.35, 0.15, 1.0])),
            "spleen": Ellipsoid(jit([97, 45, 112]), size([22, 48, 44]), rot([0.0, 0.25, 1.0])),
            "kidney_left": Ellipsoid(jit([62, 58, 25]), size([26, 20, 55]), rot([-0.22, 0.15, 1.0], 0.05)),
            "kidney_right": Ellipsoid(jit([-60, 58, 5]), size([26, 20, 55]), rot([0.22, 0.15, 1.0], 0.05)),
            "bowel": Ellipsoid(np.array([0.0, -38.0, -60.0]), size([118, 55, 88], 0.04), np.eye(3)),
        }
        ph = jit([-28, -8, 25], 3)
        tubes = {
            "pancreas": Tube(
                np.stack([ph, jit([0, -12, 40], 3), jit([35, 0, 52], 3), jit([70, 28, 62], 3)]),
                np.array([15.0, 11.0, 10.0, 8.5]) * rng.uniform(0.9, 1.1),
            ),
            "colon_ascending": Tube(np.array([[-100, -5, -90], [-100, -15, 40.0]]), np.array([22.0, 22.0])),
            "colon_transverse": Tube(
                np.array([[-100, -15, 40], [0, -60, 20], [100, -25, 50.0]]), np.array([20.0, 18.0, 20.0])
            ),
            "colon_descending": Tube(np.array([[100, -25, 50], [102, 5, -90.0]]), np.array([19.0, 19.0])),
        }
        aorta_r = rng.uniform(9.5, 12.0)
        bif_z = level_z["L4"]
        top = BODY_Z[1] + 20
        tubes["aorta"] = Tube(
            np.array([[8, 15, top], [8, 15, level_z["L1"]], [8, 15, bif_z]]),
            np.array([aorta_r, aorta_r * 0.95, aorta_r * 0.8]),
        )
        for side in (-1, 1):
            tubes[f"iliac_artery_{side}"] = Tube(
                np.array([[8, 15, bif_z], [side * 50 + 4, 30, BODY_Z[0] - 10]]),
                np.array([aorta_r * 0.6, aorta_r * 0.55]),
            )
        tubes["celiac"] = Tube(
            np.array([[8, 10, level_z["T12"]], [8, -25, level_z["T12"] - 3], [22, -30, level_z["T12"]]]),
            np.array([4.0, 4.0, 3.0]),
        )
        tubes["sma"] = Tube(
            np.array([[8, 10, level_z["L1"]], [8, -22, level_z["L1"] - 15], [6, -38, level_z["L1"] - 55]]),
            np.array([4.0, 3.5, 3.0]),
        )
        ivc_r = rng.uniform(9.0, 11.5)
        conf_z = level_z["L4"] - 0.4 * pitch
        tubes["ivc"] = Tube(
            np.array([[-22, 18, level_z["T10"]], [-22, 18, conf_z]]), np.array([ivc_r, ivc_r])
        )
        for side in (-1, 1):
            tubes[f"iliac_vein_{side}"] = Tube(
                np.array([[-22, 18, conf_z], [side * 44 - 6, 38, BODY_Z[0] - 10]]),
                np.array([ivc_r * 0.7, ivc_r * 0.65]),
            )
        tubes["hepatic_veins"] = Tube(
            np.array([[-22, 18, 150], [-60, -5, 130], [-105, -25, 115]]), np.array([6.0, 5.0, 3.5])
        )
        tubes["hepatic_vein_left"] = Tube(np.array([[-22, 18, 150], [5, -30, 125]]), np.array([5.0, 3.5]))
        tubes["portal_vein"] = Tube(
            np.array([[-5, -5, 60], [-40, -5, 80], [-80, 0, 95]]), np.array([6.5, 6.0, 4.5])
        )
        for side, name in ((-1, "right"), (1, "left")):
            start_z = level_z["L1"]
            tubes[f"psoas_{name}"] = Tube(
                np.array(
                    [
                        [side * 26, 45, start_z],
                        [side * 42, 45, level_z["L4"]],
                        [side * 58, 32, BODY_Z[0] - 10],
                    ]
                ),
                np.array([7.0, 21.0, 25.0]) * rng.uniform(0.85, 1.15),
            )
        return cls(
            torso,
            level_z,
            12.5 * pitch / 35.0,
            disc_gap,
            vsemi,
            organs,
            tubes,
        )

    # ---- derived geometry -----------------------------------------------------------------
    def vertebral_body(self, level: str) -> tuple[np.ndarray, np.ndarray, float]:
        """Centre, (x, y) semi-axes and half height of a vertebral body (an elliptic cylinder)."""
        return np.array([0.0, 45.0, self.level_z[level]]), self.vertebra_semi[level], self.body_half_height

    def disc(self, upper: str, lower: str) -> tuple[np.ndarray, np.ndarray, float]:
        zu, zl = self.level_z[upper], self.level_z[lower]
        semi = 0.5 * (self.vertebra_semi[upper] + self.vertebra_semi[lower])
        return np.array([0.0, 45.0, 0.5 * (zu + zl)]), semi, 0.5 * (zu - zl) - self.body_half_height

    # ---- landmarks --------------------------------------------------------------------------
    def landmarks(self) -> dict[str, tuple[np.ndarray, int]]:
        """Name -> (canonical point, label id it lies inside).

        Points sit well inside their organ (at least ~10 mm from the surface where the organ is
        big enough), so voxelisation at 2-6 mm cannot move them out of their label. "Centroid"
        means the centre of the organ's analytic shape, not the centre of mass of the label.
        """
        o, t = self.organs, self.tubes
        lm: dict[str, tuple[np.ndarray, int]] = {
            "liver_centroid": (o["liver_right"].point([0.1, -0.1, 0.0]), LABEL_IDS["liver"]),
            "liver_dome": (o["liver_right"].point([0.0, 0.0, 0.82]), LABEL_IDS["liver"]),
            "liver_inferior_tip": (o["liver_right"].point([-0.35, -0.1, -0.72]), LABEL_IDS["liver"]),
            "spleen_centroid": (o["spleen"].point([0, 0, 0]), LABEL_IDS["spleen"]),
            "stomach_centroid": (o["stomach"].point([0, 0, 0]), LABEL_IDS["stomach"]),
            "pancreas_head": (t["pancreas"].points[0], LABEL_IDS["pancreas"]),
            "pancreas_tail": (t["pancreas"].point(0.93), LABEL_IDS["pancreas"]),
            "aortic_bifurcation": (t["aorta"].points[-1], LABEL_IDS["aorta"]),
            "celiac_origin": (np.array([8.0, 15.0, self.level_z["T12"]]), LABEL_IDS["aorta"]),
            "sma_origin": (np.array([8.0, 15.0, self.level_z["L1"]]), LABEL_IDS["aorta"]),
            "ivc_confluence": (t["ivc"].points[-1], LABEL_IDS["ivc"]),
            "ivc_renal_level": (np.array([-22.0, 18.0, self.level_z["L2"]]), LABEL_IDS["ivc"]),
        }
        for side in ("left", "right"):
            k = o[f"kidney_{side}"]
            lab = LABEL_IDS[f"kidney_{side}"]
            lm[f"kidney_{side}_centroid"] = (k.point([0, 0, 0]), lab)
            lm[f"kidney_{side}_upper_pole"] = (k.point([0, 0, 0.78]), lab)
            lm[f"kidney_{side}_lower_pole"] = (k.point([0, 0, -0.78]), lab)
        for level in ("T11", "T12", "L1", "L2", "L3", "L4", "L5"):
            lm[f"{level}_body_centre"] = (self.vertebral_body(level)[0], LABEL_IDS["vertebrae"])
        for upper, lower in (("T12", "L1"), ("L2", "L3"), ("L4", "L5")):
            lm[f"{upper}_{lower}_disc"] = (self.disc(upper, lower)[0], LABEL_IDS["intervertebral_discs"])
        return lm
