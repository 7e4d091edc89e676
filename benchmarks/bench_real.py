"""Landmark transfer on real CT and MR volumes: models against identical coordinates and registration.

    python benchmarks/bench_real.py [--data ../shared/data] [--model RUN_DIR_OR_PACKAGE ...]
                                    [--train-quick-aefm SECONDS] [--transforms 3] [--points 40]
                                    [--threads 2] [--device auto|cpu|cuda] [--only NAME ...] [--smoke]
                                    [--work DIR] [--out benchmarks/results]

Writes ``real.json``, ``real.md`` and ``real_cdf.png`` (error CDF per pair type) under ``--out``. Needs the real
sample volumes of ``--data`` (default ``../shared/data`` beside the repository; see its README.md).

Pair types
* **intra CT / intra MR**: every real volume (resampled to 2 mm) against itself under ``--transforms`` known random
  transforms: rotation up to 10 degrees about a random axis through the volume centre, translation up to 20 mm,
  isotropic scale within 5 %, a cubic B-spline displacement (4 x 4 x 4 mesh, coefficients N(0, 2 mm)), then an
  intensity change (gain 0.85-1.15, offset within 5 % and Gaussian noise of 2 % of the 0.5-99.5 percentile range).
  The deformed image is ``moved(q) = source(T(q))`` (SimpleITK's resampling convention: the transform maps points
  of the output grid to the input). The structure points are picked in the *moved* image and transferred to the
  original, where the exact truth is ``T(q)``: no transform is ever inverted. Points: up to ``--points`` local
  maxima of the local standard deviation (Gaussian window, sigma 4 mm) inside the body (foreground above Otsu,
  holes filled, eroded by 6 mm), at least 20 mm apart, with the point and its truth at least 10 mm inside both
  fields of view.
* **slab CT / slab MR** (partial field of view): the intra pairs' moved images (same seeds, up to 200 candidate
  points) against a ``--slab-mm`` slab of the original along its slice axis (below, at and above the centre for the
  three transforms), keeping the points whose truth lies at least 5 mm inside the slab: a follow-up scan of part of
  the body. Volumes shorter than two slabs are skipped.
* **cross CT**: centroids of TotalSegmentator labels shared by ``example_seg`` (on ``example_ct_sm``) and
  ``example_seg_dicom`` (on the DICOM series), both directions. Only the labels the data README names as least
  affected by the slab edges are used (7 pancreas, 8 right adrenal, 64 portal/splenic vein, 103/115 ribs 12).
* **cross MR**: the BraTS cases' brain masks (their only anatomical labels: the tumour masks mark different
  lesions in each patient, and voxelmorph's aseg has one subject): centroid and the five poles (anterior,
  posterior, left, right, superior) of the brain mask, case ``n`` to case ``n + 1`` in a cycle.

Methods, side by side: identical coordinates; SimpleITK affine, and affine + B-spline (``evaluation.registration``,
both at 4 mm with a reduced iteration budget so that a pair takes seconds); every ``--model`` raw, with the coarse
prior (``PriorConfig(refine=None)``: the prior's fine search), and with the robust prior as the product uses it
(refined densely in embedding space, :mod:`anatomical_embedding.inference.feature_registration`). ``--train-quick-aefm SECONDS`` first trains a small AEFM (the tests' recipe, widths 8-64, at 4 mm, preset
``mri_percentile`` so that CT and MR share it) on the benchmark's original (untransformed) volumes for at most
SECONDS, and adds it as a model: self-supervised and transductive (it never sees a point or a label, but has seen
the target images), so it is a check that the pipeline works on real data, not a generalisation result.

Seconds per pair: everything for that pair (registration; for a model the embedding of both images, charged to
every pair that uses them, plus matching). Milliseconds per point: the point-dependent part (matching, with the
prior's fit for the prior variant; mapping through the transform for registration).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from _common import machine_description, machine_line, machine_table, md_table, peak_rss_mb, write_results

log = logging.getLogger("bench_real")
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SPACING = 2.0
GROUPS = ("intra CT", "intra MR", "slab CT", "slab MR", "cross CT", "cross MR")
#: Thickness of the partial-field-of-view targets (``--slab-mm``), and how many candidate points they keep from.
SLAB_MM = 60.0
SLAB_CANDIDATES = 200
#: TotalSegmentator ``total`` ids used for the cross-subject CT pairs (README: least affected by the slab edges).
CROSS_CT_LABELS = {7: "pancreas", 8: "adrenal_gland_right", 64: "portal_vein_and_splenic_vein",
                   103: "rib_left_12", 115: "rib_right_12"}
#: Registration baselines: 4 mm, bounded budgets (RegistrationConfig has the full defaults).
REG_CONFIG = {"spacing": 4.0, "sampling_fraction": 0.02, "affine_iterations": 100, "bspline_iterations": 15,
              "bspline_mesh_mm": 80.0,
              "shrink_factors": (2, 1), "smoothing_sigmas": (1.0, 0.0)}


# ---- data ----------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    modality: str        # "CT" or "MR"
    path: str
    volume: Any = None   # Volume at SPACING mm


def _vti_volume(data: Path, stem: str):
    """LIDC2/headsq: the converted NIfTI, or the .vti converted in memory as convert_vti.py does (flip j and k)."""
    import runpy

    from anatomical_embedding.io import Volume, read_image

    nii = data / "vtkjs-volumes" / f"{stem}.nii.gz"
    if nii.is_file():
        return read_image(nii)
    ns = runpy.run_path(str(data / "vtkjs-volumes" / "convert_vti.py"))
    vol, spacing, origin, direction = ns["read_vtkjs_image"](data / "vtkjs-volumes" / f"{stem}.vti")
    direction = ns["orthonormalize"](direction)
    n = vol.shape[::-1]
    for a in (1, 2):  # the "jk" header fix of convert_vti.py
        origin = origin + direction[:, a] * spacing[a] * (n[a] - 1)
        direction[:, a] *= -1
    return Volume(vol, spacing, origin, direction)


def _voxelmorph_volume(data: Path):
    from anatomical_embedding.io import read_image

    return read_image(data / "voxelmorph-brain" / "test_scan_vol.nii.gz")


def case_list(data: Path) -> list[tuple[str, str, Callable[[], Any], str]]:
    """(name, modality, loader, path) of every real volume of the benchmark."""
    from anatomical_embedding.io import read_image

    ts = data / "totalsegmentator-examples"
    items = [
        ("example_ct", "CT", data / "ct-abdomen-pelvis-example" / "example_ct.nii.gz"),
        ("upper_abdomen_dicom", "CT", data / "ct-abdomen-pelvis-example" / "upper-abdomen-dicom"),
        ("LIDC2", "CT", data / "vtkjs-volumes" / "LIDC2.nii.gz"),
        ("headsq", "CT", data / "vtkjs-volumes" / "headsq.nii.gz"),
        ("cta_aorta_crop", "CT", ts / "aorta_report" / "models" / "ct_cropped.nii.gz"),
        ("cta_pulmonary_crop", "CT", ts / "pulmonary_report" / "models" / "ct_cropped.nii.gz"),
        ("voxelmorph_brain", "MR", data / "voxelmorph-brain" / "test_scan_vol.nii.gz"),
        ("pyradiomics_brain1", "MR", data / "pyradiomics-mr" / "brain1_image.nrrd"),
        ("pyradiomics_brain2", "MR", data / "pyradiomics-mr" / "brain2_image.nrrd"),
        ("ts_mr_abdomen", "MR", ts / "example_mr_sm.nii.gz"),
    ]
    items += [(f"brats_{p.name.split('_')[2]}_t1c", "MR", p / "T1c_subtrMeanDivStd.nii.gz")
              for p in sorted((data / "brats-examples").glob("*/brats_*"), key=lambda p: p.name)]
    out = []
    for name, modality, path in items:
        if name in ("LIDC2", "headsq"):
            loader = (lambda s=name: _vti_volume(data, s))
            ok = path.is_file() or path.with_suffix("").with_suffix(".vti").is_dir()
        else:
            loader = (lambda p=path: read_image(p))
            ok = path.exists()
        if ok:
            out.append((name, modality, loader, str(path)))
        else:
            log.warning("missing %s (%s): skipped", name, path)
    return out


def to_benchmark_grid(volume):
    """Resample to SPACING mm isotropic (float32, same direction and field of view)."""
    from anatomical_embedding.io import resample_to_spacing

    v = resample_to_spacing(volume.with_array(volume.array.astype(np.float32)), SPACING)
    return v.with_array(v.array.astype(np.float32))


# The known-deformation toolkit lives in the engine (the demo uses it too); re-exported for the tests.
from anatomical_embedding.evaluation.known_pairs import (  # noqa: E402,F401
    volume_centre, random_transform, map_points, random_intensity, deform, otsu_threshold, body_mask, local_contrast, select_structure_points, inside_fov, known_pair)


# ---- shared by the scripts that run on bench_real's pairs (bench_real_floor, bench_real_confidence) -------------
def add_pair_arguments(ap: argparse.ArgumentParser, threads: int, threads_help: str = "CPU threads") -> None:
    """--data, --threads, --transforms, --points, --seed, --only and --out, as bench_real takes them."""
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--threads", type=int, default=threads, help=threads_help)
    ap.add_argument("--transforms", type=int, default=3)
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="volume names (bench_real's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))


def data_folder_or_error(args: argparse.Namespace) -> Path | None:
    """``args.data`` when it is a folder (and the thread count applied to torch and SimpleITK), else None after a
    one-line error."""
    data = Path(args.data)
    if not data.is_dir():
        print(f"error: {data} is not a folder; pass --data with the shared real volumes (see its README.md)",
              file=sys.stderr)
        return None
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    return data


def run_result(script: str, threads: int, argv: list[str] | None, t_start: float, summary: list[dict],
               records: list[dict]) -> dict:
    """The results payload of a script run on bench_real's pairs: machine, command, wall time, peak memory."""
    command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
    return {"machine": machine_description(threads), "command": command, "wall_s": time.perf_counter() - t_start,
            "peak_rss_mb": peak_rss_mb(), "summary": summary, "records": records}


