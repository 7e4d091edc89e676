"""Phantom subjects and cohorts: generation, files on disk, and loading them back.

A subject = canonical anatomy (``anatomy``) mapped to its world frame by a random affine plus a
smooth elastic deformation (``transform``), voxelised on a random field of view, spacing and a
slightly oblique grid (``render``). Everything follows from one integer seed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from anatomical_embedding.io import Volume, atomic_write, read_image, write_image
from anatomical_embedding.io.markups import PointList, read_points, write_points
from anatomical_embedding.phantoms.anatomy import BODY_Z, Anatomy
from anatomical_embedding.phantoms.labels import LABEL_NAMES, color_table_text
from anatomical_embedding.phantoms.render import Grid, render
from anatomical_embedding.phantoms.transform import SubjectTransform

log = logging.getLogger(__name__)

COHORT_FORMAT = "anatomical-embedding-cohort/1"


@dataclass(frozen=True)
class PhantomConfig:
    """How subjects are drawn. ``spacing=None`` draws a spacing per subject around ``base_spacing``
    (in-plane x1.0-1.25, slices x1.0-1.5); a number fixes it. ``size`` caps the voxels per axis by
    coarsening the spacing, so the physical body stays the same (fast small phantoms for tests)."""

    spacing: float | None = 2.0
    base_spacing: float = 2.0
    size: int | None = None
    oblique_deg: float = 3.0  # tilt of the voxel grid against the world axes
    scale_range: float = 0.10
    rotation_deg: tuple[float, float, float] = (5.0, 5.0, 10.0)  # about L, P, S
    translation_mm: float = 15.0
    elastic_amplitude_mm: float = 3.5  # per plane wave, before the gradient cap
    noise_hu: tuple[float, float] = (10.0, 20.0)
    fov_margin_mm: float = 25.0  # every landmark lies at least this far inside the field of view (along z)

    def __post_init__(self) -> None:
        if self.spacing is not None and self.spacing <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")
        if self.size is not None and self.size < 16:
            raise ValueError(f"size must be at least 16 voxels, got {self.size}")


@dataclass
class PhantomSubject:
    subject_id: str
    seed: int
    image: Volume  # float32 HU (integer valued)
    labels: Volume  # uint8, ids in LABEL_NAMES
    landmarks: dict[str, np.ndarray]  # name -> (3,) LPS world
    landmark_organs: dict[str, int]

    def point_list(self) -> PointList:
        extra = {
            n: {"description": f"inside {LABEL_NAMES[o]} (label {o})"}
            for n, o in self.landmark_organs.items()
        }
        return PointList.from_dict(self.landmarks, extra)


def subject_seeds(seed: int, n: int) -> list[int]:
    """Independent per-subject seeds derived from the cohort seed (stable across numpy versions)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def generate_subject(
    seed: int, config: PhantomConfig | None = None, subject_id: str | None = None
) -> PhantomSubject:
    cfg = config or PhantomConfig()
    rng = np.random.default_rng(seed)
    anat = Anatomy.sample(rng)
    tf = SubjectTransform.sample(
        rng, cfg.scale_range, cfg.rotation_deg, cfg.translation_mm, amplitude_mm=cfg.elastic_amplitude_mm
    )
    lm = anat.landmarks()
    names = list(lm)
    world = tf.canonical_to_world(np.stack([lm[n][0] for n in names]))
    grid = _choose_grid(rng, cfg, anat, tf, world)
    noise = rng.uniform(*cfg.noise_hu)
    labels, hu = render(anat, tf, grid, rng, noise)
    geom = {"spacing": grid.spacing, "origin": grid.origin, "direction": grid.direction}
    return PhantomSubject(
        subject_id=subject_id or f"phantom_s{seed}",
        seed=int(seed),
        image=Volume(hu.astype(np.float32), **geom),
        labels=Volume(labels, **geom),
        landmarks={n: world[i] for i, n in enumerate(names)},
        landmark_organs={n: lm[n][1] for n in names},
    )


