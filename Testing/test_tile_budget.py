"""Fine-tile memory stays bounded for wide imported models (vox2vec / HDSSL: ~1000 fine channels).

Before: the viewer pre-computed a volume's fine tiles with ``fine_block(valid_start, valid_size)``, which
allocates channels x every voxel (8 GB for a 200x200x50 region at 1000 channels) and keeps up to 512 tiles of
65 MB each. Now tiles are computed one by one (``precompute_fine_tiles``) and memory holds at most the tile budget.
The network is a stand-in that returns 1000 channels (the class under test, ``VolumeEmbedding``, is real).
"""
from __future__ import annotations

import tracemalloc

import numpy as np

from anatomical_embedding.inference.embedding import EmbedConfig, EmbeddingCache, VolumeEmbedding
from anatomical_embedding.io import Volume

CHANNELS = 1000


class WideModel:
    """An embedding network's interface with 1000 fine channels (values do not matter here)."""

    fine_channels = CHANNELS
    coarse_channels = 8
    size_multiple = 8
    coarse_stride = 8
    spacing = np.array([2.0, 2.0, 2.0])

    def __init__(self):
        self.forwards = 0

    def embed_patch(self, x, want_fine=True):
        self.forwards += 1
        k, j, i = x.shape[2:]
        return None, np.ones((1, CHANNELS, k, j, i), np.float32)


def wide_embedding(shape_ijk, cache, budget):
    prepared = Volume(np.zeros(shape_ijk[::-1], np.float32), np.array([2.0, 2.0, 2.0]), np.zeros(3), np.eye(3))
    coarse = np.zeros((8,) + tuple(s // 8 for s in shape_ijk[::-1]), np.float32)
    config = EmbedConfig(fine_tile=8, fine_margin=4)
    return VolumeEmbedding(WideModel(), prepared, np.zeros(3, int), np.asarray(shape_ijk), coarse, "wide", config,
                           cache, tile_budget_bytes=budget)


def test_precompute_of_a_1000_channel_model_stays_within_the_tile_budget(tmp_path):
    shape = (64, 64, 32)
    budget = 64 << 20
    emb = wide_embedding(shape, EmbeddingCache(tmp_path / "cache"), budget)
    whole_block_bytes = CHANNELS * int(np.prod(shape)) * 4  # what fine_block over the image allocated (524 MB)
    assert emb.tile_bytes == CHANNELS * 8 ** 3 * 2
    assert emb.max_tiles_in_memory * emb.tile_bytes <= max(budget, 27 * emb.tile_bytes)
    tracemalloc.start()
    try:
        computed = emb.precompute_fine_tiles()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert computed == len(emb.all_tiles()) == 8 * 8 * 4
    window = CHANNELS * 16 ** 3 * 4  # one network output (tile + margins), float32
    print(f"\n1000-channel precompute of {shape}: peak {peak / 2**20:.0f} MB "
          f"(budget {budget / 2**20:.0f} MB; the whole-image block would be {whole_block_bytes / 2**20:.0f} MB)")
    assert peak < budget + 4 * window
    assert peak < whole_block_bytes / 4
    assert len(emb._tiles) <= emb.max_tiles_in_memory
    # A second precompute finds everything on disk and computes nothing; a match-sized block still reads fine.
    assert emb.precompute_fine_tiles() == 0
    block = emb.fine_block(np.array([30, 30, 10]), np.array([4, 4, 4]))
    assert block.shape == (CHANNELS, 4, 4, 4) and np.allclose(block, 1.0)


def test_tile_count_follows_the_budget_for_wide_models():
    narrow_tiles = wide_embedding((32, 32, 32), None, 1 << 30)
    # 1 GiB at 1000 channels x 8^3 x float16 (1 MB a tile): ~1000 tiles, capped by the count limit (512).
    assert narrow_tiles.max_tiles_in_memory == 512
    small = wide_embedding((32, 32, 32), None, 16 << 20)
    assert small.max_tiles_in_memory == 27  # the floor: a match reads a few neighbouring tiles