# ---- pairs -----------------------------------------------------------------------------------------------
@dataclass
class Pair:
    group: str
    name: str
    source: Any                    # Volume (points are picked here)
    target: Any                    # Volume
    points: np.ndarray             # (n, 3) LPS in the source
    truth: np.ndarray              # (n, 3) LPS in the target
    names: list[str]
    source_key: str
    target_key: str
    info: dict = field(default_factory=dict)


def intra_pairs(case: Case, transforms: int, n_points: int, seed0: int, slab_mm: float = 0.0) -> list[Pair]:
    """The intra pairs of ``case``, each followed by its slab pair when ``slab_mm`` > 0 (:func:`slab_pair`)."""
    pairs = []
    for t in range(transforms):
        # The point selection is greedy by score, so the first n_points of a longer list are the n_points list.
        want = max(n_points, SLAB_CANDIDATES) if slab_mm > 0 else n_points
        k = known_pair(case.volume, seed0 + 1000 * t + sum(map(ord, case.name)), want)
        pts, truth = k.points[:n_points], k.truth[:n_points]
        disp = np.linalg.norm(truth - pts, axis=1)
        info = {**k.info, "n_points": int(len(pts)), "true_displacement_mm": {
            "mean": round(float(disp.mean()), 2) if len(disp) else None,
            "max": round(float(disp.max()), 2) if len(disp) else None}}
        pairs.append(Pair(f"intra {case.modality}", f"{case.name} T{t}", k.moved, case.volume, pts, truth,
                          [f"P{i + 1}" for i in range(len(pts))], f"{case.name}/T{t}", case.name, info))
        if slab_mm > 0:
            pairs += slab_pair(case, t, k, slab_mm)
    return pairs


