"""Warming fine tiles ahead of clicks (issue 22): ``VolumeEmbedding.warm_tiles`` / ``tiles_near`` and
``Matcher.likely_tiles``. Warming never changes a match, a warmed click computes no tile, and a warming thread
next to a matching thread computes no tile twice."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from test_embedding import CARD, blob_volume, tiny_aefm

from anatomical_embedding.inference.backends import TorchModel
from anatomical_embedding.inference.embedding import EmbedConfig, EmbeddingCache, embed_volume
from anatomical_embedding.inference.matching import Matcher

#: A smaller context than the engine default keeps each tile's window at 32^3 (fast on a shared CPU).
CONFIG = EmbedConfig(fine_margin=8)
SHIFT = np.array([6.0, -4.0, 2.0])


@pytest.fixture(scope="module")
def model():
    return TorchModel(tiny_aefm(0), CARD)


@pytest.fixture(scope="module")
def volumes():
    """A source and a shifted, slightly changed target (so the prior and the search have real work)."""
    src = blob_volume((40, 48, 56), seed=3)
    tgt = src.with_array(src.array + 0.1 * blob_volume((40, 48, 56), seed=4).array)
    tgt.origin = src.origin + SHIFT
    points = src.index_to_world(np.array([[14.0, 16.0, 12.0], [40.0, 30.0, 26.0]]))
    return src, tgt, points


def fresh_matcher(model, volumes, cache=None) -> Matcher:
    src, tgt, _ = volumes
    return Matcher(embed_volume(model, src, cache, CONFIG), embed_volume(model, tgt, cache, CONFIG))


def results(matches) -> list:
    """Everything a match reports, for exact comparison."""
    out = []
    for r in matches:
        for m in (r.raw, r.corrected):
            out.append(None if m is None else (m.point_lps.tolist(), m.similarity, m.coarse_similarity,
                                               m.fine_similarity, m.confidence, m.fb_distance_mm, m.method))
    return out


def computed(matcher: Matcher) -> tuple:
    return tuple((e.stats["tiles_computed"], e.stats["fine_forwards"]) for e in (matcher.source, matcher.target))


def warm(matcher: Matcher, points: np.ndarray, **kwargs) -> int:
    return sum(emb.warm_tiles(tiles) for emb, tiles in matcher.likely_tiles(points, **kwargs))


def test_tiles_near_orders_by_distance_within_the_radius(model, volumes):
    emb = embed_volume(model, volumes[0], None, CONFIG)
    p = volumes[0].index_to_world(np.array([[20.0, 20.0, 20.0]]))
    assert emb.tiles_near(p, 0.0) == [(1, 1, 1)]  # the tile that holds the point (16 voxels a tile)
    near = emb.tiles_near(p, 20.0)
    t = np.asarray(near)
    gap = np.maximum(t * 16 - 20, 0) + np.maximum(20 - (t * 16 + 15), 0)
    dist = np.linalg.norm(gap * 2.0, axis=1)  # 2 mm voxels
    assert np.all(np.diff(dist) >= 0) and dist.max() <= 20.0 and len(near) < len(emb.all_tiles())
    assert set(emb.tiles_near(p, 1e6)) == set(emb.all_tiles())


def test_warming_never_changes_a_result(model, volumes):
    _, _, points = volumes
    cold = results(fresh_matcher(model, volumes).match(points))
    warmed = fresh_matcher(model, volumes)
    assert warm(warmed, points, with_raw=True) > 0
    assert results(warmed.match(points)) == cold
    everything = fresh_matcher(model, volumes)
    for emb in (everything.source, everything.target):
        assert emb.precompute_fine_tiles() == len(emb.all_tiles())
    assert results(everything.match(points)) == cold


def test_a_click_on_a_warmed_point_computes_no_tile(model, volumes):
    points = volumes[2][:1]  # one point near a corner: its likely tiles are a part of the image
    matcher = fresh_matcher(model, volumes)
    chunks = matcher.likely_tiles(points)  # the viewer's path: prior, no raw search
    assert [e for e, _ in chunks] == [matcher.source, matcher.target] * len(points)
    for emb in (matcher.source, matcher.target):
        wanted = {t for e, tiles in chunks if e is emb for t in tiles}
        assert 0 < len(wanted) < len(emb.all_tiles())  # warming only around the likely clicks
    for emb, tiles in chunks:
        emb.warm_tiles(tiles)
    before = computed(matcher)
    for p in points:  # the first click at each warmed point
        matcher.match(p, with_raw=False)
    assert computed(matcher) == before


def test_a_warming_thread_next_to_clicks_computes_no_tile_twice(model, volumes):
    _, _, points = volumes
    cold = results(fresh_matcher(model, volumes).match(points, with_raw=False))
    for round_ in range(2):
        matcher = fresh_matcher(model, volumes)
        chunks = matcher.likely_tiles(points)  # the same tiles the clicks want, so the two threads collide
        start = threading.Event()
        errors = []

        def warming():
            start.wait()
            try:
                for emb, tiles in chunks:
                    emb.warm_tiles(tiles)
            except Exception as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        thread = threading.Thread(target=warming)
        thread.start()
        start.set()
        got = results(matcher.match(points, with_raw=False))
        thread.join(timeout=120)
        assert not thread.is_alive() and not errors
        assert got == cold
        for emb in (matcher.source, matcher.target):
            # No disk cache and room for every tile: nothing is evicted, so one forward per tile in memory.
            assert emb.max_tiles_in_memory >= len(emb.all_tiles())
            assert emb.stats["tiles_computed"] == emb.stats["fine_forwards"] == len(emb.tiles_in_memory())


def test_warming_respects_the_memory_budget_and_the_disk_cache(model, volumes, tmp_path):
    src = volumes[0]
    emb = embed_volume(model, src, None, CONFIG)
    emb_small = type(emb)(emb.model, emb.prepared, emb.valid_start, emb.valid_size, emb.coarse, emb.key, emb.config,
                          None, max_tiles_in_memory=27)
    tiles = emb_small.all_tiles()
    assert len(tiles) > 27
    # No disk cache: only the most wanted tiles that fit in memory (more would evict the first ones).
    assert emb_small.warm_tiles(tiles) == 27 and emb_small.tiles_in_memory() == tiles[:27]

    cache = EmbeddingCache(tmp_path / "cache")
    cached = embed_volume(model, src, cache, CONFIG)
    cached = type(cached)(cached.model, cached.prepared, cached.valid_start, cached.valid_size, cached.coarse,
                          cached.key, cached.config, cache, max_tiles_in_memory=27)
    clicked = cached.tiles_near(src.index_to_world(np.array([[50.0, 40.0, 30.0]])), 0.0)
    cached.ensure_tiles(clicked)
    # With a disk cache every tile is computed once; a full memory keeps the clicked tiles (warming never evicts).
    assert cached.warm_tiles(reversed(tiles)) == len(tiles) - len(clicked)
    assert set(clicked) <= set(cached.tiles_in_memory()) and len(cached.tiles_in_memory()) == 27
    assert all(cache.has_tile(cached.key, t) for t in tiles)
    assert cached.warm_tiles(tiles) == 0
