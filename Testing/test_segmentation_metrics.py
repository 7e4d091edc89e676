"""Segmentation metrics (evaluation.segmentation) against hand-computed values, in 2D and 3D."""
import math

import numpy as np
import pytest

from anatomical_embedding.evaluation.segmentation import segmentation_metrics, summarise
from anatomical_embedding.io import Volume


def _square(n_grid: int, lo: int, hi: int, spacing=(1.0, 1.0, 1.0), flat_axis: int = 0) -> Volume:
    a = np.zeros((n_grid, n_grid), np.int16)
    a[lo:hi, lo:hi] = 1
    return Volume(np.expand_dims(a, flat_axis), np.asarray(spacing, float), np.zeros(3), np.eye(3))


@pytest.mark.parametrize("flat_axis", [0, 1, 2])
def test_2d_square_inside_square_hand_computed(flat_axis):
    # Reference: a 20x20 square; prediction: the 10x10 square at its centre, 1 mm pixels. Boundary rings
    # (pixels removed by erosion): 76 outer, 36 inner. Every inner ring pixel is exactly 5 mm from the outer
    # ring (pred -> ref: HD95 5 mm, the value); the outer ring's pixels near its corners are farther
    # from the inner ring (up to 5 * sqrt(2) at the corners): their 95th percentile is 6.570 mm (the
    # 76 distances by hand below), and HD95 is the larger of the two directions. No surface point lies within
    # 1 mm of the other surface: NSD 0. Dice = 2 * 100 / (100 + 400) = 0.4.
    # Before the 2D path, the (1, H, W) volume made every pixel a surface pixel: HD95 5.67 mm, NSD 0.48 (measured).
    ref = _square(40, 10, 30, flat_axis=flat_axis)
    pred = _square(40, 15, 25, flat_axis=flat_axis)
    (row,) = segmentation_metrics(pred, ref, {1: "organ"}, nsd_tolerance_mm=1.0)
    assert row["dice"] == pytest.approx(0.4)
    assert row["nsd"] == pytest.approx(0.0)
    outer = [(y, x) for y in range(10, 30) for x in range(10, 30) if y in (10, 29) or x in (10, 29)]
    inner = [(y, x) for y in range(15, 25) for x in range(15, 25) if y in (15, 24) or x in (15, 24)]
    assert len(outer) == 76 and len(inner) == 36
    to_inner = [min(math.dist(o, q) for q in inner) for o in outer]
    assert all(min(math.dist(q, o) for o in outer) == 5.0 for q in inner)  # pred -> ref: 5 mm everywhere
    assert row["hd95_mm"] == pytest.approx(float(np.percentile(to_inner, 95)), abs=1e-4)
    assert row["hd95_mm"] == pytest.approx(6.5701, abs=1e-4)


def test_2d_metrics_use_the_in_plane_spacing_in_mm():
    # 2 mm pixels in-plane (and a 7 mm "slice thickness" that must not matter): every distance doubles.
    ref = _square(40, 10, 30, spacing=(2.0, 2.0, 7.0))
    pred = _square(40, 15, 25, spacing=(2.0, 2.0, 7.0))
    (row,) = segmentation_metrics(pred, ref, {1: "organ"}, nsd_tolerance_mm=9.9)
    assert row["hd95_mm"] == pytest.approx(2 * 6.5701, abs=2e-4)
    assert row["nsd"] == pytest.approx(0.0)
    # At 10.1 mm the whole inner ring (36 px, 10 mm away) and the 40 outer pixels facing it straight on count.
    (row,) = segmentation_metrics(pred, ref, {1: "organ"}, nsd_tolerance_mm=10.1)
    assert row["nsd"] == pytest.approx((36 + 40) / (36 + 76))


def test_3d_cube_inside_cube_hand_computed():
    a = np.zeros((30, 30, 30), np.int16)
    b = a.copy()
    a[5:25, 5:25, 5:25] = 1
    b[10:20, 10:20, 10:20] = 1
    ref = Volume(a, np.ones(3), np.zeros(3), np.eye(3))
    pred = Volume(b, np.ones(3), np.zeros(3), np.eye(3))
    (row,) = segmentation_metrics(pred, ref, {1: "organ"}, nsd_tolerance_mm=1.0)
    assert row["dice"] == pytest.approx(2 * 1000 / (1000 + 8000))
    assert row["nsd"] == pytest.approx(0.0)
    # Face-to-face gaps are 5 voxels; edges and corners of the outer cube are farther (up to 5 * sqrt(3)).
    assert 5.0 <= row["hd95_mm"] <= 5.0 * math.sqrt(3) + 1e-6


def test_summarise_counts_the_infinite_hd95_it_leaves_out():
    rows = [{"name": "liver", "dice": 0.8, "hd95_mm": 4.0, "nsd": 0.9},
            {"name": "liver", "dice": 0.0, "hd95_mm": float("inf"), "nsd": 0.0},
            {"name": "liver", "dice": 0.6, "hd95_mm": 6.0, "nsd": 0.7}]
    s = summarise(rows)["liver"]
    assert s["hd95_mm"] == pytest.approx(5.0)
    assert s["hd95_inf"] == 1 and s["n"] == 3
    assert s["dice"] == pytest.approx(1.4 / 3)