def _choose_grid(
    rng: np.random.Generator,
    cfg: PhantomConfig,
    anat: Anatomy,
    tf: SubjectTransform,
    landmarks_world: np.ndarray,
) -> Grid:
    axis = rng.normal(size=3)
    direction = Rotation.from_rotvec(
        axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(0, cfg.oblique_deg))
    ).as_matrix()
    # Points on the outer body surface (elliptic cross-sections at a few heights), mapped to the
    # grid frame g = D^T w; the affine forward map is exact up to the elastic bound ``e``.
    surface = anat.torso.outer_surface_points()
    g = (surface @ tf.linear.T + tf.translation) @ direction
    e = tf.max_displacement
    lmg = landmarks_world @ direction
    margin = cfg.fov_margin_mm
    fov_lo, fov_hi = np.empty(3), np.empty(3)
    for a in (0, 1):  # in-plane: the body plus some air, sometimes cropping its edge a little
        fov_lo[a] = min(g[:, a].min() - e + rng.uniform(-15.0, 10.0), lmg[:, a].min() - margin)
        fov_hi[a] = max(g[:, a].max() + e - rng.uniform(-15.0, 10.0), lmg[:, a].max() + margin)
    # Along z: a random crop of the torso that keeps every landmark; slices stay inside the body.
    top = g[surface[:, 2] == BODY_Z[1], 2].min() - e
    bottom = g[surface[:, 2] == BODY_Z[0], 2].max() + e
    need_lo, need_hi = lmg[:, 2].min() - margin, lmg[:, 2].max() + margin
    fov_lo[2] = rng.uniform(min(bottom, need_lo), need_lo)
    fov_hi[2] = rng.uniform(need_hi, max(top, need_hi))
    extent = fov_hi - fov_lo
    if cfg.spacing is not None:
        spacing = np.full(3, float(cfg.spacing))
        rng.uniform(size=2)  # keep the random stream identical whether or not the spacing is fixed
    else:
        s_xy = cfg.base_spacing * rng.uniform(1.0, 1.25)
        spacing = np.array([s_xy, s_xy, cfg.base_spacing * rng.uniform(1.0, 1.5)])
    if cfg.size is not None:
        spacing[:2] = max(spacing[0], extent[:2].max() / cfg.size)
        spacing[2] = max(spacing[2], extent[2] / cfg.size)
    n = np.maximum(np.ceil(extent / spacing - 1e-9).astype(int), 1)
    # Centre the voxel grid on the field of view.
    start = 0.5 * (fov_lo + fov_hi) - 0.5 * (n - 1) * spacing
    return Grid(direction @ start, direction, spacing, (int(n[2]), int(n[1]), int(n[0])))


# ---- cohorts on disk ----------------------------------------------------------------------------
@dataclass
class CohortSubject:
    id: str
    image_path: Path
    label_path: Path
    landmarks_path: Path
    landmarks: dict[str, np.ndarray]

    def load_image(self) -> Volume:
        return read_image(self.image_path)

    def load_labels(self) -> Volume:
        return read_image(self.label_path)


@dataclass
class Cohort:
    root: Path
    manifest_path: Path
    subjects: list[CohortSubject]
    label_names: dict[int, str]
    landmark_organs: dict[str, int]
    seed: int | None = None
    spacing: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def landmark_names(self) -> list[str]:
        return list(self.landmark_organs)

    def __len__(self) -> int:
        return len(self.subjects)


def _write_subject(job: tuple[int, int, str, PhantomConfig, str, bool]) -> dict:
    _, seed, sid, cfg, out, overwrite = job
    out = Path(out)
    t0, c0 = time.perf_counter(), time.process_time()
    s = generate_subject(seed, cfg, sid)
    # CT stores integer HU; the image is integer valued, so int16 on disk is lossless and 2x smaller.
    write_image(
        s.image.with_array(s.image.array.astype(np.int16)), out / "images" / f"{sid}.nii.gz", overwrite
    )
    write_image(s.labels, out / "labels" / f"{sid}.nii.gz", overwrite)
    pl = s.point_list()
    write_points(out / "landmarks" / f"{sid}.mrk.json", pl, overwrite)
    write_points(out / "landmarks" / f"{sid}.csv", pl, overwrite)
    return {
        "id": sid,
        "seed": seed,
        "image": f"images/{sid}.nii.gz",
        "label": f"labels/{sid}.nii.gz",
        "landmarks": f"landmarks/{sid}.mrk.json",
        "landmarks_csv": f"landmarks/{sid}.csv",
        "shape_ijk": list(s.image.shape_ijk),
        "spacing": [round(float(v), 4) for v in s.image.spacing],
        "landmark_organs": s.landmark_organs,
        # Timing is returned to the caller but kept out of the manifest, so the files are reproducible.
        "_seconds": (time.perf_counter() - t0, time.process_time() - c0),
    }


