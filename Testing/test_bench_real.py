"""Ground truth and point selection of ``benchmarks/bench_real.py`` (no real data needed).

The benchmark's intra-subject truth relies on SimpleITK's resampling convention (the transform maps points of the
output grid to the input): the moved image at ``q`` must show what the source shows at ``T(q)``. Checked here on a
small smooth volume with an oblique direction and anisotropic spacing, for the affine part, the B-spline part and
the composite the benchmark uses.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_real as br  # noqa: E402


def _oblique_volume(slices: int = 30, blobs: int = 12):
    """Smooth blobs on a 40 x 36 x ``slices`` grid, spacing (2.5, 2, 3) mm, rotated direction, non-zero origin."""
    from anatomical_embedding.io import Volume

    rng = np.random.default_rng(3)
    a, b = np.deg2rad(25.0), np.deg2rad(-15.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    vol = Volume(np.zeros((slices, 36, 40), np.float32), np.array([2.5, 2.0, 3.0]), np.array([-40.0, 25.0, 110.0]),
                 rz @ rx)
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in vol.array.shape], indexing="ij"), -1).reshape(-1, 3)
    world = vol.index_to_world(kji[:, ::-1].astype(float))
    centre = br.volume_centre(vol)
    arr = np.full(len(world), 100.0)
    reach = np.array([25.0, 25.0, 25.0 * slices / 30])  # (a rotated box: roughly along the slices)
    for _ in range(blobs):
        c = centre + rng.uniform(-reach, reach)
        arr += rng.uniform(200, 800) * np.exp(-np.sum((world - c) ** 2, 1) / (2 * rng.uniform(5, 9) ** 2))
    return vol.with_array(arr.reshape(vol.array.shape).astype(np.float32))


def _sample(volume, points):
    """Linear interpolation of a Volume at world points (scipy, independent of SimpleITK's resampling)."""
    from scipy.ndimage import map_coordinates

    ijk = volume.world_to_index(points)
    return map_coordinates(volume.array.astype(np.float64), ijk[:, ::-1].T, order=1, mode="nearest")


@pytest.mark.parametrize("parts", ["affine", "bspline", "composite"])
def test_moved_image_at_q_equals_source_at_T_of_q(parts):
    import SimpleITK as sitk

    vol = _oblique_volume()
    composite, params = br.random_transform(vol, seed=5)
    assert 0 < params["rotation_deg"] <= 10 and abs(params["scale"] - 1) <= 0.05
    assert np.linalg.norm(params["translation_mm"]) <= 20
    transform = {"affine": composite.GetNthTransform(0), "bspline": composite.GetNthTransform(1),
                 "composite": composite}[parts]
    if parts == "bspline":
        transform = sitk.BSplineTransform(transform)
    moved = br.deform(vol, transform)  # no intensity change: values must agree
    rng = np.random.default_rng(0)
    q = vol.index_to_world(rng.uniform(8, 22, (200, 3)) * [1.3, 1.2, 1.0])
    truth = br.map_points(transform, q)
    keep = br.inside_fov(vol, truth, 5.0) & br.inside_fov(moved, q, 5.0)
    assert keep.sum() > 50
    q, truth = q[keep], truth[keep]
    moved_at_q = _sample(moved, q)
    source_at_truth = _sample(vol, truth)
    source_at_q = _sample(vol, q)
    scale = np.ptp(vol.array)
    # Equal up to interpolation error (the moved image is itself linearly interpolated once) ...
    assert np.median(np.abs(moved_at_q - source_at_truth)) < 0.01 * scale
    # ... and clearly not what the inverse convention would give (a few mm here).
    assert np.median(np.abs(moved_at_q - source_at_q)) > 3 * np.median(np.abs(moved_at_q - source_at_truth))
    assert np.median(np.linalg.norm(truth - q, axis=1)) > {"affine": 3.0, "bspline": 0.8, "composite": 3.0}[parts]


def test_intensity_change_is_gain_offset_noise():
    vol = _oblique_volume()
    transform, _ = br.random_transform(vol, seed=1, bspline_sigma_mm=0.0)
    change = br.random_intensity(1, vol)
    assert 0.85 <= change["gain"] <= 1.15
    clean, noisy = br.deform(vol, transform), br.deform(vol, transform, change)
    residual = noisy.array - (change["gain"] * clean.array + change["offset"])
    assert abs(residual.std() - change["noise_sd"]) < 0.1 * change["noise_sd"]
    assert noisy.same_geometry(vol)


def test_structure_points_follow_the_rules():
    vol = _oblique_volume()
    mask = np.zeros(vol.array.shape, bool)
    mask[4:-4, 4:-4, 4:-4] = True  # "body"
    score = br.local_contrast(vol)
    valid = lambda p: br.inside_fov(vol, p, 10.0)  # noqa: E731
    pts = br.select_structure_points(vol, n=40, min_distance_mm=20.0, valid=valid, mask=mask, score=score)
    assert 3 <= len(pts) <= 40
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1) + np.eye(len(pts)) * 1e9
    assert d.min() >= 20.0
    assert valid(pts).all()
    kji = np.round(vol.world_to_index(pts)[:, ::-1]).astype(int)
    assert mask[tuple(kji.T)].all()
    # Picked greedily by decreasing contrast, and the first is the best valid local maximum.
    s = score[tuple(kji.T)]
    assert np.all(np.diff(s) <= 1e-9)
    inside = mask & valid(vol.index_to_world(np.argwhere(np.ones(mask.shape, bool))[:, ::-1].astype(float))
                          ).reshape(mask.shape)
    assert s[0] == pytest.approx(score[inside].max(), rel=1e-6)
    # At most n points, and fewer when the spacing rule leaves no room.
    assert len(br.select_structure_points(vol, n=2, valid=valid, mask=mask, score=score)) == 2
    sparse = br.select_structure_points(vol, n=40, min_distance_mm=200.0, valid=valid, mask=mask, score=score)
    assert len(sparse) == 1


