"""Landmark-transfer evaluation: errors, summaries and plots equal direct computations."""
from __future__ import annotations

import numpy as np
import pytest

from anatomical_embedding.io import Volume
from anatomical_embedding.evaluation.landmarks import (
    evaluate_transfer,
    identical_coordinate,
    plot_error_cdf,
    summarise,
    write_records_csv,
)


def test_errors_and_summary(tmp_path):
    img = Volume(np.zeros((4, 4, 4), np.float32))
    src = {"a": np.array([0.0, 0, 0]), "b": np.array([10.0, 0, 0]), "only_src": np.array([1.0, 1, 1])}
    targets = [("t1", img, {"a": np.array([3.0, 4, 0]), "b": np.array([10.0, 0, 0])}),
               ("t2", img, {"a": np.array([0.0, 0, 1]), "b": np.array([10.0, 0, 2])})]
    recs = evaluate_transfer("identity", identical_coordinate, img, src, targets)
    assert recs[0].names == ["a", "b"]  # only landmarks present everywhere
    np.testing.assert_allclose(recs[0].errors_mm, [5, 0])
    np.testing.assert_allclose(recs[1].errors_mm, [1, 2])
    shifted = evaluate_transfer("shift", lambda s, t, p: p + [0, 0, 1], img, src, targets)
    s = summarise(recs + shifted)
    assert s["identity"]["mean_mm"] == pytest.approx(2.0)
    assert s["identity"]["median_mm"] == pytest.approx(1.5)
    assert s["identity"]["p90_mm"] == pytest.approx(np.percentile([5, 0, 1, 2], 90))
    assert s["identity"]["per_landmark_mean_mm"] == {"a": 3.0, "b": 1.0}
    np.testing.assert_allclose(shifted[1].errors_mm, [0, 1])
    csv_path = write_records_csv(recs, tmp_path / "r.csv")
    assert len(csv_path.read_text(encoding="utf-8").splitlines()) == 5
    png = plot_error_cdf(recs + shifted, tmp_path / "cdf.png")
    assert png.stat().st_size > 5000
    with pytest.raises(ValueError, match="share no landmark"):
        evaluate_transfer("x", identical_coordinate, img, {"z": np.zeros(3)}, targets)
