"""The demo's real CT pair: one real scan under a known deformation, transferred with the shipped default CT
model next to identical coordinates and an affine registration (issue 18: the phantoms are not the only evidence).

The scan is TotalSegmentator's Apache-2.0 example CT: the whole volume from ``../shared/data`` beside the
repository when it is there, otherwise the crop shipped for the tests (``Testing/data/real_ct``). The pair and
its points come from :mod:`~anatomical_embedding.evaluation.known_pairs`, exactly as the real-data benchmark
builds its intra-subject pairs, so the demo's row is one of the benchmark's pairs.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from anatomical_embedding.evaluation.landmarks import (TransferRecord, evaluate_transfer, identical_coordinate,
                                                       registration_transfer)

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[3]
#: Candidates, best first: the whole example CT, then the shipped crop of it.
REAL_CT_CANDIDATES = (
    _REPO.parent / "shared" / "data" / "ct-abdomen-pelvis-example" / "example_ct.nii.gz",
    _REPO / "Testing" / "data" / "real_ct" / "example_ct_crop.nii.gz",
)
#: The benchmark's grid and registration budget (``benchmarks/bench_real.py``).
SPACING_MM = 2.0
REGISTRATION = {"spacing": 4.0, "sampling_fraction": 0.02, "affine_iterations": 100,
                "shrink_factors": (2, 1), "smoothing_sigmas": (1.0, 0.0)}


def find_real_ct() -> Path | None:
    """The first real CT of :data:`REAL_CT_CANDIDATES` on this machine, or None (e.g. an installed wheel)."""
    return next((p for p in REAL_CT_CANDIDATES if p.is_file()), None)


def real_ct_transfer(path: Path, seed: int = 0, n_points: int = 40) -> tuple[list[TransferRecord], dict]:
    """Records (identical coordinates, affine registration, default CT model raw and with the robust prior) of
    the structure points of one known-deformation pair of ``path``, and a description of the pair."""
    from anatomical_embedding.evaluation.known_pairs import known_pair
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.defaults import default_model_path
    from anatomical_embedding.inference.embedding import EmbedConfig, embed_volume
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.io import read_image, resample_to_spacing

    volume = read_image(path)
    volume = volume.with_array(volume.array.astype(np.float32))
    if float(np.min(volume.spacing)) < SPACING_MM:  # the benchmark's 2 mm grid (the crop is 3 mm already)
        volume = resample_to_spacing(volume, SPACING_MM)
    pair = known_pair(volume, seed, n_points)
    if len(pair.points) < 5:
        raise ValueError(f"{path}: only {len(pair.points)} structure points inside both fields of view")
    names = [f"P{i + 1}" for i in range(len(pair.points))]
    points = dict(zip(names, pair.points))
    targets = [("original", volume, dict(zip(names, pair.truth)))]
    records = evaluate_transfer("identical coordinate", identical_coordinate, pair.moved, points, targets, "moved")
    records += evaluate_transfer("registration affine", registration_transfer("affine", **REGISTRATION), pair.moved,
                                 points, targets, "moved")
    model_path = default_model_path("CT")
    model = open_model(model_path, backend="onnxruntime")
    config = EmbedConfig.dense(min_size=8)  # as the viewer embeds; a 4 mm model on a crop: thin axes are padded
    t0 = time.perf_counter()
    src, dst = embed_volume(model, pair.moved, config=config), embed_volume(model, volume, config=config)
    embed_s = time.perf_counter() - t0
    log.info("default CT model: both scans embedded in %.1f s", embed_s)
    for variant in ("raw", "robust prior"):
        def transfer(source, target, pts, _variant=variant):
            src.clear_fine_tiles()  # tiles (over the dense map's budget) are computed afresh per variant
            dst.clear_fine_tiles()
            matcher = Matcher(src, dst)
            return np.array([m.final.point_lps for m in matcher.match(pts, use_prior=_variant != "raw",
                                                                          with_raw=False)])
        new = evaluate_transfer(f"default CT model {variant}", transfer, pair.moved, points, targets, "moved")
        for record in new:  # embedding both scans is charged to each variant
            record.seconds += embed_s
        records += new
    info = {"available": True, "path": str(path), "model": model_path.name, "seed": seed,
            "size_ijk": [int(v) for v in volume.shape_ijk], "spacing_mm": [float(v) for v in volume.spacing],
            **pair.info}
    return records, info


__all__ = ["REAL_CT_CANDIDATES", "find_real_ct", "real_ct_transfer"]