def test_body_mask_excludes_air_and_the_skin_rim():
    from anatomical_embedding.io import Volume

    arr = np.full((30, 40, 40), -1000.0, np.float32)
    zz, yy, xx = np.ogrid[:30, :40, :40]
    body = ((yy - 20) ** 2 + (xx - 20) ** 2 < 15 ** 2)
    arr[np.broadcast_to(body, arr.shape)] = 40.0
    lung = ((yy - 20) ** 2 + (xx - 14) ** 2 < 4 ** 2) & (zz > 3)  # air inside the body, open at the top
    arr[np.broadcast_to(lung, arr.shape)] = -850.0
    vol = Volume(arr, np.array([2.0, 2.0, 2.0]))
    mask = br.body_mask(vol, erode_mm=6.0)
    assert not mask[:, 0, 0].any() and not mask[15, 20, 2].any()   # air, and the rim 6 mm inside the skin
    assert mask[15, 20, 20] and mask[15, 20, 14]                      # tissue and the filled "lung"


def test_brain_mask_poles_and_label_centroids():
    from anatomical_embedding.io import Volume

    arr = np.zeros((20, 30, 40), np.uint8)
    arr[5:15, 10:20, 10:30] = 1
    vol = Volume(arr, np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.0]))
    pts = br.brain_mask_points(vol)
    np.testing.assert_allclose(pts["brain_centroid"], [19.5, 14.5, 9.5])
    assert pts["anterior_pole"][1] < pts["brain_centroid"][1] < pts["posterior_pole"][1]
    assert pts["right_pole"][0] < pts["left_pole"][0] and pts["superior_pole"][2] > 12
    cents = br.label_centroids(vol.with_array(arr * 7), [7, 8])
    assert set(cents) == {7}
    np.testing.assert_allclose(cents[7], pts["brain_centroid"])


def test_missing_data_fails_with_one_line(tmp_path, capsys):
    rc = br.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found" in err[0]


