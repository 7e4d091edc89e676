"""Landmark-transfer evaluation: run any transfer method over subject pairs and summarise the errors.

A *transfer* is a callable ``(source_image, target_image, source_points_lps) -> target_points_lps``.
This module times it, measures the distance to the target's true landmarks, and summarises per
method and per landmark (mean, median, 90th percentile), with an error CDF plot.
"""
from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from anatomical_embedding.io import Volume

log = logging.getLogger(__name__)

Transfer = Callable[[Volume, Volume, np.ndarray], np.ndarray]


@dataclass
class TransferRecord:
    method: str
    source: str
    target: str
    names: list[str]
    errors_mm: np.ndarray          # per landmark
    seconds: float                 # whole transfer for this target (embedding/registration included)
    extra: dict = field(default_factory=dict)


def identical_coordinate(source: Volume, target: Volume, points: np.ndarray) -> np.ndarray:
    """Baseline (a): the same world coordinate in the target."""
    return np.asarray(points, dtype=np.float64).copy()


def registration_transfer(kind: str, **config) -> Transfer:
    """Baselines (b) affine and (c) affine + B-spline registration (SimpleITK)."""
    from anatomical_embedding.evaluation.registration import RegistrationConfig, register_affine, register_affine_bspline

    register = {"affine": register_affine, "affine+bspline": register_affine_bspline}[kind]
    cfg = RegistrationConfig(**config)

    def transfer(source: Volume, target: Volume, points: np.ndarray) -> np.ndarray:
        return register(source, target, cfg).map_points(points)

    return transfer


def evaluate_transfer(method: str, transfer: Transfer, source_image: Volume, source_points: Mapping[str, np.ndarray],
                      targets: Sequence[tuple[str, Volume, Mapping[str, np.ndarray]]], source_id: str = "source"
                      ) -> list[TransferRecord]:
    """Transfer the source landmarks to every target and measure the error against the target's truth."""
    names = [n for n in source_points if all(n in t[2] for t in targets)]
    if not names:
        raise ValueError("source and targets share no landmark names")
    pts = np.array([source_points[n] for n in names])
    records = []
    for target_id, target_image, truth in targets:
        t0 = time.perf_counter()
        pred = np.asarray(transfer(source_image, target_image, pts))
        seconds = time.perf_counter() - t0
        err = np.linalg.norm(pred - np.array([truth[n] for n in names]), axis=1)
        records.append(TransferRecord(method, source_id, target_id, names, err, seconds))
        log.info("%s %s -> %s: mean %.1f mm, %.1f s", method, source_id, target_id, err.mean(), seconds)
    return records


def summarise(records: Sequence[TransferRecord]) -> dict[str, dict]:
    """Per method: mean/median/p90 error, per-landmark mean, seconds per scan and per landmark."""
    out: dict[str, dict] = {}
    for method in dict.fromkeys(r.method for r in records):
        rs = [r for r in records if r.method == method]
        err = np.concatenate([r.errors_mm for r in rs])
        per_landmark: dict[str, list[float]] = {}
        for r in rs:
            for n, e in zip(r.names, r.errors_mm):
                per_landmark.setdefault(n, []).append(float(e))
        seconds = [r.seconds for r in rs]
        n_points = sum(len(r.names) for r in rs)
        out[method] = {
            "mean_mm": float(err.mean()), "median_mm": float(np.median(err)), "p90_mm": float(np.percentile(err, 90)),
            "n": int(err.size), "seconds_per_scan": float(np.mean(seconds)),
            "seconds_per_landmark": float(np.sum(seconds) / max(1, n_points)),
            "per_landmark_mean_mm": {n: float(np.mean(v)) for n, v in per_landmark.items()},
        }
    return out


def write_records_csv(records: Sequence[TransferRecord], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["method", "source", "target", "landmark", "error_mm", "seconds_for_scan"])
        for r in records:
            for n, e in zip(r.names, r.errors_mm):
                w.writerow([r.method, r.source, r.target, n, f"{e:.3f}", f"{r.seconds:.3f}"])
    return path


def plot_error_cdf(records: Sequence[TransferRecord], path: str | Path, title: str = "Landmark transfer error") -> Path:
    from anatomical_embedding.evaluation.figures import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method in dict.fromkeys(r.method for r in records):
        err = np.sort(np.concatenate([r.errors_mm for r in records if r.method == method]))
        ax.plot(err, np.arange(1, err.size + 1) / err.size, label=f"{method} (mean {err.mean():.1f} mm)")
    ax.set_xlabel("error (mm)")
    ax.set_ylabel("fraction of landmarks")
    ax.set_xlim(left=0)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return save_figure(fig, path)