def slab_pair(case: Case, t: int, k, slab_mm: float) -> list[Pair]:
    """Transform ``t``'s moved image (known pair ``k``) against a ``slab_mm`` slab of the original along k: below,
    at and above the centre for t = 0, 1, 2; the candidate points whose truth lies >= 5 mm inside the slab. Empty
    for a volume shorter than two slabs or a slab with fewer than 3 points."""
    from anatomical_embedding.io.geometry import crop

    vol = case.volume
    K = vol.array.shape[0]
    n = int(round(slab_mm / float(vol.spacing[2])))
    if K < 2 * n:
        return []
    k0 = int(np.clip((K - n) // 2 + (t % 3 - 1) * (n // 2), 0, K - n))
    slab = crop(vol, (0, 0, k0), (vol.array.shape[2], vol.array.shape[1], n))
    keep = inside_fov(slab, k.truth, margin_mm=5.0)
    if keep.sum() < 3:
        return []
    info = {**k.info, "n_points": int(keep.sum()), "slab_first_k": k0, "slab_mm": n * float(vol.spacing[2])}
    return [Pair(f"slab {case.modality}", f"{case.name} T{t} slab", k.moved, slab, k.points[keep], k.truth[keep],
                 [f"P{i + 1}" for i in range(int(keep.sum()))], f"{case.name}/T{t}/full", f"{case.name}/T{t}/slab",
                 info)]


def label_centroids(label, ids) -> dict[int, np.ndarray]:
    """World (LPS) centroid of every id present in a label Volume."""
    out = {}
    for i in ids:
        kji = np.argwhere(label.array == i)
        if len(kji):
            out[int(i)] = label.index_to_world(kji[:, ::-1].mean(0))
    return out


def cross_ct_pairs(data: Path, volumes: dict[str, Any]) -> tuple[list[Pair], dict]:
    from anatomical_embedding.io import read_image

    ts = data / "totalsegmentator-examples"
    needed = [ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz", ts / "example_seg_dicom.nii.gz",
              data / "ct-abdomen-pelvis-example" / "upper-abdomen-dicom"]
    if not all(p.exists() for p in needed):
        return [], {"available": False, "reason": "TotalSegmentator example files missing"}
    sm = to_benchmark_grid(read_image(ts / "example_ct_sm.nii.gz"))
    dicom = volumes.get("upper_abdomen_dicom") or to_benchmark_grid(read_image(needed[3]))
    c_sm = label_centroids(read_image(ts / "example_seg.nii.gz"), CROSS_CT_LABELS)
    c_di = label_centroids(read_image(ts / "example_seg_dicom.nii.gz"), CROSS_CT_LABELS)
    ids = [i for i in CROSS_CT_LABELS if i in c_sm and i in c_di]
    names = [CROSS_CT_LABELS[i] for i in ids]
    a, b = np.array([c_sm[i] for i in ids]), np.array([c_di[i] for i in ids])
    pairs = [Pair("cross CT", "example_ct_sm -> upper_abdomen_dicom", sm, dicom, a, b, names, "example_ct_sm",
                  "upper_abdomen_dicom"),
             Pair("cross CT", "upper_abdomen_dicom -> example_ct_sm", dicom, sm, b, a, names, "upper_abdomen_dicom",
                  "example_ct_sm")]
    return pairs, {"available": True, "labels": {str(i): CROSS_CT_LABELS[i] for i in ids}}


def brain_mask_points(mask) -> dict[str, np.ndarray]:
    """Centroid and the five poles (mean of the mask voxels within 3 mm of the extreme) of a brain mask, LPS."""
    kji = np.argwhere(mask.array > 0)
    world = mask.index_to_world(kji[:, ::-1].astype(float))
    out = {"brain_centroid": world.mean(0)}
    # LPS: +x left, +y posterior, +z superior.
    for name, d in (("anterior_pole", (0, -1, 0)), ("posterior_pole", (0, 1, 0)), ("left_pole", (1, 0, 0)),
                    ("right_pole", (-1, 0, 0)), ("superior_pole", (0, 0, 1))):
        proj = world @ np.asarray(d, float)
        out[name] = world[proj >= proj.max() - 3.0].mean(0)
    return out


def cross_mr_pairs(data: Path, volumes: dict[str, Any]) -> tuple[list[Pair], dict]:
    from anatomical_embedding.io import read_image

    folders = sorted((data / "brats-examples").glob("*/brats_*"), key=lambda p: p.name)
    folders = [f for f in folders
               if (f / "brainmask.nii.gz").is_file() and (f / "T1c_subtrMeanDivStd.nii.gz").is_file()]
    if len(folders) < 2:
        return [], {"available": False, "reason": "fewer than two BraTS cases with a brain mask"}
    pts, vols, keys = [], [], []
    for f in folders:
        key = f"brats_{f.name.split('_')[2]}_t1c"
        vols.append(volumes.get(key) or to_benchmark_grid(read_image(f / "T1c_subtrMeanDivStd.nii.gz")))
        pts.append(brain_mask_points(read_image(f / "brainmask.nii.gz")))
        keys.append(key)
    names = list(pts[0])
    pairs = []
    for i in range(len(folders)):
        j = (i + 1) % len(folders)
        if len(folders) == 2 and i == 1:
            break
        pairs.append(Pair("cross MR", f"{keys[i]} -> {keys[j]}", vols[i], vols[j],
                          np.array([pts[i][n] for n in names]), np.array([pts[j][n] for n in names]), names,
                          keys[i], keys[j]))
    return pairs, {"available": True, "points": names}


# ---- methods ---------------------------------------------------------------------------------------------
class Method:
    """A transfer method: ``run(pair) -> (predicted target points, seconds for the pair, seconds for the points)``."""

    name = ""

    def run(self, pair: Pair) -> tuple[np.ndarray, float, float]:  # pragma: no cover - interface
        raise NotImplementedError


class Identity(Method):
    name = "identical coordinates"

    def run(self, pair):
        from anatomical_embedding.evaluation.landmarks import identical_coordinate

        t0 = time.perf_counter()
        pred = identical_coordinate(pair.source, pair.target, pair.points)
        s = time.perf_counter() - t0
        return pred, s, s


class Registration(Method):
    def __init__(self, kind: str, config: dict) -> None:
        from anatomical_embedding.evaluation.registration import RegistrationConfig

        self.kind, self.cfg = kind, RegistrationConfig(**config)
        self.name = f"registration {kind}"

    def run(self, pair):
        from anatomical_embedding.evaluation.registration import register_affine, register_affine_bspline

        register = {"affine": register_affine, "affine+bspline": register_affine_bspline}[self.kind]
        t0 = time.perf_counter()
        result = register(pair.source, pair.target, self.cfg)  # fixed = source: maps source points to the target
        t1 = time.perf_counter()
        pred = result.map_points(pair.points)
        t2 = time.perf_counter()
        return pred, t2 - t0, t2 - t1


class ModelMethod(Method):
    """One model: ``raw`` matching, the ``coarse`` prior with its fine search (``PriorConfig(refine=None)``), or the
    robust prior as the product uses it, ``refined`` densely in embedding space (the default ``PriorConfig``).

    The coarse maps are computed once per image and every pair is charged the coarse embedding time of both its
    images (as for a new scan). Fine tiles are cleared before the raw variant, which computes them cold; the prior
    variant (run next) reuses them and is charged its own matching time plus the raw variant's fine-tile time (a
    cold-equivalent time that avoids computing every tile twice on a shared CPU). The refined variant clears the
    tiles again and is charged everything it computes, and the dense fine maps of both images even when kept from
    an earlier pair.
    """

    VARIANTS = {"raw": "raw", "coarse": "coarse prior", "refined": "robust prior"}

    def __init__(self, label: str, model, variant: str, shared: dict, embed_config=None,
                 modality: str | None = None) -> None:
        self.model, self.variant, self.shared, self.embed_config = model, variant, shared, embed_config
        self.name = f"{label} {self.VARIANTS[variant]}"
        #: "CT" or "MR": the model runs on pairs of that modality only; None: on every pair.
        self.modality = modality

    def _embedding(self, key: str, volume):
        from anatomical_embedding.inference.embedding import embed_volume

        if key not in self.shared:
            t0 = time.perf_counter()
            emb = embed_volume(self.model, volume, config=self.embed_config)
            seconds = time.perf_counter() - t0
            timer = {"s": 0.0}
            compute = emb._compute_tiles

            def timed(tiles, _compute=compute, _timer=timer):  # fine-tile time, for the cold-equivalent charge
                t = time.perf_counter()
                try:
                    return _compute(tiles)
                finally:
                    _timer["s"] += time.perf_counter() - t
            emb._compute_tiles = timed
            self.shared[key] = (emb, seconds, timer)
        return self.shared[key]

    def run(self, pair):
        from anatomical_embedding.inference.matching import Matcher
        from anatomical_embedding.inference.prior import PriorConfig

        src, s_src, tim_src = self._embedding(pair.source_key, pair.source)
        tgt, s_tgt, tim_tgt = self._embedding(pair.target_key, pair.target)
        if self.variant != "coarse":
            src.clear_fine_tiles()
            tgt.clear_fine_tiles()
            tim_src["s"] = tim_tgt["s"] = 0.0
        prior = {"raw": None, "coarse": PriorConfig(refine=None), "refined": PriorConfig()}[self.variant]
        # A dense fine map kept from an earlier pair of the same image is charged again, like its coarse map (with
        # EmbedConfig.dense_fine it is part of the embedding, already charged).
        reused = sum(e.timings.get("dense_fine_s", 0.0) for e in (src, tgt) if not e.config.dense_fine)
        t0 = time.perf_counter()
        matcher = Matcher(src, tgt, prior_config=prior)
        matches = matcher.match(pair.points, use_prior=prior is not None, with_raw=False)
        pts_s = time.perf_counter() - t0
        refined = getattr(matcher.prior, "refined", None) if prior is not None else None
        self.starts = None if refined is None else int(refined.starts)
        if self.variant == "raw":
            self.shared[("tiles", pair.name)] = tim_src["s"] + tim_tgt["s"]
        elif self.variant == "coarse":
            pts_s += self.shared.pop(("tiles", pair.name), 0.0)
        else:
            pts_s += reused
        return np.array([m.final.point_lps for m in matches]), s_src + s_tgt + pts_s, pts_s


# ---- quick AEFM ------------------------------------------------------------------------------------------
def train_quick_aefm(cases: list[Case], seconds: float, work: Path, threads: int, spacing: float = 4.0
                     ) -> tuple[Path, dict]:
    """The tests' small AEFM (32^3 patches) at ``spacing`` mm, preset mri_percentile, on the original volumes,
    stopped after ``seconds`` (``train.max_seconds``: finish the step, checkpoint, stop)."""
    sys.path.insert(0, str(ROOT / "Testing"))
    from anatomical_embedding.io import write_image
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer
    from fixtures_data import TINY_AEFM_OVERRIDES

    from anatomical_embedding.io import pad

    images = work / "volumes_2mm"
    images.mkdir(parents=True, exist_ok=True)
    entries = []
    # The engine refuses training images smaller than a patch (check_volumes) although its preprocessing could pad
    # them: thin slabs (the 40 mm DICOM series, the 60 mm MR) are padded here with their minimum (air/background).
    need = int(np.ceil(1.05 * 32 * spacing / SPACING))
    for c in cases:
        p = images / f"{c.name}.nii.gz"
        if not p.is_file():
            short = np.maximum(0, need - np.asarray(c.volume.shape_ijk))
            vol = c.volume
            if short.any():
                vol = pad(vol, short // 2, short - short // 2, float(vol.array.min()))
            write_image(vol, p, overwrite=True)
        entries.append({"id": c.name, "image": str(p)})
    manifest = work / "quick_aefm_train.json"
    manifest.write_text(json.dumps({"cases": entries}), encoding="utf-8")
    steps = max(30, int(seconds / 0.5))  # about 0.3-0.6 s per step on two cores; train.max_seconds stops it anyway
    overrides = [*TINY_AEFM_OVERRIDES, "method.widths=[8,16,32,64]", f"method.spacing=[{spacing},{spacing},{spacing}]",
                 'method.preset="mri_percentile"',
                 f"train.max_steps={steps}", f"train.ckpt_every={steps}", f"train.max_seconds={seconds}",
                 "train.progress_bar=true",
                 f"train.threads={threads}"]
    run = work / "quick_aefm"
    t0 = time.perf_counter()
    if (run / "checkpoints" / "last.pt").is_file():  # a rerun with the same --work reuses the trained model
        events = [json.loads(x) for x in (run / "progress.jsonl").read_text(encoding="utf-8").splitlines()
                  if x.startswith("{")]
        times = [e["time"] for e in events if "time" in e]
        step = max((e.get("step") or 0 for e in events), default=None)
        log.info("reusing the quick AEFM of %s (step %s)", run, step)
        return run, {"train_s": round(max(times) - min(times), 1) if times else None, "spacing_mm": spacing,
                     "planned_steps": steps, "steps": step, "exit_code": None, "reused": True,
                     "cases": [c.name for c in cases], "overrides": overrides}
    rc = Trainer(load_run_config("aefm", None, overrides), manifest, run).run()
    train_s = time.perf_counter() - t0
    step = None
    progress = run / "progress.jsonl"
    if progress.is_file():
        for line in progress.read_text(encoding="utf-8").splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = ev.get("step", step)
    if not any(run.glob("**/last.pt")):
        raise RuntimeError(f"quick AEFM training wrote no checkpoint (exit code {rc})")
    return run, {"train_s": round(train_s, 1), "spacing_mm": spacing, "planned_steps": steps, "steps": step,
                 "exit_code": rc,
                 "cases": [c.name for c in cases], "overrides": overrides}


# ---- summary and report ------------------------------------------------------------------------------------
def summarise(records: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for group in GROUPS:
        for m in methods:
            rs = [r for r in records if r["group"] == group and r["method"] == m]
            if not rs:
                continue
            err = np.concatenate([r["errors_mm"] for r in rs]) if rs else np.zeros(0)
            n = int(err.size)
            rows.append({
                "group": group, "method": m, "pairs": len(rs), "points": n,
                "mean_mm": float(err.mean()) if n else None, "median_mm": float(np.median(err)) if n else None,
                "p90_mm": float(np.percentile(err, 90)) if n else None,
                "seconds_per_pair": float(np.mean([r["seconds"] for r in rs])),
                "ms_per_point": 1000 * float(np.sum([r["points_seconds"] for r in rs]) / max(n, 1)),
            })
    return rows


def _f(v, fmt=".1f") -> str:
    return "-" if v is None else format(v, fmt)


def plot_cdf(records: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in GROUPS if any(r["group"] == g for r in records)] or ["intra CT"]
    cols = len(groups) if len(groups) < 4 else (2 if len(groups) == 4 else 3)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 4.0 * rows), dpi=110, squeeze=False)
    for ax, g in zip(axes.ravel(), groups):
        for m in methods:
            rs = [r for r in records if r["group"] == g and r["method"] == m]
            if not rs:
                continue
            err = np.sort(np.concatenate([r["errors_mm"] for r in rs]))
            if err.size:
                ax.plot(err, np.arange(1, err.size + 1) / err.size, label=f"{m} ({np.median(err):.1f})")
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_xlabel("error (mm)")
        ax.set_title(g)
        ax.legend(fontsize=6, loc="lower right", title="median mm", title_fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of points")
    fig.suptitle("Landmark transfer on real volumes: error CDF")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def restart_lines(records: list[dict]) -> list[str]:
    """Which refined pairs were doubtful enough to restart the refinement's affine stages
    (``RefineConfig.restarts``)."""
    refined = [r for r in records if r.get("refinement_starts")]
    if not refined:
        return []
    restarted = [f"{r['pair']} ({r['method']})" for r in refined if r["refinement_starts"] > 1]
    return [f"Refinement restarts (`RefineConfig.restarts`, tried when the first start is implausible or below "
            f"`restart_below` similarity): {len(restarted)} of {len(refined)} refined pairs"
            + (f": {', '.join(restarted)}." if restarted else ".")]


def write_report(result: dict, out: Path) -> None:
    rows, m = result["summary"], result["machine"]
    lines = ["# Landmark transfer on real CT and MR volumes", "", machine_line(m), "",
             f"Command: `{result['command']}`" + (" (smoke run: a check that it runs, not a measurement)"
                                                  if result["smoke"] else ""), "",
             f"Wall time {result['wall_s']:.0f} s, peak resident memory {result['peak_rss_mb']:.0f} MB.", "",
             "## Results", "",
             *md_table(["pair type", "method", "pairs", "points", "mean (mm)", "median (mm)", "p90 (mm)",
                        "s per pair", "ms per point"],
                       [[r["group"], r["method"], r["pairs"], r["points"], _f(r["mean_mm"]), _f(r["median_mm"]),
                         _f(r["p90_mm"]), _f(r["seconds_per_pair"], ".2f"), _f(r["ms_per_point"], ".3g")]
                        for r in rows]), "",
             "Error CDF per pair type: [real_cdf.png](real_cdf.png). s per pair: everything for the pair "
             "(registration; "
             "for a model the embedding of both images plus matching). ms per point: the point-dependent part "
             "(matching, including the robust prior's fit; mapping through the registration's transform).", "",
             *restart_lines(result["records"]), ""]
    lines += ["## Pair types", "",
              (f"**Intra-subject** ({result['config']['transforms']} known transforms per volume, up to "
               f"{result['config']['points']} structure points each; volumes at {SPACING:g} mm): rotation up to 10 "
               "degrees about a random axis through the centre, translation up to 20 mm, isotropic scale within 5 %, "
               "cubic B-spline displacement (4x4x4 mesh, coefficients N(0, 2 mm)), then gain 0.85-1.15, offset within "
               "5 % and Gaussian noise of 2 % of the 0.5-99.5 percentile range. The moved image is "
               "`moved(q) = source(T(q))`; points are picked in the moved image (local maxima of the local standard "
               "deviation, sigma 4 mm, inside the eroded body mask, >= 20 mm apart, the point and its truth >= 10 mm "
               "inside both fields of view) and transferred to the original volume, where the truth `T(q)` is exact."),
              "",
              *md_table(["volume", "modality", "path", "size at 2 mm (i,j,k)", "points per transform",
                         "true displacement mean / max (mm)"],
                        [[v["name"], v["modality"], v["path"].replace(str(result["data"]), "DATA"),
                          "x".join(map(str, v["shape_ijk"])), ", ".join(map(str, v["points"])),
                          ", ".join(f"{d['mean']}/{d['max']}" for d in v["displacement"])]
                         for v in result["volumes"]]), ""]
    cc, cm = result["cross_ct"], result["cross_mr"]
    if cc.get("available"):
        ct_text = ("centroids of the TotalSegmentator labels " + ", ".join(f"{k} {v}" for k, v in cc["labels"].items())
                   + " between example_ct_sm (example_seg) and the upper-abdomen DICOM series (example_seg_dicom), "
                   "both directions. They are the labels the data README names as least affected by the slab edges "
                   "(each lies wholly inside example_ct_sm and is cut only at the lower edge of the 40 mm DICOM "
                   "slab); every other shared label touches the top or bottom slice of a slab, so its centroid "
                   "follows the field of view. The labels are model output and the two scans are very likely "
                   "different patients in different world frames (z 94..427 mm against -805..-767 mm, hence the huge "
                   "identical-coordinate error): a smoke test, not ground truth.")
    else:
        ct_text = f"not run ({cc.get('reason')})."
    mr_text = ("the available labels allow only a weak variant. voxelmorph's FreeSurfer aseg has one subject; "
               "pyradiomics' and BraTS' tumour masks mark different lesions in each patient (no anatomical "
               "correspondence, so tumour centroids are not used); the BraTS brain masks are the only anatomy "
               "shared by several subjects. ")
    if cm.get("available"):
        n_mr = len([p for p in result["pairs"] if p["group"] == "cross MR"])
        mr_text += ("So the cross-MR pairs use the brain-mask centroid and its five poles (anterior, posterior, left, "
                    "right, superior: the mean of the mask voxels within 3 mm of the extreme) between consecutive "
                    f"BraTS cases in a cycle ({n_mr} pairs). The masks are thresholded (not manual) and the BraTS "
                    "volumes are all co-registered to one atlas (SRI24) on one 1 mm grid, so identical coordinates "
                    "start from a shared frame; this checks gross brain-scale correspondence only.")
    else:
        mr_text += f"Not run ({cm.get('reason')})."
    slabs = [p for p in result["pairs"] if p["group"].startswith("slab")]
    if slabs:
        lines += [(f"**Partial field of view** (slab CT, slab MR; {len(slabs)} pairs): the intra pairs' moved images "
                   "(same seeds, up to 200 candidate points) against a "
                   f"{result['config'].get('slab_mm', SLAB_MM):g} mm slab of the original along its slice axis "
                   "(below, at and above the centre for the three transforms); the points whose truth lies >= 5 mm "
                   "inside the slab. Volumes shorter than two slabs are left out. Points per pair: "
                   + ", ".join(f"{p['name'].replace(' slab', '')} {p['n_points']}" for p in slabs) + "."), ""]
    lines += ["**Cross-subject CT**: " + ct_text, "", "**Cross-subject MR**: " + mr_text]
    qa = result.get("quick_aefm")
    lines += ["", "## Models", ""]
    if result["models"]:
        for mdl in result["models"]:
            lines.append(f"* `{mdl['label']}`: {mdl['method']} at {mdl['spacing']} mm, preset {mdl['preset']}, "
                         f"backend {mdl['backend']} ({mdl['path']}).")
    else:
        lines.append("No model given: baselines only.")
    if qa:
        where = "by an earlier invocation with the same --work (reused here) " if qa.get("reused") else "here "
        lines += ["", (f"`quick-aefm` was trained {where}for {qa['train_s']:.0f} s ({qa['steps']} steps of "
                       f"{qa['planned_steps']} planned) with the tests' small AEFM recipe (widths narrowed to 8-64) at "
                       f"{qa.get('spacing_mm', 4.0):g} mm (32^3 patches), intensity preset "
                       "mri_percentile, on the benchmark's original 2 mm volumes: self-supervised (no points, no "
                       "labels) but transductive (it has seen the target images of the intra pairs and both cross "
                       "CT images), so it checks that the pipeline works on real data; it is not a generalisation "
                       "result.")]
    if result["models"]:
        dense = result["config"].get("dense_fine", False)
        one_pass = result["config"].get("coarse_from_dense", False)
        fitted = result["config"].get("max_window_voxels", 0)
        lines += ["", (f"Embedding: `EmbedConfig(fine_tile={result['config'].get('fine_tile', 32)}, min_size=8, "
                       f"dense_fine={dense}, coarse_from_dense={one_pass}"
                       + (f", max_window_voxels={fitted}" if fitted else "")
                       + ")` (min_size 8 so that the 40 mm DICOM "
                       "slab and the 60 mm abdominal MR, 10 and 15 voxels thick at 4 mm, are accepted and padded). "
                       + (("Each image's embedding is its coarse map and its dense fine map, "
                           + (("both from one sliding-window pass of "
                               + (f"windows fitted to the image (at least 64 voxels a side, at most {fitted} voxels)"
                                  if fitted else "64^3 windows")
                               + " (the coarse map is the dense pass's coarse output)") if one_pass
                              else "one sliding-window pass each")
                           + ", as the viewer and `match` embed; both are charged to every pair that uses the "
                           "image, and no variant computes fine tiles. ") if dense else
                          "Fine tiles are computed on demand (32 voxels, fewer forward passes than the engine's 16 "
                          "when every point needs its own tiles); the raw variant computes them cold, and the "
                          "coarse-prior variant reuses them but is charged the raw variant's fine-tile time on top "
                          "of its own matching and prior fit (cold-equivalent); the robust prior computes the dense "
                          "fine maps it needs, charged to every pair like the coarse maps. ")
                       + "The coarse maps of both images are charged to every pair. The robust prior (the product's "
                         "default) refines the coarse prior densely in embedding space; its prediction is the "
                         "match.")]
    lines += ["", (f"Registration baselines (SimpleITK, `evaluation.registration`, fixed = source): "
                   f"{result['config']['registration']}.")]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(result["skipped"])]
    lines += ["", "## Machine", "", *machine_table(m)]
    write_results(out, "real", result, lines)


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the real sample volumes (default ../shared/data)")
    ap.add_argument("--model", action="append", default=[], help="a .aemodel package or training run folder "
                                                                 "(repeatable); it runs on the pairs of its card's "
                                                                 "modality unless --all-modalities")
    ap.add_argument("--all-modalities", action="store_true", help="run every --model on CT and MR pairs alike")
    ap.add_argument("--train-quick-aefm", type=float, metavar="SECONDS", default=0.0,
                    help="train a small AEFM on the benchmark's volumes for at most SECONDS and add it as a model")
    ap.add_argument("--quick-aefm-spacing", type=float, default=4.0,
                    help="spacing of the quick AEFM in mm (default 4: a 32^3 patch covers 128 mm)")
    ap.add_argument("--fine-tile", type=int, default=32,
                    help="fine-tile size in voxels of the model spacing (EmbedConfig.fine_tile; default 32: fewer, "
                         "larger forward passes than the engine's 16 when every point needs its own tiles)")
    ap.add_argument("--no-dense-fine", action="store_true",
                    help="fine vectors from canonical tiles on demand (EmbedConfig.dense_fine off); by default, as in "
                         "the viewer and `match`, each image's dense fine map is part of its embedding")
    ap.add_argument("--no-coarse-from-dense", action="store_true",
                    help="coarse maps from their own pass at the model's patch size (EmbedConfig.coarse_from_dense "
                         "off); by default, as in the viewer and `match`, the dense pass's coarse outputs are the "
                         "coarse map")
    ap.add_argument("--max-window-voxels", type=int, default=0,
                    help="EmbedConfig.max_window_voxels: windows fitted to each image, up to this many voxels "
                         "(default 0: cubes of the model's window, as the viewer and `match` embed)")
    ap.add_argument("--transforms", type=int, default=3, help="known transforms per volume (default 3)")
    ap.add_argument("--points", type=int, default=40, help="structure points per volume and transform (default 40)")
    ap.add_argument("--only", nargs="+", help="only these volumes (names as in real.md; cross pairs need theirs)")
    ap.add_argument("--no-cross", action="store_true", help="no cross-subject pairs")
    ap.add_argument("--slab-mm", type=float, default=SLAB_MM,
                    help=f"thickness of the partial-field-of-view targets (default {SLAB_MM:g}; 0: no slab pairs)")
    ap.add_argument("--no-bspline", action="store_true", help="skip the affine + B-spline baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--work", type=Path, help="folder for the quick AEFM and its volumes (default: temporary)")
    ap.add_argument("--smoke", action="store_true", help="two volumes, one transform, 10 points: checks it runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--report-only", action="store_true", help="rewrite real.md and real_cdf.png from OUT/real.json")
    args = ap.parse_args(argv)
    if args.report_only:
        result = json.loads((args.out / "real.json").read_text(encoding="utf-8"))
        records = [{**r, "errors_mm": np.asarray(r["errors_mm"], dtype=float)} for r in result["records"]]
        write_report(result, args.out)
        plot_cdf(records, result["methods"], args.out / "real_cdf.png")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("anatomical_embedding",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    data = args.data.resolve()
    if not (data.is_dir() and any(data.iterdir())):
        print(f"error: real data folder {data} not found (pass --data DIR, the folder of shared/data/README.md)",
              file=sys.stderr)
        return 2
    if args.smoke:
        args.transforms, args.points = 1, 10
        args.only = args.only or ["headsq", "pyradiomics_brain1"]
        args.no_cross = True
        args.slab_mm = 0.0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import tempfile

    import SimpleITK as sitk
    import torch
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import EmbedConfig

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench_real_") if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)

    # Volumes at 2 mm and their intra-subject pairs.
    cases, skipped = [], []
    for name, modality, loader, path in case_list(data):
        if args.only and name not in args.only:
            continue
        try:
            cases.append(Case(name, modality, path, to_benchmark_grid(loader())))
        except Exception as exc:  # noqa: BLE001 - one unreadable volume must not stop the benchmark
            log.warning("cannot read %s: %s", name, exc)
            skipped.append(f"{name}: {exc}")
    if not cases:
        print(f"error: no readable volume in {data}", file=sys.stderr)
        return 2
    log.info("%d volumes at %g mm: %s", len(cases), SPACING, ", ".join(c.name for c in cases))
    pairs: list[Pair] = []
    with logging_redirect_tqdm():
        for c in tqdm(cases, desc="transforms and points", unit="volume", dynamic_ncols=True):
            pairs += intra_pairs(c, args.transforms, args.points, args.seed, args.slab_mm)
    volumes = {c.name: c.volume for c in cases}
    cross_ct, cross_mr = {"available": False, "reason": "--no-cross"}, {"available": False, "reason": "--no-cross"}
    if not args.no_cross:
        new, cross_ct = cross_ct_pairs(data, volumes)
        pairs += new
        new, cross_mr = cross_mr_pairs(data, volumes)
        pairs += new
    pairs = [p for p in pairs if len(p.points)]

    # Methods.
    methods: list[Method] = [Identity(), Registration("affine", REG_CONFIG)]
    if not args.no_bspline:
        methods.append(Registration("affine+bspline", REG_CONFIG))
    model_paths = [(Path(p).stem if Path(p).suffix == ".aemodel" else Path(p).name, Path(p)) for p in args.model]
    quick = None
    if args.train_quick_aefm > 0:
        log.info("training the quick AEFM for at most %.0f s on %d volumes", args.train_quick_aefm, len(cases))
        run, quick = train_quick_aefm(cases, args.train_quick_aefm, work, args.threads, args.quick_aefm_spacing)
        log.info("quick AEFM: %s steps in %.0f s", quick["steps"], quick["train_s"])
        model_paths.append(("quick-aefm", run))
    models = []
    one_pass = not (args.no_dense_fine or args.no_coarse_from_dense)  # EmbedConfig.coarse_from_dense
    for label, path in model_paths:
        model = open_model(path, device=args.device, threads=args.threads)
        shared: dict = {}
        # min_size 8 (engine default 16): the 40 mm DICOM slab and the 60 mm abdominal MR are 10 and 15 voxels thick
        # at 4 mm; prepare_volume pads them to the size multiple.
        cfg = EmbedConfig(fine_tile=args.fine_tile, min_size=8, dense_fine=not args.no_dense_fine,
                          coarse_from_dense=one_pass, max_window_voxels=args.max_window_voxels)
        only = None if (args.all_modalities or label == "quick-aefm") else model.card.get("modality")
        methods += [ModelMethod(label, model, v, shared, cfg, only) for v in ModelMethod.VARIANTS]
        models.append({"label": label, "path": str(path), "method": model.card.get("method"),
                       "spacing": model.card.get("spacing"), "backend": model.backend,
                       "preset": (model.card.get("intensity_preset") or {}).get("name"),
                       "hash": model.model_hash[:12]})

    # Run every method on every pair.
    records = []
    with logging_redirect_tqdm():
        bar = tqdm(pairs, desc="pairs", unit="pair", dynamic_ncols=True)
        for pair in bar:
            bar.set_postfix_str(pair.name)
            line = []
            for method in methods:
                if getattr(method, "modality", None) and not pair.group.endswith(method.modality):
                    continue
                try:
                    pred, seconds, pts_s = method.run(pair)
                    err = np.linalg.norm(np.asarray(pred) - pair.truth, axis=1)
                except Exception as exc:  # noqa: BLE001 - record the failure, keep the other methods
                    log.warning("%s failed on %s: %s", method.name, pair.name, exc)
                    skipped.append(f"{method.name} on {pair.name}: {exc}")
                    continue
                records.append({"group": pair.group, "pair": pair.name, "method": method.name,
                                "errors_mm": err, "seconds": seconds, "points_seconds": pts_s,
                                "predicted_lps": np.asarray(pred, dtype=float),  # for parity between models
                                "refinement_starts": getattr(method, "starts", None)})
                line.append(f"{method.name} {np.mean(err):.1f}")
            log.info("%s (%d points): %s", pair.name, len(pair.points), "; ".join(line))
            for m in methods:  # the moved image's (and the slab's) embedding is used by this pair only
                if isinstance(m, ModelMethod) and pair.group.startswith(("intra", "slab")):
                    m.shared.pop(pair.source_key, None)
                    if pair.group.startswith("slab"):
                        m.shared.pop(pair.target_key, None)

    names = [m.name for m in methods]
    machine = machine_description(args.threads)
    command = "python benchmarks/bench_real.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "machine": machine, "meta": {"date": machine["date"]}, "command": command.strip(), "smoke": args.smoke,
        "data": str(data), "wall_s": time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb(),
        "config": {"spacing_mm": SPACING, "transforms": args.transforms, "points": args.points, "seed": args.seed,
                   "min_distance_mm": 20.0, "fov_margin_mm": 10.0, "body_erosion_mm": 6.0,
                   "contrast_sigma_mm": 4.0, "registration": REG_CONFIG, "fine_tile": args.fine_tile,
                   "embed_min_size": 8, "slab_mm": args.slab_mm, "dense_fine": not args.no_dense_fine,
                   "coarse_from_dense": one_pass, "max_window_voxels": args.max_window_voxels},
        "methods": names, "models": models, "quick_aefm": quick,
        "summary": summarise(records, names),
        "volumes": [{"name": c.name, "modality": c.modality, "path": c.path, "shape_ijk": list(c.volume.shape_ijk),
                     "points": [p.info["n_points"] for p in pairs
                                if p.target_key == c.name and p.group.startswith("intra")],
                     "displacement": [p.info["true_displacement_mm"] for p in pairs
                                      if p.target_key == c.name and p.group.startswith("intra")]} for c in cases],
        "cross_ct": cross_ct, "cross_mr": cross_mr,
        "pairs": [{"group": p.group, "name": p.name, "n_points": len(p.points), "names": p.names, **p.info,
                   "points_lps": np.round(p.points, 3).tolist(), "truth_lps": np.round(p.truth, 3).tolist()}
                  for p in pairs],
        "records": [{**r, "errors_mm": np.round(r["errors_mm"], 3).tolist(),
                     "predicted_lps": np.round(r["predicted_lps"], 2).tolist()} for r in records],
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_report(result, args.out)
    plot_cdf(records, names, args.out / "real_cdf.png")
    log.info("wrote %s, %s and %s", args.out / "real.json", args.out / "real.md", args.out / "real_cdf.png")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