def test_parity_of_two_models_counts_points_within_one_voxel():
    """``parity_real.py``: point-by-point comparison of two models' predictions (hand-made records)."""
    import parity_real

    truth = np.zeros((3, 3))
    ref = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    cand = ref + np.array([[3.9, -3.9, 0.0], [4.5, 0.0, 0.0], [0.0, 0.0, -1.0]])  # 2nd is off by > 4 mm on i
    records = [{"group": "intra CT", "pair": "p", "method": f"{m} raw", "predicted_lps": p.tolist(),
                "errors_mm": np.linalg.norm(p - truth, axis=1).tolist()} for m, p in (("a", ref), ("b", cand))]
    records.append({"group": "intra CT", "pair": "p", "method": "identical coordinates", "errors_mm": [1, 1, 1]})
    (row,) = parity_real.parity(records, "a", "b", 4.0)
    assert (row["group"], row["variant"], row["points"], row["within_one_voxel"]) == ("intra CT", "raw", 3, 2)
    assert row["shift_max_mm"] == pytest.approx(np.hypot(3.9, 3.9)) and row["shift_median_mm"] == pytest.approx(4.5)
    assert row["error_reference_mm"] == pytest.approx(np.mean([0, 10, 5]))


def test_fewshot_real_labels_and_rotating_splits():
    """``bench_fewshot_real.py``: BraTS labels become brain (mask without tumour) and tumour (labels 1-4); each
    rotation labels consecutive cases and tests on all the others."""
    import bench_fewshot_real as bf

    ot = np.array([0, 1, 2, 3, 4, 0, 0])
    mask = np.array([0, 1, 1, 1, 1, 1, 0])
    assert bf.label_map(ot, mask).tolist() == [0, 2, 2, 2, 2, 1, 0]
    assert bf.splits(6, 3, 2) == [([0, 1, 2], [3, 4, 5]), ([1, 2, 3], [0, 4, 5])]
    assert bf.splits(6, 5, 3)[2] == ([2, 3, 4, 5, 0], [1])
    assert all(set(a).isdisjoint(b) and len(a) + len(b) == 6 for a, b in bf.splits(6, 1, 6))


def test_slab_pairs_reuse_the_intra_pairs_and_keep_the_points_inside_the_slab():
    from types import SimpleNamespace

    vol = _oblique_volume(slices=80)  # 80 slices of 3 mm
    case = br.Case("blobs", "CT", "-", vol)
    # The intra pairs do not change when slab pairs are added (greedy selection: a prefix of the longer list).
    plain = br.intra_pairs(case, 3, 2, 0)
    mixed = br.intra_pairs(case, 3, 2, 0, slab_mm=60.0)
    intra = [p for p in mixed if p.group == "intra CT"]
    assert [p.name for p in intra] == [p.name for p in plain]
    for a, b in zip(intra, plain):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.truth, b.truth)
        assert a.info == b.info
    # One slab per transform: below, at and above the centre; only the points whose truth is 5 mm inside it.
    truth = vol.index_to_world(np.array([[20.0, 18.0, k] for k in range(0, 80, 2)]))
    k = SimpleNamespace(moved=vol, points=truth + 3.0, truth=truth, info={"n_points": len(truth)})
    for t, k0 in enumerate([20, 30, 40]):  # (80 - 20) // 2 + (t - 1) * 10
        (s,) = br.slab_pair(case, t, k, 60.0)
        assert s.group == "slab CT" and s.info["slab_first_k"] == k0 and s.info["slab_mm"] == 60.0
        np.testing.assert_array_equal(s.target.array, vol.array[k0:k0 + 20])
        np.testing.assert_allclose(s.target.index_to_world(np.zeros(3)), vol.index_to_world(np.array([0, 0, k0])))
        # 5 mm inside 20 slices of 3 mm: slices k0 + 2 .. k0 + 17, every other one holds a point.
        expect = [kk for kk in range(0, 80, 2) if k0 + 5 / 3 <= kk <= k0 + 19 - 5 / 3]
        np.testing.assert_allclose(vol.world_to_index(s.truth)[:, 2], expect, atol=1e-9)
        np.testing.assert_allclose(s.points, s.truth + 3.0)
        assert s.source is vol and s.info["n_points"] == len(expect)
    # A volume shorter than two slabs gets none.
    assert br.slab_pair(case, 0, k, 125.0) == []  # 42 slices: 84 > 80


