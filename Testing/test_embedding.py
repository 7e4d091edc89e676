"""Dense embedding of volumes: sliding window, fine tiles, 2D, cache keys and eviction, clear errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from anatomical_embedding.inference.backends import EmbeddingModel, TorchModel
from anatomical_embedding.inference.embedding import (
    EmbedConfig,
    EmbeddingCache,
    embed_volume,
    gaussian_weights,
    image_hash,
    window_starts,
)
from anatomical_embedding.io import Volume

CARD = {"spacing": [2.0, 2.0, 2.0], "intensity_preset": "ct_aefm", "patch_size": [32, 32, 32], "method": "aefm"}


def blob_volume(shape_kji=(40, 48, 56), seed=0, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> Volume:
    """Smooth random 'anatomy' in HU: distinct structures everywhere so that matching is well posed."""
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.normal(size=shape_kji), 2.0)
    a = (a - a.mean()) / a.std() * 400.0
    return Volume(a.astype(np.float32), spacing, origin, np.eye(3) if direction is None else direction)


class PoolModel(EmbeddingModel):
    """Exactly local features (no padding effects, no normalisation over the window).

    coarse = unit vector of (mean of 8^3 block, 1, mean^2), fine = unit vector of (x, 1, x^2): whatever
    the window, the output for a voxel depends only on its block, so tiling must reproduce the global map.
    """

    backend = "test"

    def __init__(self, spacing=(2.0, 2.0, 2.0)):
        card = dict(CARD, spacing=list(spacing), coarse_channels=3, fine_channels=3, coarse_stride=8, size_multiple=16)
        super().__init__(card, "pool-model")
        self.calls = {"coarse": 0, "fine": 0}

    @staticmethod
    def _features(v: np.ndarray) -> np.ndarray:
        f = np.stack([v, np.ones_like(v), v * v])
        return f / np.linalg.norm(f, axis=0, keepdims=True)

    def _run(self, x, want_fine):
        self.calls["fine" if want_fine else "coarse"] += 1
        k, j, i = x.shape[2:]
        pooled = x[0, 0].reshape(k // 8, 8, j // 8, 8, i // 8, 8).mean(axis=(1, 3, 5))
        return self._features(pooled)[None].astype(np.float32), (self._features(x[0, 0])[None].astype(np.float32)
                                                                   if want_fine else None)


@pytest.fixture()
def cache(tmp_path):
    return EmbeddingCache(tmp_path / "cache", budget_bytes=1 << 30)


def tiny_aefm(seed=0):
    import torch

    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.manual_seed(seed)
    return AEFMUNet((8, 16, 32, 64), 16)


def test_window_starts_cover_axis_on_multiples():
    starts = window_starts(80, 32, 0.25, 16)
    assert starts == [0, 16, 32, 48]
    assert all(s % 16 == 0 for s in starts) and starts[-1] + 32 == 80
    assert window_starts(32, 64, 0.25, 16) == [0]
    w = gaussian_weights((4, 4, 4), 0.125)
    assert w.max() == pytest.approx(1.0) and w.min() > 0 and w[1, 1, 1] > w[0, 0, 0]


def test_sliding_window_equals_global_for_local_features():
    model = PoolModel()
    vol = blob_volume()
    emb = embed_volume(model, vol, None, EmbedConfig(window=(32, 32, 32)))
    assert model.calls["coarse"] > 1  # several windows were blended
    prepared = emb.prepared.array
    k, j, i = prepared.shape
    direct = model._features(prepared.reshape(k // 8, 8, j // 8, 8, i // 8, 8).mean(axis=(1, 3, 5)))
    np.testing.assert_allclose(emb.coarse, direct, atol=2e-3)  # float16 storage


def _processed_voxels(shape, window, overlap=0.25, m=16) -> int:
    return int(np.prod([len(window_starts(s, int(w), overlap, m)) * int(w) for s, w in zip(shape, window)]))


@pytest.mark.parametrize("shape, cube, budget", [
    ((304, 512, 512), 96, 128 ** 3),  # a 512x512x300 CT at 1 mm: 75 windows of 128^3 instead of 320 cubes of 96
    ((96, 80, 96), 64, 128 ** 3),  # a CT at 4 mm: the whole image in one window
    ((16, 256, 256), 96, 128 ** 3),  # a slab thinner than the cube
    ((256, 176, 144), 96, 160 ** 3),
    ((80, 80, 80), 96, 32 ** 3),  # budget below the cube: the cube
])
def test_fitted_window_processes_the_fewest_voxels_within_its_budget(shape, cube, budget):
    from anatomical_embedding.inference.embedding import fit_window_kji

    win = fit_window_kji(shape, (cube,) * 3, 0.25, 16, budget)
    base = np.minimum(cube, shape)
    assert np.all(win % 16 == 0) and np.all(win >= base) and np.all(win <= shape)
    assert np.prod(win) <= max(budget, np.prod(base))
    # Exhaustive search over every allowed window shape (sides multiples of 16 from the cube's to the axis).
    sides = [range(int(b), int(s) + 1, 16) for b, s in zip(base, shape)]
    allowed = [w for w in itertools.product(*sides) if np.prod(w) <= max(budget, np.prod(base))]
    assert _processed_voxels(shape, win) == min(_processed_voxels(shape, w) for w in allowed)
    assert _processed_voxels(shape, win) <= _processed_voxels(shape, base)
    if shape == (304, 512, 512):
        assert win.tolist() == [128, 128, 128] and _processed_voxels(shape, win) < _processed_voxels(shape, base) / 1.75
    if shape in ((96, 80, 96), (16, 256, 256)):
        assert win.tolist() == list(shape)


def test_fitted_windows_blend_to_the_global_map_and_change_the_cache_key(cache):
    from anatomical_embedding.inference.embedding import coarse_window_kji, embedding_window_count

    model = PoolModel()
    vol = blob_volume((72, 40, 56))  # padded to (80, 48, 64): windows of unequal sides
    config = EmbedConfig(window=(32, 32, 32), max_window_voxels=48 * 48 * 32)
    calls = _counting(model)
    emb = embed_volume(model, vol, cache, config)
    win = coarse_window_kji(model, config, emb.prepared.array.shape)
    assert len(set(win.tolist())) > 1 and np.prod(win) <= config.max_window_voxels
    n = len(calls)
    assert n == emb.timings["windows"] == embedding_window_count(model, vol, config) > 1
    cubes = embed_volume(model, vol, cache, EmbedConfig(window=(32, 32, 32)))
    assert len(calls) - n > n  # the cubes' pass ran more windows
    prepared = emb.prepared.array
    k, j, i = prepared.shape
    direct = model._features(prepared.reshape(k // 8, 8, j // 8, 8, i // 8, 8).mean(axis=(1, 3, 5)))
    np.testing.assert_allclose(emb.coarse, direct, atol=2e-3)
    np.testing.assert_allclose(emb.coarse, cubes.coarse, atol=2e-3)
    # Another layout is another map for a real network: its own cache entry; cubes keep their old key.
    assert emb.key != cubes.key
    assert "max_window_voxels" not in EmbedConfig().key()


def test_fine_block_assembles_tiles_exactly():
    model = PoolModel()
    emb = embed_volume(model, blob_volume(), None)
    start, size = np.array([5, 13, 20]), np.array([30, 21, 9])  # spans several tiles on every axis
    block = emb.fine_block(start, size)
    a = emb.prepared.array[start[2]:start[2] + size[2], start[1]:start[1] + size[1], start[0]:start[0] + size[0]]
    np.testing.assert_allclose(block, model._features(a), atol=2e-3)
    n = model.calls["fine"]
    emb.fine_block(start + 2, size - 4)  # already computed: no new forward pass
    assert model.calls["fine"] == n


def test_dense_fine_mode_reads_one_map_cached_on_disk_and_computes_no_tile(cache, monkeypatch):
    from anatomical_embedding.inference import embedding

    model = PoolModel()
    vol = blob_volume()
    emb = embed_volume(model, vol, cache, EmbedConfig(dense_fine=True))
    assert emb.reads_dense and emb.dense_fine().dtype == np.float16
    start, size = np.array([5, 13, 20]), np.array([30, 21, 9])
    block = emb.fine_block(start, size)
    a = emb.prepared.array[start[2]:start[2] + size[2], start[1]:start[1] + size[1], start[0]:start[0] + size[0]]
    # Exactly local features: the blended windows agree with the voxel's own feature (float16 storage).
    np.testing.assert_allclose(block, model._features(a), atol=2e-3)
    tiles = embed_volume(model, vol, None).fine_block(start, size)  # the tile path: same vectors for this model
    np.testing.assert_allclose(block, tiles, atol=2e-3)
    assert emb.stats["tiles_computed"] == 0 and emb.warm_tiles(emb.all_tiles()) == 0
    # Same cache entry as the tile mode (dense_fine is not part of the key); a second embedding reads the map.
    assert emb.key == embed_volume(model, vol, None, EmbedConfig()).key
    calls = dict(model.calls)
    again = embed_volume(model, vol, cache, EmbedConfig(dense_fine=True))
    assert model.calls == calls and "dense_fine_s" in again.timings
    np.testing.assert_array_equal(again.dense_fine(), emb.dense_fine())
    # Over its memory budget the dense map is skipped and fine vectors come from tiles.
    monkeypatch.setattr(embedding, "DENSE_FINE_MAX_BYTES", emb.dense_fine_bytes - 1)
    big = embed_volume(model, vol, None, EmbedConfig(dense_fine=True))
    assert not big.reads_dense and big._dense_fine is None
    big.fine_block(start, size)
    assert big.stats["tiles_computed"] > 0


def _counting(model) -> list:
    """Record ``want_fine`` of every network run of ``model``."""
    calls, run = [], model._run

    def counted(x, want_fine):
        calls.append(want_fine)
        return run(x, want_fine)
    model._run = counted
    return calls


def test_coarse_from_dense_makes_both_maps_in_one_pass_of_the_dense_windows(cache):
    from anatomical_embedding.inference.embedding import (
        dense_window_kji, embedding_window_count, sliding_window, sliding_window_coarse, window_kji)

    model = TorchModel(tiny_aefm(), CARD)  # a real network: its coarse map depends on the window
    vol = blob_volume((40, 96, 80), seed=5)
    config = EmbedConfig(dense_fine=True, coarse_from_dense=True)
    calls = _counting(model)
    emb = embed_volume(model, vol, cache, config)
    win = dense_window_kji(model, config, emb.prepared.array.shape)
    n = len(calls)
    coarse, fine = sliding_window(model, emb.prepared.array, win, want_fine=True)
    del calls[n:]
    # One pass: as many network runs as dense windows (and as the progress count says), no separate fine pass.
    assert all(calls) and len(calls) == emb.timings["windows"] == embedding_window_count(model, vol, config)
    assert "dense_fine_s" not in emb.timings and emb.reads_dense
    np.testing.assert_allclose(emb.coarse, coarse.astype(np.float16), atol=1e-3)
    np.testing.assert_allclose(emb.dense_fine(), fine.astype(np.float16), atol=1e-3)
    # The usual coarse map comes from the model's patch-size windows: another map, hence another cache entry.
    usual = sliding_window_coarse(model, emb.prepared.array, window_kji(model, EmbedConfig()))
    assert np.abs(usual - coarse).max() > 0.05
    assert emb.key != embed_volume(model, vol, None, EmbedConfig(dense_fine=True)).key
    # A second embedding reads both maps from the disk cache.
    calls.clear()
    again = embed_volume(model, vol, cache, config)
    assert not calls
    np.testing.assert_array_equal(again.coarse, emb.coarse)
    np.testing.assert_array_equal(again.dense_fine(), emb.dense_fine())


def test_prepare_resamples_to_model_spacing_and_keeps_world_positions():
    model = PoolModel(spacing=(2.0, 2.0, 2.0))
    theta = np.deg2rad(30)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    vol = blob_volume((20, 50, 40), spacing=(1.0, 1.6, 4.0), origin=(5, -3, 7), direction=rot)
    emb = embed_volume(model, vol, None)
    np.testing.assert_allclose(emb.prepared.spacing, [2, 2, 2])
    np.testing.assert_allclose(emb.prepared.direction, rot)
    # The centre of the source lies at the centre of the valid box (same physical field of view).
    centre_world = vol.index_to_world((np.asarray(vol.shape_ijk) - 1) / 2)
    centre_idx = emb.world_to_index(centre_world)
    np.testing.assert_allclose(centre_idx, emb.valid_start + (emb.valid_size - 1) / 2, atol=0.51)


def test_2d_single_slice_volume_is_embedded_as_a_slab():
    model = PoolModel()
    vol = blob_volume((1, 48, 64))
    emb = embed_volume(model, vol, None)
    assert emb.prepared.array.shape[0] == 16 and emb.valid_size[2] == 1 and emb.valid_start[2] == 8
    # The original slice is at valid_start in k and its world position is unchanged.
    np.testing.assert_allclose(emb.world_to_index(vol.index_to_world([3, 4, 0])), [3, 4, 8], atol=1e-9)
    expected = model.preset().apply(vol.array[0])
    for k in range(16):  # every slice of the slab is the original slice
        np.testing.assert_array_equal(emb.prepared.array[k, :48, :64], expected)


def test_too_small_image_gives_clear_error():
    with pytest.raises(ValueError, match="at least 16 voxels"):
        embed_volume(PoolModel(), blob_volume((40, 10, 40)), None)


def test_cache_reuse_and_invalidation(cache):
    net = tiny_aefm(0)
    model = TorchModel(net, CARD)
    vol = blob_volume()
    first = embed_volume(model, vol, cache)
    entry = cache.entry_dir(first.key)
    assert (entry / "coarse.npy").is_file()
    first.fine_block([10, 10, 10], [4, 4, 4])
    assert any((entry / "fine").glob("*.npy"))

    calls = []
    orig = model._run
    model._run = lambda x, want_fine: (calls.append(want_fine), orig(x, want_fine))[1]
    again = embed_volume(model, vol, cache)
    assert again.key == first.key and calls == []  # coarse map read from disk
    # The stage timings (benchmarks/results/embedding.md's breakdown): a fresh run times the network and the
    # blending, a cached one reads the map instead.
    stages = {"checks_s", "prepare_s", "hash_s", "cache_read_s"}
    assert set(first.timings) == stages | {"network_s", "blend_s", "windows", "cache_write_s"}
    assert first.timings["windows"] >= 1 and first.timings["network_s"] > 0
    assert set(again.timings) == stages and all(v >= 0 for v in again.timings.values())
    np.testing.assert_array_equal(again.coarse, first.coarse)
    np.testing.assert_array_equal(again.fine_block([10, 10, 10], [4, 4, 4]), first.fine_block([10, 10, 10], [4, 4, 4]))
    assert calls == [] and again.stats["tiles_from_disk"] > 0

    changed = vol.with_array(vol.array.copy())
    changed.array[5, 5, 5] += 1.0  # one voxel of the image
    assert image_hash(changed) != image_hash(vol)
    other = embed_volume(model, changed, cache)
    assert other.key != first.key and calls == [False] * len(calls) and len(calls) > 0

    other_model = TorchModel(tiny_aefm(1), CARD)  # different weights
    assert other_model.model_hash != model.model_hash
    assert embed_volume(other_model, vol, cache).key != first.key


def test_cache_evicts_least_recently_used(tmp_path):
    cache = EmbeddingCache(tmp_path / "c", budget_bytes=1 << 40)
    model = PoolModel()
    keys = [embed_volume(model, blob_volume(seed=s), cache).key for s in range(3)]
    sizes = [cache.size_bytes(k) for k in keys]
    import os
    import time

    for n, k in enumerate(keys):  # make access order explicit: keys[0] oldest
        os.utime(cache.entry_dir(k) / "coarse.npy", (time.time() - 100 + n, time.time() - 100 + n))
    cache.budget_bytes = sizes[1] + sizes[2]
    cache.evict()
    assert cache.size_bytes(keys[0]) == 0 and cache.size_bytes(keys[2]) == sizes[2]
    assert cache.size_bytes() <= cache.budget_bytes


def test_default_cache_dir_env(monkeypatch, tmp_path):
    from anatomical_embedding.inference.embedding import default_cache_dir

    monkeypatch.setenv("ANATOMICAL_EMBEDDING_CACHE", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ANATOMICAL_EMBEDDING_CACHE")
    assert default_cache_dir().name == "anatomical-embedding"