def generate_cohort(
    out_dir: str | Path,
    n: int,
    seed: int,
    spacing: float | None = 2.0,
    size: int | None = None,
    workers: int = 2,
    overwrite: bool = False,
    config: PhantomConfig | None = None,
) -> Path:
    """Write ``n`` subjects, label tables and ``manifest.json`` into ``out_dir``; return the manifest path.

    ``config`` (optional) sets everything else; ``spacing`` and ``size`` override its fields.
    """
    out = Path(out_dir)
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
    base = config or PhantomConfig()
    cfg = PhantomConfig(**{**base.__dict__, "spacing": spacing, "size": size})
    for sub in ("images", "labels", "landmarks"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    seeds = subject_seeds(seed, n)
    jobs = [(i, s, f"phantom_{i:03d}", cfg, str(out), overwrite) for i, s in enumerate(seeds)]
    workers = max(1, min(int(workers), n))
    t0 = time.perf_counter()
    if workers == 1:
        records = [_write_subject(j) for j in jobs]
    else:
        # forkserver: safe with threads in the parent (torch, BLAS) and cheap enough for ~1 s jobs.
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            records = list(pool.map(_write_subject, jobs))
    organs = records[0]["landmark_organs"]
    if any(r["landmark_organs"] != organs for r in records):
        raise RuntimeError("subjects disagree on their landmark set")  # cannot happen: one anatomy model
    timings = np.array([r.pop("_seconds") for r in records])
    for r in records:
        del r["landmark_organs"]
    log.info(
        "%d subjects in %.1f s wall (%.2f s CPU per subject, %d worker(s))",
        n,
        time.perf_counter() - t0,
        timings[:, 1].mean(),
        workers,
    )
    _remove_stale_subjects(out, {r["id"] for r in records})
    names = {str(k): v for k, v in LABEL_NAMES.items()}
    atomic_write(
        out / "labels" / "label_names.json", lambda p: p.write_text(json.dumps(names, indent=2), encoding="utf-8"), overwrite
    )
    atomic_write(out / "labels" / "labels.ctbl", lambda p: p.write_text(color_table_text(), encoding="utf-8"), overwrite)
    manifest = {
        "format": COHORT_FORMAT,
        "seed": int(seed),
        "n": n,
        "spacing": spacing,
        "size": size,
        "label_names": names,
        "label_table": "labels/labels.ctbl",
        "landmark_organs": organs,
        "landmark_frame": "LPS",
        "subjects": records,
    }
    path = out / "manifest.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(manifest, indent=2), encoding="utf-8"), overwrite)
    return path


_SUBJECT_FILE = re.compile(r"^(phantom_\d{3,})\.(nii\.gz|mrk\.json|csv)$")


def _remove_stale_subjects(out: Path, keep: set[str]) -> None:
    """After ``--overwrite`` with a smaller ``--n``: drop subject files of the previous cohort.

    Only files named like our own output (``phantom_NNN.<ending>``) in our three sub-folders are
    touched, so a stale subject cannot leak into a folder-based data set.
    """
    for sub in ("images", "labels", "landmarks"):
        for f in (out / sub).iterdir():
            m = _SUBJECT_FILE.match(f.name)
            if m and m.group(1) not in keep and f.is_file():
                log.info("removing %s (not part of the new cohort)", f)
                f.unlink()


def load_cohort(manifest_or_dir: str | Path) -> Cohort:
    path = Path(manifest_or_dir)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"cohort manifest not found: {path}; generate one with `anatomical-embedding phantoms`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != COHORT_FORMAT:
        raise ValueError(
            f"{path} is not a phantom cohort manifest (format {data.get('format')!r}, "
            f"expected {COHORT_FORMAT!r})"
        )
    root = path.parent
    subjects = []
    for rec in data["subjects"]:
        lm_path = root / rec["landmarks"]
        subjects.append(
            CohortSubject(
                rec["id"], root / rec["image"], root / rec["label"], lm_path, read_points(lm_path).as_dict()
            )
        )
    return Cohort(
        root=root,
        manifest_path=path,
        subjects=subjects,
        label_names={int(k): v for k, v in data["label_names"].items()},
        landmark_organs={k: int(v) for k, v in data["landmark_organs"].items()},
        seed=data.get("seed"),
        spacing=data.get("spacing"),
        info=data,
    )
