"""Bad input and faults, as a careless user drives the CLI (issue 21): each case gives one clear line and
exit 2 (or a warning), writes nothing and loses nothing.

The README's bad-input table is generated from these tests (``Testing/bad_input_table.py``): every test's
first docstring line reads "input -> what happens".
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from test_embedding import CARD, blob_volume, tiny_aefm

from anatomical_embedding.cli.app import main
from anatomical_embedding.inference.backends import TorchModel
from anatomical_embedding.inference.embedding import EmbeddingCache, embed_volume
from anatomical_embedding.io import write_image


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from anatomical_embedding.inference.export import export_embedder

    return export_embedder(tiny_aefm(0), CARD, tmp_path_factory.mktemp("pkg") / "tiny.aemodel")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("imgs")
    vol = blob_volume((20, 40, 30))
    write_image(vol, root / "a.nrrd")
    shifted = vol.with_array(vol.array)
    shifted.origin = vol.origin + np.array([6.0, -4.0, 2.0])
    write_image(shifted, root / "b.nrrd")
    nan = vol.array.copy()
    nan[10, 20, 15] = np.nan
    write_image(vol.with_array(nan), root / "nan.nrrd")
    return {"a": root / "a.nrrd", "b": root / "b.nrrd", "nan": root / "nan.nrrd"}


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def _match_args(package, images, tmp_path, *extra: str) -> list[str]:
    return ["match", "--model", str(package), "--source", str(images["a"]), "--target", str(images["b"]),
            "--point=30,40,20", "--frame", "LPS", "--cache", str(tmp_path / "cache"), *extra]


# ---- 0. a hopeless point falls back to its raw match ------------------------------------------------
def test_prior_with_empty_search_region_falls_back_to_raw_match(images, caplog):
    """Prior whose search region misses the target for a point -> that point keeps its raw match, flagged low-confidence; the batch goes on."""
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.inference.prior import RobustPrior
    from anatomical_embedding.io import read_image

    model = TorchModel(tiny_aefm(0), CARD)
    src = embed_volume(model, read_image(images["a"]))
    tgt = embed_volume(model, read_image(images["b"]))
    matcher = Matcher(src, tgt)
    far = np.eye(4)
    far[:3, :3] *= 2.0  # a degenerate affine: points far from the origin land outside the target
    matcher._prior = RobustPrior(far, None, 1.0, 5.0, 100, 50, 7)
    pts = src.source.index_to_world(np.array([[1.0, 1.0, 1.0], [25.0, 35.0, 15.0]]))
    with caplog.at_level(logging.WARNING):
        res = matcher.match(pts)
    assert len(res) == 2
    assert res[1].corrected is None and res[1].final.low_confidence and res[1].final.method == "raw-fallback"
    assert "raw match" in caplog.text


def test_degenerate_prior_fit_is_refused():
    """Robust prior fitted from 7 inliers with scales near 2 -> refused with a warning; raw matching is used."""
    from anatomical_embedding.inference.prior import PriorConfig, check_fit

    cfg = PriorConfig()
    check_fit(np.eye(4), 40, 60, cfg)  # a sound fit passes
    scaled = np.diag([2.0, 1.9, 2.1, 1.0])
    with pytest.raises(ValueError, match="7 inliers.*scales"):
        check_fit(scaled, 7, 60, cfg)
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="mirroring"):
        check_fit(mirrored, 40, 60, cfg)
    with pytest.raises(ValueError, match="inlier fraction"):
        check_fit(np.eye(4), 20, 200, cfg)


# ---- 1. NaN images ----------------------------------------------------------------------------------
def test_nan_image_is_refused_and_never_cached(package, images, tmp_path, capsys):
    """Image with one NaN voxel (embed, match) -> exit 2 counting the NaN voxels; nothing cached or written; --replace-nonfinite replaces them."""
    out = tmp_path / "e.npz"
    cache = tmp_path / "cache"
    args = ["embed", "--model", str(package), "--image", str(images["nan"]), "--cache", str(cache)]
    assert main(args + ["--out", str(out)]) == 2
    err = _err(capsys)
    assert "1 of 24000 voxels are NaN" in err and "--replace-nonfinite" in err
    assert not out.exists() and not list(cache.glob("*/coarse.npy"))
    assert main(["match", "--model", str(package), "--source", str(images["nan"]), "--target", str(images["b"]),
                 "--point=30,40,20", "--frame", "LPS", "--no-prior", "--cache", str(cache)]) == 2
    err = _err(capsys)
    assert "nan.nrrd" in err and "prior" not in err and "target" not in err
    assert main(args + ["--out", str(out), "--replace-nonfinite"]) == 0
    with np.load(out) as z:
        assert np.isfinite(z["coarse"]).all()


def test_cache_refuses_non_finite_maps(tmp_path):
    """Non-finite embedding map -> never written to the cache (and a poisoned cache file is ignored)."""
    cache = EmbeddingCache(tmp_path / "c", budget_bytes=1 << 30)
    bad = np.full((2, 2, 2, 2), np.nan, np.float32)
    with pytest.raises(ValueError, match="non-finite"):
        cache.save_coarse("k" * 40, bad, {})
    cache._save(cache.entry_dir("k" * 40) / "coarse.npy", bad)  # as an older version would have
    assert cache.load_coarse("k" * 40) is None
    cache.save_tile("k" * 40, (0, 0, 0), bad)
    assert cache.load_tile("k" * 40, (0, 0, 0)) is None


# ---- 2. invalid numeric settings ----------------------------------------------------------------------
@pytest.mark.parametrize("setting, text", [
    ("train.max_steps=-5", "train.max_steps=-5 is out of range; valid: >= 0"),
    ("train.batch_size=0", "train.batch_size=0 is out of range; valid: >= 1"),
    ("train.ckpt_every=0", "train.ckpt_every=0 is out of range; valid: >= 1"),
    ("method.n_pos=0", "method.n_pos=0 is out of range; valid: >= 1"),
    ("method.patch_size=[64,0,64]", "method.patch_size=0 is out of range; valid: >= 16"),
])
def test_invalid_train_settings_are_refused_before_training(setting, text, tmp_path, capsys):
    """--set train.max_steps=-5, train.batch_size=0, train.ckpt_every=0, method.n_pos=0 -> exit 2 naming the setting, its value and the valid range, before any step."""
    out = tmp_path / "run"
    assert main(["train", "--method", "aefm", "--data", str(tmp_path / "nowhere"), "--out", str(out),
                 "--set", setting]) == 2
    assert text in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra, text", [
    (["--hidden", "-1"], "--hidden=-1 is out of range; valid: >= 0"),
    (["--voxels-per-class", "0"], "--voxels-per-class=0 is out of range; valid: >= 1"),
])
def test_invalid_fewshot_arguments_are_refused(extra, text, package, images, tmp_path, capsys):
    """fewshot train --hidden -1 or --voxels-per-class 0 -> exit 2 naming the argument and the valid range."""
    assert main(["fewshot", "train", "--model", str(package), "--images", str(images["a"]), "--labels",
                 str(images["a"]), "--out", str(tmp_path / "h.aehead"), *extra]) == 2
    assert text in _err(capsys)


@pytest.mark.parametrize("extra, text", [
    (["--top-k", "0"], "--top-k=0 is out of range; valid: >= 1"),
    (["--top-k", "-2"], "--top-k=-2 is out of range"),
    (["--cache-budget-gb", "-1"], "--cache-budget-gb=-1.0 is out of range; valid: >= 0.0"),
    (["--max-window-voxels", "100"], "--max-window-voxels=100 is out of range; valid: >= 4096"),
])
def test_invalid_match_arguments_are_refused(extra, text, package, images, tmp_path, capsys):
    """match --top-k 0 (or negative), --cache-budget-gb -1, --max-window-voxels 100 -> exit 2 naming the argument and the valid range."""
    assert main(_match_args(package, images, tmp_path, *extra)) == 2
    err = _err(capsys)
    assert text in err and "prior" not in err


def test_config_dataclasses_declare_ranges():
    """A FewShotConfig, MatchConfig or EmbedConfig built in code with a bad value -> ValueError naming the field."""
    from anatomical_embedding.fewshot.head import FewShotConfig
    from anatomical_embedding.inference.matching import MatchConfig

    with pytest.raises(ValueError, match="batch_size=0"):
        FewShotConfig(batch_size=0)
    with pytest.raises(ValueError, match="top_k=0"):
        MatchConfig(top_k=0)
    from anatomical_embedding.inference.embedding import EmbedConfig

    with pytest.raises(ValueError, match="max_window_voxels=-5 is out of range"):
        EmbedConfig(max_window_voxels=-5)


# ---- 4. outputs checked before the work -------------------------------------------------------------
def test_match_checks_every_output_before_work(package, images, tmp_path, capsys):
    """match --out new.mrk.json --heatmap EXISTING (or --report EXISTING, or --out x.txt) -> exit 2 before any work; new.mrk.json is not written."""
    existing, old_report = tmp_path / "old.nrrd", tmp_path / "old.json"
    existing.write_text("keep me")
    old_report.write_text("keep me")
    new = tmp_path / "new.mrk.json"
    cache = tmp_path / "cache"
    for extra in (["--heatmap", str(existing)], ["--report", str(old_report)]):
        assert main(_match_args(package, images, tmp_path, "--out", str(new), *extra)) == 2
        assert "exists; choose another name or pass --overwrite" in _err(capsys)
        assert not new.exists() and existing.read_text() == "keep me"
    assert main(_match_args(package, images, tmp_path, "--out", str(tmp_path / "x.txt"))) == 2
    assert ".mrk.json" in _err(capsys)
    assert not cache.exists()  # nothing was embedded
    # The retry with good names writes all three.
    rep, hm = tmp_path / "r.json", tmp_path / "h.nrrd"
    assert main(_match_args(package, images, tmp_path, "--out", str(new), "--report", str(rep),
                            "--heatmap", str(hm))) == 0
    assert new.is_file() and rep.is_file() and hm.is_file()


def test_embed_export_fewshot_check_outputs_first(package, images, tmp_path, capsys):
    """embed --out EXISTING or x.txt, export --out EXISTING, fewshot apply --out EXISTING -> exit 2 before any work."""
    existing = tmp_path / "e.npz"
    existing.write_text("keep me")
    cache = tmp_path / "cache"
    base = ["embed", "--model", str(package), "--image", str(images["a"]), "--cache", str(cache)]
    assert main(base + ["--out", str(existing)]) == 2
    assert "--overwrite" in _err(capsys)
    assert main(base + ["--out", str(tmp_path / "x.txt")]) == 2
    assert ".npz" in _err(capsys)
    assert not cache.exists()
    pkg = tmp_path / "p.aemodel"
    pkg.write_text("keep me")
    assert main(["export", "--run", str(tmp_path / "no-run"), "--out", str(pkg)]) == 2
    assert "exists" in _err(capsys) and pkg.read_text() == "keep me"
    seg = tmp_path / "seg.nrrd"
    seg.write_text("keep me")
    assert main(["fewshot", "apply", "--head", str(tmp_path / "no.aehead"), "--image", str(images["a"]),
                 "--out", str(seg)]) == 2
    assert "exists" in _err(capsys) and seg.read_text() == "keep me"


def test_overwrite_message_speaks_cli_language(tmp_path):
    """An existing output without --overwrite -> the message names --overwrite (not overwrite=True)."""
    from anatomical_embedding.io import atomic_write

    p = tmp_path / "f.txt"
    p.write_text("x")
    with pytest.raises(FileExistsError, match="pass --overwrite") as exc:
        atomic_write(p, lambda t: t.write_text("y"))
    assert "overwrite=True" not in str(exc.value)


# ---- 5. wrong label maps ---------------------------------------------------------------------------
def _label_files(images, tmp_path):
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import write_labelmap

    vol = read_image(images["a"])
    lab = np.zeros(vol.array.shape, np.int16)
    lab[5:15, 10:30, 8:22] = 1
    out = {}
    neg = lab.copy()
    neg[2, 2, 2] = -3
    out["negative"] = write_image(vol.with_array(neg), tmp_path / "neg.nrrd")
    far = vol.with_array(lab)
    far.origin = vol.origin + np.array([300.0, 0.0, 0.0])
    out["far"] = write_labelmap(far, {1: "organ"}, tmp_path / "far.seg.nrrd")
    half = vol.with_array(lab)
    half.origin = vol.origin + np.array([28.0, 0.0, 0.0])  # the organ spans 28 mm in i: about half outside
    out["half"] = write_labelmap(half, {1: "organ"}, tmp_path / "half.seg.nrrd")
    return out


def test_fewshot_refuses_negative_or_non_overlapping_labels(package, images, tmp_path, capsys):
    """fewshot train with negative label values, or a label map 300 mm away from its image -> exit 2 before any work."""
    labels = _label_files(images, tmp_path)
    head = tmp_path / "h.aehead"
    for key, text in (("negative", "negative values"), ("far", "does not overlap its image")):
        assert main(["fewshot", "train", "--model", str(package), "--images", str(images["a"]),
                     "--labels", str(labels[key]), "--out", str(head)]) == 2
        assert text in _err(capsys)
        assert not head.exists()


def test_fewshot_warns_on_partial_label_overlap(images, tmp_path, caplog):
    """Label map overlapping its image only partly -> a warning with the overlap fraction."""
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import check_label_map, read_labelmap

    labels = _label_files(images, tmp_path)
    image = read_image(images["a"])
    with caplog.at_level(logging.WARNING):
        frac = check_label_map(image, read_labelmap(labels["half"])[0], "half.seg.nrrd")
    assert 0.3 < frac < 0.7
    assert "overlaps its image only partly" in caplog.text and f"{100 * frac:.0f}%" in caplog.text
    assert check_label_map(image, image.with_array((image.array > 0).astype(np.int16)), "same") == 1.0


# ---- 6. inputs far from what the model expects ------------------------------------------------------
def test_8bit_image_for_a_ct_model_warns(caplog):
    """uint8 0-255 image fed to a CT model -> a warning that it looks like an 8-bit image, not CT in HU."""
    model = TorchModel(tiny_aefm(0), CARD)
    vol = blob_volume((20, 40, 30))
    arr = np.clip((vol.array - vol.array.min()) / np.ptp(vol.array) * 255, 0, 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING):
        embed_volume(model, vol.with_array(arr))
    assert "look like an 8-bit image, not CT in Hounsfield units" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        embed_volume(model, vol)  # HU: no warning
    assert "8-bit" not in caplog.text


def test_structureless_target_flags_every_match(caplog):
    """All-zero target -> a warning, and every match is flagged low confidence."""
    from anatomical_embedding.inference.matching import Matcher

    model = TorchModel(tiny_aefm(0), CARD)
    vol = blob_volume((20, 40, 30))
    src = embed_volume(model, vol)
    tgt = embed_volume(model, vol.with_array(np.zeros_like(vol.array)))
    pts = vol.index_to_world(np.array([[10.0, 20.0, 10.0], [20.0, 30.0, 12.0]]))
    with caplog.at_level(logging.WARNING):
        res = Matcher(src, tgt, prior_config=None).match(pts)
    assert all(r.final.low_confidence for r in res)
    assert "constant" in caplog.text and "no structure" in caplog.text


# ---- 7. package integrity without the sidecar ----------------------------------------------------------
def test_edited_card_is_caught_without_sidecar(package, tmp_path):
    """Package whose card.json was edited, with no .sha256 sidecar -> refused: the member hashes inside the package do not match."""
    from fixtures_data import copy_package_with_card

    from anatomical_embedding.inference.backends import read_package

    edited = tmp_path / "edited.aemodel"
    assert "integrity.json" in copy_package_with_card(package, edited, spacing=[1.0, 1.0, 1.0])
    assert not edited.with_name(edited.name + ".sha256").exists()
    with pytest.raises(ValueError, match="card.json do not match the package's integrity.json"):
        read_package(edited)
    read_package(package)  # the intact package loads


# ---- 8. consistency ------------------------------------------------------------------------------
def test_backend_has_one_spelling(package, images, tmp_path, caplog):
    """--backend onnx (fewshot's old spelling) on embed, or onnxruntime on fewshot -> accepted; the alias warns with the canonical name."""
    from anatomical_embedding.cli.app import build_parser

    p = build_parser()
    assert p.parse_args(["fewshot", "apply", "--head", "h", "--image", "i", "--out", "o",
                         "--backend", "onnxruntime"]).backend == "onnxruntime"
    with caplog.at_level(logging.WARNING):
        assert main(["embed", "--model", str(package), "--image", str(images["a"]), "--no-cache",
                     "--backend", "onnx"]) == 0
    assert "--backend onnx is spelled --backend onnxruntime" in caplog.text


def test_readme_table_is_generated_from_the_tests():
    """README's bad-input table equals the one generated from these tests' docstrings (python Testing/bad_input_table.py)."""
    import bad_input_table

    assert bad_input_table.readme_block(bad_input_table.README.read_text(encoding="utf-8")) == bad_input_table.table()


#: Numeric method settings that take any value: seeds, and HDSSL's body-crop threshold in HU.
UNBOUNDED_SETTINGS = {"proj_seed", "split_seed", "seed", "body_crop_hu"}


@pytest.mark.parametrize("method", ["adam", "aefm", "anatomask", "hdssl", "finetune"])
def test_every_numeric_method_setting_declares_its_range(method):
    """method.KEY=VALUE out of range for any method (e.g. hdssl temperature=0) -> refused at load, naming the range."""
    import typing
    from dataclasses import fields

    from anatomical_embedding.methods import get_method
    from anatomical_embedding.training.config import load_run_config

    cls = get_method(method).Config
    hints = typing.get_type_hints(cls)
    numeric = [f.name for f in fields(cls) if any(t in str(hints[f.name]) for t in ("int", "float"))]
    missing = [n for n in numeric if n not in UNBOUNDED_SETTINGS and not next(
        f for f in fields(cls) if f.name == n).metadata.get("range")]
    assert not missing, f"{method}: numeric settings without a declared range: {missing}"
    ranged_field = next(f for f in fields(cls) if f.metadata.get("range") and f.metadata["range"][0] is not None
                        and "tuple" not in str(hints[f.name]))
    lo = ranged_field.metadata["range"][0]
    with pytest.raises(ValueError, match=f"method.{ranged_field.name}=.* out of range"):
        load_run_config(method, None, [f"method.{ranged_field.name}={lo - 1}"])
