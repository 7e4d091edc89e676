"""Data set description and the persistent preprocessing cache."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from anatomical_embedding.data.datasets import DatasetSpec, PreprocessConfig, build_dataset
from anatomical_embedding.io import Volume, write_dicom_series, write_image


def _case(tmp_path, name, shape=(20, 24, 28), spacing=(0.9, 1.1, 2.0), label=True, seed=0):
    rng = np.random.default_rng(seed)
    vol = Volume((rng.random(shape) * 1500 - 1000).astype(np.float32), spacing, [5, -3, 11])
    (tmp_path / "images").mkdir(exist_ok=True)
    write_image(vol, tmp_path / "images" / f"{name}.nii.gz")
    if label:
        (tmp_path / "labels").mkdir(exist_ok=True)
        write_image(vol.with_array((vol.array > 0).astype(np.uint8)), tmp_path / "labels" / f"{name}.nii.gz")
    return vol


def test_folder_with_partial_labels(tmp_path):
    _case(tmp_path, "a")
    _case(tmp_path, "b", label=False)
    spec = DatasetSpec.from_path(tmp_path / "images", tmp_path / "labels")
    assert [c.id for c in spec.cases] == ["a", "b"]
    assert [c.id for c in spec.labelled] == ["a"] and [c.id for c in spec.unlabelled] == ["b"]
    # The cohort layout (DIR/images + DIR/labels) is recognised from the parent folder.
    assert len(DatasetSpec.from_path(tmp_path).labelled) == 1


def test_an_empty_detected_labels_folder_means_no_labels(tmp_path, caplog):
    """DIR/images + an empty DIR/labels (made ahead of time, or a training folder with unlabelled cases only) is a
    data set without labels, with an info line, so pretraining starts; an empty labels folder given explicitly stays
    an error (the user asked for labels)."""
    import logging

    _case(tmp_path, "a", label=False)
    _case(tmp_path, "b", label=False)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.labels.json").write_text('{"1": "liver"}', encoding="utf-8")  # no label map
    with caplog.at_level(logging.INFO, logger="anatomical_embedding.data.datasets"):
        spec = DatasetSpec.from_path(tmp_path)
    assert [(c.id, c.label) for c in spec.cases] == [("a", None), ("b", None)]
    assert spec.source == str(tmp_path / "images")
    assert any("holds no label maps" in r.getMessage() and str(tmp_path / "labels") in r.getMessage()
               for r in caplog.records)
    with pytest.raises(ValueError, match="no label maps found in"):
        DatasetSpec.from_path(tmp_path / "images", tmp_path / "labels")


def test_dicom_series_folder_is_a_case(tmp_path):
    vol = Volume(np.zeros((4, 16, 16), np.int16), (0.8, 0.8, 2.0))
    write_dicom_series(vol, tmp_path / "images" / "patient1")
    spec = DatasetSpec.from_path(tmp_path / "images")
    assert [c.id for c in spec.cases] == ["patient1"]


def test_bad_inputs_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        DatasetSpec.from_path(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        DatasetSpec.from_path(tmp_path / "missing")
    _case(tmp_path, "a", label=False)
    (tmp_path / "labels").mkdir()
    write_image(Volume(np.zeros((2, 2, 2), np.uint8)), tmp_path / "labels" / "zzz.nii.gz")
    with pytest.raises(ValueError, match="match no image"):
        DatasetSpec.from_path(tmp_path / "images", tmp_path / "labels")
    spec = DatasetSpec.from_path(tmp_path / "images")
    with pytest.raises(ValueError, match="smaller than the patch"):
        spec.check_volumes(min_size_ijk=(64, 64, 64), spacing=(1, 1, 1))
    spec.check_volumes(min_size_ijk=(16, 16, 16), spacing=(1, 1, 1))
    write_image(Volume(np.zeros((1, 32, 32), np.float32)), tmp_path / "images" / "flat.nii.gz")
    with pytest.raises(ValueError, match="2D image"):
        DatasetSpec.from_path(tmp_path / "images").check_volumes()


def test_manifest(tmp_path):
    _case(tmp_path, "a")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"cases": [{"id": "x", "image": "images/a.nii.gz", "label": "labels/a.nii.gz"}]}), encoding="utf-8")
    spec = DatasetSpec.from_path(manifest)
    assert spec.cases[0].id == "x" and spec.cases[0].label is not None
    manifest.write_text(json.dumps({"cases": [{"image": "images/nothere.nii.gz"}]}), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="nothere"):
        DatasetSpec.from_path(manifest)


def test_preprocessing_is_cached_and_invalidated(tmp_path):
    vol = _case(tmp_path, "a")
    spec = DatasetSpec.from_path(tmp_path / "images", tmp_path / "labels")
    cfg = PreprocessConfig(spacing=(1.5, 1.5, 1.5), preset="ct_aefm", min_size=(32, 32, 32))
    ds = build_dataset(spec, cfg, cache_dir=tmp_path / "cache")
    item = ds[0]
    k, j, i = item["image"].shape
    assert (i, j, k) == (32, 32, 32)  # padded up to the minimum size
    assert item["label"].shape == item["image"].shape
    assert float(item["image"].min()) >= -1 and float(item["image"].max()) <= 1
    np.testing.assert_allclose(item["spacing"].numpy(), 1.5)
    files = list((tmp_path / "cache").rglob("*.pt"))
    assert len(files) == 1
    # A cache hit returns identical data without re-reading: reading any image now fails the test.
    from anatomical_embedding.data import datasets

    def no_reading(*args, **kwargs):
        raise AssertionError("a cache hit read the source image")

    real_read = datasets.read_image
    datasets.read_image = no_reading
    try:
        again = build_dataset(spec, cfg, cache_dir=tmp_path / "cache")[0]
    finally:
        datasets.read_image = real_read
    np.testing.assert_array_equal(again["image"].numpy(), item["image"].numpy())
    # Editing the image changes its stamp, so a new entry is computed.
    write_image(vol.with_array(vol.array + 100), spec.cases[0].image, overwrite=True)
    os.utime(spec.cases[0].image, ns=(1, 1))
    changed = build_dataset(spec, cfg, cache_dir=tmp_path / "cache")[0]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2
    assert not np.array_equal(changed["image"].numpy(), item["image"].numpy())
    # Another spacing lives in its own folder.
    build_dataset(spec, PreprocessConfig(spacing=(2.0, 2.0, 2.0)), cache_dir=tmp_path / "cache")[0]
    assert len(list((tmp_path / "cache").iterdir())) == 2
