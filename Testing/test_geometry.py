"""Volume geometry, LPS/RAS handling, resampling, crop/pad and file round trips."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from anatomical_embedding.io import (
    Volume,
    convert_points,
    crop,
    crop_or_pad,
    get_preset,
    pad,
    pad_to_multiple,
    read_image,
    resample_like,
    reorient_to_canonical,
    resample_to_spacing,
    write_dicom_series,
    write_image,
)


def oblique_volume(shape_kji=(12, 17, 23), spacing=(0.8, 1.3, 2.7), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    direction = Rotation.from_euler("xyz", [12, -25, 33], degrees=True).as_matrix()
    arr = rng.normal(size=shape_kji).astype(np.float32)
    return Volume(arr, spacing, [-12.5, 40.0, 7.25], direction)


def test_index_world_matches_itk_and_inverts():
    vol = oblique_volume()
    img = vol.to_sitk()
    ijk = np.array([[0, 0, 0], [3.5, 7.25, 1.0], [22, 16, 11]], dtype=float)
    lps = vol.index_to_world(ijk)
    for p, q in zip(ijk, lps):
        np.testing.assert_allclose(img.TransformContinuousIndexToPhysicalPoint(p.tolist()), q, atol=1e-9)
    np.testing.assert_allclose(vol.world_to_index(lps), ijk, atol=1e-9)


def test_ras_is_lps_with_x_and_y_flipped_at_one_place():
    vol = oblique_volume()
    ijk = np.array([[1.0, 2.0, 3.0]])
    lps = vol.index_to_world(ijk, "LPS")
    ras = vol.index_to_world(ijk, "RAS")
    np.testing.assert_allclose(ras, lps * [-1, -1, 1])
    np.testing.assert_allclose(convert_points(ras, "RAS", "LPS"), lps)
    np.testing.assert_allclose(vol.world_to_index(ras, "RAS"), ijk, atol=1e-9)
    with pytest.raises(ValueError, match="frame"):
        convert_points(ras, "RAS", "XYZ")


def test_bad_volumes_are_refused_clearly():
    with pytest.raises(ValueError, match="single-slice"):
        Volume(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing"):
        Volume(np.zeros((2, 2, 2)), spacing=[1, 0, 1])
    with pytest.raises(ValueError, match="orthonormal"):
        Volume(np.zeros((2, 2, 2)), direction=np.diag([1, 2, 1]))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_round_trip_keeps_oblique_geometry(tmp_path, suffix):
    vol = oblique_volume()
    path = write_image(vol, tmp_path / f"v{suffix}")
    back = read_image(path)
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.ijk_to_world(), vol.ijk_to_world(), atol=1e-5)


def test_write_refuses_to_overwrite_and_is_atomic(tmp_path):
    vol = oblique_volume()
    path = write_image(vol, tmp_path / "v.nrrd")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_image(vol, path)
    write_image(vol.with_array(vol.array * 2), path, overwrite=True)
    np.testing.assert_allclose(read_image(path).array, vol.array * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nrrd"]  # no temp files left


def test_dicom_series_round_trip(tmp_path):
    vol = oblique_volume(shape_kji=(6, 20, 24), spacing=(0.75, 0.9, 2.5))
    vol = vol.with_array(np.round(vol.array * 300).astype(np.int16))
    write_dicom_series(vol, tmp_path / "series")
    back = read_image(tmp_path / "series")
    np.testing.assert_array_equal(back.array.astype(np.int16), vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-4)
    np.testing.assert_allclose(back.ijk_to_world(), vol.ijk_to_world(), atol=1e-4)


def test_png_reads_as_single_slice(tmp_path):
    arr = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "x.png"))
    vol = read_image(tmp_path / "x.png")
    assert vol.array.shape == (1, 20, 30) and vol.is_2d
    np.testing.assert_array_equal(vol.array[0], arr)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "junk.nii.gz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="DICOM"):
        read_image(tmp_path / "empty")


def test_resampled_world_point_hits_same_anatomy():
    # A bright blob at a known world point must stay there, within half a new voxel, after resampling.
    base = oblique_volume(shape_kji=(24, 40, 48), spacing=(0.9, 1.4, 2.2))
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in base.shape_ijk], indexing="ij"), -1)
    world = base.index_to_world(ijk.reshape(-1, 3))
    centre = base.index_to_world(np.array([20.3, 18.6, 11.2]))
    blob = np.exp(-np.sum((world - centre) ** 2, axis=1) / (2 * 4.0**2)).reshape(ijk.shape[:3])
    vol = base.with_array(np.transpose(blob, (2, 1, 0)).astype(np.float32))
    for spacing in (1.0, (0.6, 2.0, 1.5)):
        res = resample_to_spacing(vol, spacing)
        k, j, i = np.unravel_index(np.argmax(res.array), res.array.shape)
        # Quadratic sub-voxel peak per axis for a fair comparison with the continuous centre.
        peak = np.array([i, j, k], dtype=float)
        arr = res.array
        for ax, idx in ((2, (k, j, slice(i - 1, i + 2))), (1, (k, slice(j - 1, j + 2), i)),
                        (0, (slice(k - 1, k + 2), j, i))):
            a, b, c = arr[idx]
            peak[2 - ax] += 0.5 * (a - c) / (a - 2 * b + c)
        err_vox = np.abs(res.world_to_index(centre) - peak)
        assert np.all(err_vox < 0.5), (spacing, err_vox)
        # Physical extent is preserved (within one new voxel).
        assert np.all(np.abs(res.physical_extent() - vol.physical_extent()) <= res.spacing + 1e-6)


def test_resample_labels_nearest_and_like():
    vol = oblique_volume()
    labels = vol.with_array((vol.array > 0.5).astype(np.uint8) * 3)
    res = resample_to_spacing(labels, 0.5, is_label=True)
    assert set(np.unique(res.array)) <= {0, 3}
    back = resample_like(res, labels, is_label=True)
    assert back.same_geometry(labels)
    assert np.mean(back.array == labels.array) > 0.97


def test_resample_keeps_single_slice_axis():
    vol = Volume(np.random.rand(1, 30, 40).astype(np.float32), [0.2, 0.2, 1.0])
    res = resample_to_spacing(vol, 0.4)
    assert res.array.shape == (1, 15, 20)


def test_crop_pad_preserve_world_positions():
    vol = oblique_volume()
    sub = crop(vol, (3, 4, 2), (10, 8, 5))
    np.testing.assert_allclose(sub.index_to_world([0, 0, 0]), vol.index_to_world([3, 4, 2]))
    assert sub.array[0, 0, 0] == vol.array[2, 4, 3]
    padded = pad(vol, (2, 0, 1), (0, 3, 0), value=-7)
    np.testing.assert_allclose(padded.index_to_world([2, 0, 1]), vol.index_to_world([0, 0, 0]))
    assert padded.array[0, 0, 0] == -7 and padded.array[1, 0, 2] == vol.array[0, 0, 0]
    box = crop_or_pad(vol, (-2, 10, 5), (30, 10, 10), value=0)
    assert box.shape_ijk == (30, 10, 10)
    np.testing.assert_allclose(box.index_to_world([2, 0, 0]), vol.index_to_world([0, 10, 5]))
    with pytest.raises(ValueError, match="outside"):
        crop(vol, (20, 0, 0), (10, 1, 1))
    mult, after = pad_to_multiple(vol, 16)
    assert all(s % 16 == 0 for s in mult.shape_ijk) and list(after) == [9, 15, 4]


def test_intensity_presets():
    hu = np.array([-1000, -500, 125, 750, 2000], dtype=np.float32)
    np.testing.assert_allclose(get_preset("ct_aefm").apply(hu), [-1, -1, 0, 1, 1])
    np.testing.assert_allclose(get_preset("ct_hdssl").apply(hu), np.clip((hu + 1350) / 2350, 0, 1), rtol=1e-6)
    z = get_preset("ct_zscore").apply(hu)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    mri = np.concatenate([np.linspace(0, 100, 1000), [1e5]]).astype(np.float32)
    out = get_preset("mri_percentile").apply(mri)
    assert out.min() == 0 and out.max() == 1 and out[500] < 0.6  # the outlier is clipped, not the scale
    card = get_preset("ct_aefm").to_dict()
    assert get_preset(card) == get_preset("ct_aefm")
    with pytest.raises(ValueError, match="known"):
        get_preset("ct_unknown")


@pytest.mark.parametrize("perm", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("flips", [(1, 1, 1), (-1, 1, -1), (1, -1, 1)])
def test_reorient_to_canonical_keeps_every_voxel_at_its_world_point(perm, flips):
    # A sagittal-like, flipped, slightly oblique volume: axes permuted and mirrored against LPS.
    tilt = Rotation.from_euler("xyz", [9, -6, 12], degrees=True).as_matrix()
    direction = tilt @ (np.eye(3)[:, list(perm)] * np.asarray(flips, dtype=float)[None, :])
    rng = np.random.default_rng(3)
    vol = Volume(rng.normal(size=(5, 7, 11)).astype(np.float32), (0.7, 1.9, 3.1), (10.0, -4.0, 33.0), direction)
    out = reorient_to_canonical(vol)
    # Axes now point (as closely as possible) to L, P, S: positive diagonal dominates.
    assert np.all(np.argmax(np.abs(out.direction), axis=0) == [0, 1, 2])
    assert np.all(np.diag(out.direction) > 0)
    # Every voxel keeps its world position and value (no interpolation).
    k, j, i = np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij")
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float)
    world = vol.index_to_world(ijk)
    new_ijk = np.rint(out.world_to_index(world)).astype(int)
    np.testing.assert_allclose(out.index_to_world(new_ijk), world, atol=1e-9)
    np.testing.assert_array_equal(out.array[new_ijk[:, 2], new_ijk[:, 1], new_ijk[:, 0]], vol.array.ravel())
    np.testing.assert_allclose(sorted(out.spacing), sorted(vol.spacing))
