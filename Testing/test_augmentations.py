"""Models-Genesis appearance augmentations (HDSSL): each operation changes only what it should, and the chain
is deterministic given its generator and follows the configured probabilities."""
from __future__ import annotations

import numpy as np
import pytest

from anatomical_embedding.data.augment_hdssl import (
    GenesisConfig,
    bezier_curve,
    bezier_intensity,
    genesis_augment,
    in_paint,
    local_pixel_shuffle,
    out_paint,
)

SHAPE = (16, 40, 36)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(SHAPE).astype(np.float32)


def _union(boxes, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for box in boxes:
        mask[box] = True
    return mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_pixel_shuffle_permutes_within_blocks_only(seed):
    x = _image(seed)
    out, blocks = local_pixel_shuffle(x, np.random.default_rng(seed), block_fraction=0.1, coverage=0.3)
    assert out.shape == x.shape and out.dtype == np.float32
    assert blocks, "coverage 0.3 of a 40-cell grid chose no block"
    inside = _union(blocks)
    assert inside.sum() == sum(int(np.prod([s.stop - s.start for s in b])) for b in blocks)  # disjoint
    for box in blocks:
        sides = [s.stop - s.start for s in box]
        assert sides == [max(2, round(0.1 * n)) for n in SHAPE]
        # The block's intensity histogram (multiset of values) is kept exactly ...
        np.testing.assert_array_equal(np.sort(out[box], axis=None), np.sort(x[box], axis=None))
    # ... and nothing outside the blocks moves, while inside the texture does change.
    np.testing.assert_array_equal(out[~inside], x[~inside])
    assert (out[inside] != x[inside]).mean() > 0.5
    np.testing.assert_array_equal(x, _image(seed))  # input untouched


def test_local_pixel_shuffle_is_deterministic_and_covers_about_the_requested_fraction():
    x = _image(3)
    a, blocks_a = local_pixel_shuffle(x, np.random.default_rng(5), coverage=0.3)
    b, blocks_b = local_pixel_shuffle(x, np.random.default_rng(5), coverage=0.3)
    np.testing.assert_array_equal(a, b)
    assert blocks_a == blocks_b
    big = np.random.default_rng(0).random((32, 128, 128)).astype(np.float32)
    fractions = [_union(local_pixel_shuffle(big, np.random.default_rng(s))[1], big.shape).mean() for s in range(4)]
    assert 0.2 < np.mean(fractions) < 0.33  # grid cells chosen with p = 0.3 (edge remainders never)


def test_bezier_curve_hits_its_end_points_and_intensity_map_is_monotone():
    pts = np.array([[0.0, 0.0], [0.2, 0.9], [0.7, 0.1], [1.0, 1.0]])
    xv, yv = bezier_curve(pts, n_times=11)
    assert (xv[0], yv[0]) == (1.0, 1.0) and (xv[-1], yv[-1]) == (0.0, 0.0)
    # Middle sample (t = 0.5) by hand: Bernstein weights 1/8, 3/8, 3/8, 1/8.
    assert xv[5] == pytest.approx((0 + 3 * 0.2 + 3 * 0.7 + 1) / 8)
    assert yv[5] == pytest.approx((0 + 3 * 0.9 + 3 * 0.1 + 1) / 8)
    x = _image(4)
    for seed in range(5):
        y = bezier_intensity(x, np.random.default_rng(seed))
        order = np.argsort(x, axis=None)
        assert np.all(np.diff(y.reshape(-1)[order]) >= -1e-6)  # order-preserving
        assert y.min() >= 0.0 and y.max() <= 1.0
        assert not np.allclose(y, x, atol=1e-3)
    ends = bezier_intensity(np.array([0.0, 1.0], dtype=np.float32), np.random.default_rng(0))
    np.testing.assert_allclose(ends, [0.0, 1.0], atol=1e-6)
    inverted = bezier_intensity(np.array([0.0, 1.0], dtype=np.float32), np.random.default_rng(0), invert_prob=1.0)
    np.testing.assert_allclose(inverted, [1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_in_paint_fills_only_its_boxes_with_uniform_noise(seed):
    x = np.full(SHAPE, 5.0, dtype=np.float32)  # outside [0, 1): every painted voxel is visible
    out, boxes = in_paint(x, np.random.default_rng(seed))
    painted = _union(boxes)
    assert boxes and len(boxes) <= 30
    for box in boxes:
        for s, n in zip(box, SHAPE):
            assert max(1, n // 10) <= s.stop - s.start < max(max(1, n // 10) + 1, n // 5) and 0 <= s.start and s.stop <= n
    np.testing.assert_array_equal(out[~painted], x[~painted])
    assert np.all((out[painted] >= 0.0) & (out[painted] < 1.0))
    np.testing.assert_array_equal(x, 5.0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_out_paint_keeps_only_its_boxes(seed):
    x = np.full(SHAPE, 5.0, dtype=np.float32)
    out, kept = out_paint(x, np.random.default_rng(seed))
    inside = _union(kept)
    assert 1 <= len(kept) <= 5
    for box in kept:
        for s, n in zip(box, SHAPE):
            assert n - 4 * n // 7 <= s.stop - s.start <= n - 3 * n // 7
    np.testing.assert_array_equal(out[inside], 5.0)
    assert np.all((out[~inside] >= 0.0) & (out[~inside] < 1.0))


def test_genesis_chain_is_deterministic_and_follows_its_probabilities():
    x = _image(6)
    a = genesis_augment(x, np.random.default_rng(11))
    np.testing.assert_array_equal(a, genesis_augment(x, np.random.default_rng(11)))
    assert not np.array_equal(a, genesis_augment(x, np.random.default_rng(12)))
    off = GenesisConfig(shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=0.0)
    np.testing.assert_array_equal(genesis_augment(x, np.random.default_rng(0), off), x)
    # Painting only: out-painting (noise over > 25 % of the patch) in about outpaint_share of the samples.
    paint_only = GenesisConfig(shuffle_prob=0.0, nonlinear_prob=0.0, paint_prob=1.0, outpaint_share=0.2)
    const = np.full(SHAPE, 5.0, dtype=np.float32)
    noise_share = [(genesis_augment(const, np.random.default_rng(s), paint_only) != 5.0).mean() for s in range(300)]
    out_rate = np.mean([f > 0.25 for f in noise_share])
    assert 0.12 < out_rate < 0.28
    # Shuffle only with p = 0.8: a permutation of the values in ~80 % of the samples.
    shuffle_only = GenesisConfig(shuffle_prob=0.8, nonlinear_prob=0.0, paint_prob=0.0)
    changed = [not np.array_equal(genesis_augment(x, np.random.default_rng(s), shuffle_only), x) for s in range(200)]
    assert 0.7 < np.mean(changed) < 0.9
