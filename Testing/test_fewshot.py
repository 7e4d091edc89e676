"""Few-shot head: tiling, sampling, training, persistence, label files and error handling.

The end-to-end checks with a pretrained AEFM on phantoms are in test_fewshot_phantoms.py; these
use a small analytic embedder so that every expected value can be computed directly.
"""
from __future__ import annotations

import numpy as np
import pytest

from anatomical_embedding.fewshot.head import (
    FewShotConfig,
    FewShotHead,
    _train_mlp,
    apply_head,
    features_at,
    iter_feature_tiles,
    sample_voxels,
    train_head,
)
from anatomical_embedding.io import Volume
from anatomical_embedding.io.labelmaps import keep_largest_components, read_labelmap, write_labelmap


class LocalEmbedder:
    """Fine features depend only on the voxel itself, coarse on an 8-voxel block: tiling must be exact."""

    def __init__(self, model_hash: str = "toy-model"):
        self.model_hash = model_hash
        self.card = {"spacing": [2.0, 2.0, 2.0], "intensity_preset": "ct_aefm", "size_multiple": 8}
        self.calls = 0

    def embed_patch(self, patch: np.ndarray):
        self.calls += 1
        x = patch[0, 0]
        fine = np.stack([x, x**2, np.sin(3 * x), np.ones_like(x)])
        fine /= np.linalg.norm(fine, axis=0, keepdims=True)
        k, j, i = x.shape
        coarse = x.reshape(k // 8, 8, j // 8, 8, i // 8, 8).mean((1, 3, 5))[None]
        coarse = np.concatenate([coarse, np.ones_like(coarse)])
        coarse /= np.linalg.norm(coarse, axis=0, keepdims=True)
        return coarse[None], fine[None]


def blob_case(seed: int, shape=(24, 28, 32)) -> tuple[Volume, Volume]:
    """Two 'organs' of different HU at random places in fat, with noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    hu = np.full(shape, -100.0)
    lab = np.zeros(shape, np.int16)
    for value, level in ((1, 60.0), (2, 300.0)):
        c = rng.uniform(6, np.array(shape) - 6)
        r = rng.uniform(3.5, 5.5)
        m = (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 < r**2
        hu[m] = level
        lab[m] = value
    hu += rng.normal(0, 15, shape)
    geo = dict(spacing=(2.0, 2.0, 2.0), origin=(10, -20, 5))
    return Volume(hu.astype(np.float32), **geo), Volume(lab, **geo)


def test_tiles_cover_volume_once_and_match_untiled_features():
    model = LocalEmbedder()
    image = np.random.default_rng(0).uniform(-1, 1, (21, 30, 17)).astype(np.float32)
    cfg = FewShotConfig(tile=24, margin=4, use_coarse=False)
    seen = np.zeros(image.shape, int)
    for sl, feats in iter_feature_tiles(model, image, cfg):
        seen[sl] += 1
        np.testing.assert_allclose(feats[-1], image[sl])  # the intensity channel is the voxel's value
        np.testing.assert_allclose(feats[0], image[sl] / np.sqrt(image[sl] ** 2 + image[sl] ** 4
                                                                  + np.sin(3 * image[sl]) ** 2 + 1), rtol=1e-5)
    assert np.all(seen == 1)
    idx = np.array([[0, 0, 0], [20, 29, 16], [10, 5, 7]])
    f = features_at(model, image, idx, cfg)
    np.testing.assert_allclose(f[:, -1], image[tuple(idx.T)])


class RecordingEmbedder(LocalEmbedder):
    """LocalEmbedder whose coarse map averages whole 8-slice blocks along k (as Adam's 2D coarse map)."""

    def __init__(self):
        super().__init__()
        self.patches = []

    def embed_patch(self, patch: np.ndarray):
        self.patches.append(patch[0, 0].copy())
        return super().embed_patch(patch)


@pytest.mark.parametrize("flat_axis", [0, 1, 2])
def test_2d_tiles_copy_the_slice_along_the_flat_axis_like_the_embedding(flat_axis):
    # A single slice must reach the network as a slab of copies of itself (inference.embedding's path),
    # never with the image minimum as padding: a coarse map averaging 8 k-slices then saw 1 real slice and
    # 7 of air. With copies, the coarse feature of the slice equals that of the slice alone.
    from anatomical_embedding.inference.embedding import replicate_flat_axes

    rng = np.random.default_rng(1)
    plane = rng.uniform(-1, 1, (20, 27)).astype(np.float32)
    image = np.expand_dims(plane, flat_axis)
    model = RecordingEmbedder()
    cfg = FewShotConfig(tile=24, margin=4)
    seen = np.zeros(image.shape, int)
    for sl, feats in iter_feature_tiles(model, image, cfg):
        seen[sl] += 1
        patch = model.patches[-1]
        assert patch.shape[flat_axis] % 8 == 0
        # Every slice of the slab along the flat axis is the same slice: nothing but copies.
        assert np.all(patch == np.take(patch, [0], axis=flat_axis))
        # The coarse channel (a block mean) at the slice equals the block mean of the slice copied 8 times.
        one = np.take(patch, [0], axis=flat_axis)
        slab = replicate_flat_axes(one, [8 if a == flat_axis else n for a, n in enumerate(one.shape)])
        assert slab.shape[flat_axis] == 8 and np.all(slab == np.take(slab, [7], axis=flat_axis))
    assert np.all(seen == 1)
    assert not np.any([np.all(p == p.min()) for p in model.patches])


def test_replicate_flat_axes_is_the_embedding_path():
    from anatomical_embedding.inference.embedding import replicate_flat_axes

    a = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    out = replicate_flat_axes(a, (4, 9, 9))
    assert out.shape == (4, 2, 3) and all(np.array_equal(out[n], a[0]) for n in range(4))
    assert replicate_flat_axes(np.zeros((2, 3, 4)), (8, 8, 8)).shape == (2, 3, 4)  # a volume is left alone


def test_sampling_is_class_balanced_and_hits_boundaries():
    _, lab = blob_case(0)
    idx, cls = sample_voxels(lab.array.astype(int), 3, 200, 0.3, np.random.default_rng(0))
    counts = np.bincount(cls, minlength=3)
    assert counts[0] == 200 and all(c <= 200 for c in counts)
    assert np.all(lab.array[tuple(idx.T)] == cls)
    assert len(np.unique(idx, axis=0)) >= 0.9 * len(idx)


def test_mlp_learns_a_nonlinear_rule_and_stops_early():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 2)).astype(np.float32)
    y = ((x[:, 0] ** 2 + x[:, 1] ** 2) > 1.2).astype(int)  # a ring: not linearly separable
    cfg = FewShotConfig(hidden=32, epochs=400, patience=10, lr=1e-2)
    params, history = _train_mlp(x, y, 2, cfg)
    h = np.maximum(x @ params[0] + params[1], 0)
    acc = np.mean((h @ params[2] + params[3]).argmax(1) == y)
    assert acc > 0.95
    assert history["epochs_run"] < 400 and history["best_epoch"] <= history["epochs_run"]


