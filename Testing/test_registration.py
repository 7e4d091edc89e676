"""Registration baselines recover a known affine displacement of landmarks."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from anatomical_embedding.io import Volume
from anatomical_embedding.evaluation.registration import RegistrationConfig, register_affine, register_affine_bspline


def _pair():
    rng = np.random.default_rng(0)
    arr = gaussian_filter(rng.normal(size=(40, 48, 56)), 3) * 3000
    k, j, i = np.indices(arr.shape)
    arr[((k - 20) ** 2 / 300 + (j - 24) ** 2 / 400 + (i - 28) ** 2 / 600) > 1] = -1000
    src = Volume(arr.astype(np.float32), [3.0, 3.0, 3.0], [-90, -80, -70])
    a = sitk.AffineTransform(3)
    a.SetMatrix([1.05, 0.05, 0, -0.04, 0.97, 0.02, 0, 0.03, 1.02])
    a.SetTranslation([6, -4, 5])
    a.SetCenter(src.index_to_world([28, 24, 20]).tolist())
    # Resample gives target(x) = source(a(x)), so a source point p sits at a^-1(p) in the target.
    tgt = Volume.from_sitk(sitk.Resample(src.to_sitk(), src.to_sitk(), a, sitk.sitkLinear, -1000))
    pts = src.index_to_world(np.array([[20, 20, 16], [36, 28, 22], [28, 24, 20]], float))
    truth = np.array([a.GetInverse().TransformPoint(p.tolist()) for p in pts])
    return src, tgt, pts, truth


def test_affine_and_bspline_recover_known_transform():
    src, tgt, pts, truth = _pair()
    before = np.linalg.norm(pts - truth, axis=1)
    assert before.mean() > 5
    for register in (register_affine, register_affine_bspline):
        result = register(src, tgt, RegistrationConfig(spacing=3.0, bspline_iterations=20))
        err = np.linalg.norm(result.map_points(pts) - truth, axis=1)
        assert err.max() < 1.5, (result.kind, err)
        assert result.seconds > 0


def test_registration_is_reproducible_and_refuses_the_wall_clock_seed():
    # SimpleITK reads sampling seed 0 as sitkWallClock: every run drew a new random sample, and on one real pair of
    # bench_real the affine baseline ranged from 1 to 45 mm between runs. The default seed is fixed now.
    import pytest

    src, tgt, pts, _ = _pair()
    cfg = RegistrationConfig(spacing=3.0, sampling_fraction=0.02, affine_iterations=30)
    a, b = (register_affine(src, tgt, cfg).map_points(pts) for _ in range(2))
    np.testing.assert_allclose(a, b, atol=1e-6)  # multi-threaded sums differ in the last bits only
    with pytest.raises(ValueError, match="seed 0"):
        register_affine(src, tgt, RegistrationConfig(seed=0))


def test_images_outside_the_hu_range_keep_their_contrast():
    # A 12-bit MR or a CT stored in other units lies partly or wholly above 1500: the former fixed HU clip made
    # this pair's voxels one constant, so nothing could be registered. Only CT in Hounsfield units is clipped now.
    src, tgt, pts, truth = _pair()
    shifted = [Volume(v.array + 4000.0, v.spacing, v.origin, v.direction) for v in (src, tgt)]
    result = register_affine(*shifted, RegistrationConfig(spacing=3.0))
    err = np.linalg.norm(result.map_points(pts) - truth, axis=1)
    assert err.max() < 1.5, err