def test_time_floor_summary_is_the_hand_computation_and_missing_data_fails_with_one_line(tmp_path, capsys):
    import bench_real_floor as bf

    records = [{"group": "intra MR", "affine_s": 1.0, "product_s": 3.0, "floor_s": 0.5, "ns_per_voxel": 100.0},
               {"group": "intra MR", "affine_s": 2.0, "product_s": 1.0, "floor_s": 3.0, "ns_per_voxel": 300.0},
               {"group": "intra CT", "affine_s": 1.0, "product_s": 2.0, "floor_s": 1.5, "ns_per_voxel": 50.0}]
    rows = {r["group"]: r for r in bf.summarise(records)}
    mr = rows["intra MR"]
    assert (mr["pairs"], mr["affine_s"], mr["product_s"], mr["floor_s"]) == (2, 1.5, 2.0, 1.75)
    assert mr["floor_over_affine"] == pytest.approx((0.5 / 1.0 + 3.0 / 2.0) / 2)
    assert (mr["pairs_floor_below_affine"], mr["pairs_product_below_affine"], mr["network_ns_per_voxel"]) == (1, 1, 200)
    assert (rows["intra CT"]["pairs_floor_below_affine"], rows["intra CT"]["pairs_product_below_affine"]) == (0, 0)
    assert bf.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0]


def test_time_floor_is_one_pass_over_the_whole_prepared_image():
    import bench_real_floor as bf
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import EmbedConfig, prepare_volume

    model = open_model(bf.MODELS / "default_mr.aemodel", threads=1)
    vol = _oblique_volume()
    floor = bf.NetworkFloor(model, EmbedConfig.dense(min_size=8))
    seconds = floor.image("a", vol)
    assert seconds > 0 and floor.image("a", vol) == seconds  # measured once per image
    prepared, _, _ = prepare_volume(model, vol, EmbedConfig.dense(min_size=8))
    assert floor.voxels["a"] == prepared.array.size and prepared.array.size % model.size_multiple ** 3 == 0


def test_confidence_summary_counts_false_alarms_and_caught_errors_per_rule():
    import bench_real_confidence as bc

    rec = lambda group, err, sim, fb: {"group": group, "errors_mm": np.array(err),  # noqa: E731
                                       "low": {"similarity": np.array(sim), "forward-backward": np.array(fb)}}
    records = [rec("intra MR", [0.5, 2.9, 3.1, 12.0], [False, True, True, True], [True, True, False, False]),
               rec("intra MR", [1.0, 40.0], [False, False], [True, True]),
               rec("cross CT", [25.0], [True], [False])]
    rows = {r["group"]: r for r in bc.summarise(records)}
    mr = rows["intra MR"]  # correct: 0.5, 2.9, 1.0 (3.1 is neither); wrong: 12, 40
    assert (mr["pairs"], mr["points"], mr["good"], mr["bad"]) == (2, 6, 3, 2)
    assert (mr["similarity flagged good"], mr["forward-backward flagged good"]) == (1, 3)
    assert (mr["similarity flagged bad"], mr["forward-backward flagged bad"]) == (1, 1)
    assert list(rows) == ["intra MR", "cross CT"]  # bench_real's group order
    assert (rows["cross CT"]["similarity flagged bad"], rows["cross CT"]["forward-backward flagged bad"]) == (1, 0)
    assert bc._share(1, 4) == "1 of 4 (25.0 %)" and bc._share(0, 0) == "0 of 0"


def test_confidence_flags_equal_what_each_rule_gives_the_matcher():
    import bench_real_confidence as bc
    from test_embedding import PoolModel, blob_volume

    from anatomical_embedding.inference.embedding import embed_volume
    from anatomical_embedding.inference.matching import MatchConfig, Matcher

    src = blob_volume((40, 48, 56), seed=7)
    tgt = src.with_array(src.array.copy())
    tgt.origin = src.origin + np.array([6.0, 4.0, -4.0])
    es, et = embed_volume(PoolModel(), src), embed_volume(PoolModel(), tgt)
    pts = src.index_to_world(np.argwhere(np.ones((3, 3, 2))) * [10.0, 12.0, 10.0] + [12.0, 10.0, 12.0])
    new = Matcher(es, et)
    out_new = new.match(pts, with_raw=False)
    out_old = Matcher(es, et, MatchConfig(refined_confidence="forward-backward")).match(pts, with_raw=False)
    assert new.prior.refined is not None and {m.final.method for m in out_new} == {"prior"}
    f = bc.flags(new, out_new)
    assert f["similarity"].tolist() == [m.final.low_confidence for m in out_new]
    assert f["forward-backward"].tolist() == [m.final.low_confidence for m in out_old]