def test_linear_head_is_one_layer():
    # hidden=0 is HDSSL's linear evaluation: it separates half-spaces but cannot learn the ring.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3000, 2)).astype(np.float32)
    ring = ((x[:, 0] ** 2 + x[:, 1] ** 2) > 1.2).astype(int)
    plane = (x[:, 0] + 0.5 * x[:, 1] > 0.3).astype(int)
    cfg = FewShotConfig(hidden=0, epochs=200, patience=10, lr=1e-2)
    for y, lo, hi in ((plane, 0.97, 1.0), (ring, 0.0, 0.75)):
        params, _ = _train_mlp(x, y, 2, cfg)
        assert len(params) == 2
        acc = np.mean((x @ params[0] + params[1]).argmax(1) == y)
        assert lo <= acc <= hi, acc


def test_train_apply_segments_unseen_case_and_round_trips(tmp_path):
    model = LocalEmbedder()
    cases = [blob_case(s) for s in range(3)]
    names = {1: "soft", 2: "dense"}
    cfg = FewShotConfig(voxels_per_class=400, tile=32, margin=4, epochs=150)
    head = train_head(model, [c[0] for c in cases], [c[1] for c in cases], names, cfg)
    assert head.class_names == ["background", "soft", "dense"] and head.class_values == [0, 1, 2]
    path = head.save(tmp_path / "h.aehead")
    with pytest.raises(FileExistsError):
        head.save(path)
    loaded = FewShotHead.load(path)
    assert len(loaded.weights) == 4
    for a, b in zip(loaded.weights, head.weights):
        np.testing.assert_array_equal(a, b)
    test_img, test_lab = blob_case(7)
    seg = apply_head(model, loaded, test_img)
    assert seg.same_geometry(test_img)
    for v in (1, 2):
        a, b = seg.array == v, test_lab.array == v
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.8, (v, dice)


def test_cancel_and_errors():
    model = LocalEmbedder()
    img, lab = blob_case(0)
    with pytest.raises(ValueError, match="empty label map"):
        train_head(model, [img], [lab.with_array(np.zeros_like(lab.array))], {1: "soft"})
    with pytest.raises(ValueError, match="not named"):
        train_head(model, [img], [lab], {1: "soft"})
    with pytest.raises(InterruptedError):
        train_head(model, [img], [lab], {1: "a", 2: "b"}, progress=lambda f, m: False)
    head = train_head(model, [img], [lab], {1: "a", 2: "b"}, FewShotConfig(epochs=3, voxels_per_class=50))
    with pytest.raises(ValueError, match="retrain the head"):
        apply_head(LocalEmbedder("another-model"), head, img)


def test_postprocess_keeps_largest_component_and_fills_holes():
    lab = np.zeros((20, 20, 20), int)
    lab[2:12, 2:12, 2:12] = 1
    lab[6, 6, 6] = 0          # a hole
    lab[15:17, 15:17, 15:17] = 1  # a stray island
    out = keep_largest_components(lab, 2)
    assert out[6, 6, 6] == 1 and out[16, 16, 16] == 0 and out.sum() == 1000


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz"])
def test_label_files_keep_segment_names(tmp_path, suffix):
    _, lab = blob_case(3)
    names = {1: "liver", 2: "kidney_left"}
    path = write_labelmap(lab, names, tmp_path / f"seg{suffix}", colors={1: (0.8, 0.3, 0.2)})
    back, back_names = read_labelmap(path)
    np.testing.assert_array_equal(back.array, lab.array)
    assert back_names == names
    assert back.same_geometry(lab)
    with pytest.raises(FileExistsError):
        write_labelmap(lab, names, path)


def test_segfile_loads_in_slicer_storage_node(tmp_path, mrml_scene):
    import slicer

    _, lab = blob_case(4)
    path = write_labelmap(lab, {1: "liver", 2: "spleen"}, tmp_path / "s.seg.nrrd")
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    names = sorted(seg.GetNthSegment(n).GetName() for n in range(seg.GetNumberOfSegments()))
    assert names == ["liver", "spleen"]
    assert slicer.mrmlScene is mrml_scene  # the node was read in the scene Slicer itself uses

