"""ONNX model packages: parity with torch, integrity checks, torch-free inference, CLI export."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import copy_package_with_card
from test_embedding import CARD, blob_volume, tiny_aefm

from anatomical_embedding.inference.backends import OnnxModel, TorchModel, open_model, read_package
from anatomical_embedding.inference.embedding import embed_volume
from anatomical_embedding.inference.export import export_embedder


@pytest.fixture(scope="module")
def net():
    return tiny_aefm(0)


@pytest.fixture(scope="module")
def package(net, tmp_path_factory):
    return export_embedder(net, CARD, tmp_path_factory.mktemp("pkg") / "tiny.aemodel")


def test_package_layout_and_card(package):
    with zipfile.ZipFile(package) as zf:
        names = set(zf.namelist())
        card = json.loads(zf.read("card.json"))
    assert {"card.json", "model.onnx", "coarse.onnx"} <= names
    for key in ("method", "modality", "spacing", "intensity_preset", "patch_size", "coarse_channels",
                "fine_channels", "coarse_stride", "size_multiple", "training_data", "engine_version", "onnx_sha256"):
        assert key in card, key
    assert card["opset"] >= 17 and card["coarse_channels"] == 16 and card["spacing"] == [2.0, 2.0, 2.0]
    sidecar = package.with_name(package.name + ".sha256").read_text(encoding="utf-8").split()
    import hashlib

    assert sidecar[0] == hashlib.sha256(package.read_bytes()).hexdigest() and sidecar[1] == package.name


@pytest.mark.parametrize("shape", [(32, 32, 32), (48, 32, 64), (16, 80, 32)])
def test_onnx_matches_torch_on_dynamic_shapes(net, package, shape):
    x = np.random.default_rng(sum(shape)).uniform(-1, 1, size=(1, 1, *shape)).astype(np.float32)
    onnx_model = OnnxModel(package)
    torch_model = TorchModel(net, CARD, device="cpu")
    c1, f1 = onnx_model.embed_patch(x)
    c2, f2 = torch_model.embed_patch(x)
    assert c1.shape == (1, 16, shape[0] // 8, shape[1] // 8, shape[2] // 8) and f1.shape == (1, 16, *shape)
    assert np.abs(c1 - c2).max() < 1e-4 and np.abs(f1 - f2).max() < 1e-4
    # The coarse-only graph (used for the whole-volume pass) gives the same coarse map.
    c3, none = onnx_model.embed_patch(x, want_fine=False)
    assert none is None and np.abs(c3 - c2).max() < 1e-4


def test_backends_give_same_embeddings_and_matches(net, package):
    vol = blob_volume()
    a = embed_volume(OnnxModel(package), vol)
    b = embed_volume(TorchModel(net, CARD, device="cpu"), vol)
    assert np.abs(a.coarse - b.coarse).max() < 2e-3  # both rounded to float16 (1 ulp near 1 is 5e-4)
    fa, fb = a.fine_block([4, 8, 12], [20, 20, 20]), b.fine_block([4, 8, 12], [20, 20, 20])
    assert np.abs(fa - fb).max() < 2e-3


def test_damaged_or_mismatched_packages_are_refused(package, tmp_path):
    data = bytearray(package.read_bytes())
    # 1. A flipped byte inside the ONNX member: the zip CRC / card hash catch it.
    with zipfile.ZipFile(package) as zf:
        info = zf.getinfo("model.onnx")
    damaged = tmp_path / "damaged.aemodel"
    pos = info.header_offset + 30 + len(info.filename) + info.file_size // 2
    data2 = bytearray(data)
    data2[pos] ^= 0xFF
    damaged.write_bytes(bytes(data2))
    with pytest.raises(ValueError, match="damaged"):
        OnnxModel(damaged)
    # 2. A consistent zip whose card names another network: refused by the card hash.
    swapped = tmp_path / "swapped.aemodel"
    with zipfile.ZipFile(package) as zf, zipfile.ZipFile(swapped, "w") as out:
        card = json.loads(zf.read("card.json"))
        card["onnx_sha256"] = "0" * 64
        out.writestr("card.json", json.dumps(card))
        out.writestr("model.onnx", zf.read("model.onnx"))
    with pytest.raises(ValueError, match="does not match the sha256 in its card"):
        read_package(swapped)
    # 3. A card edited after export (hashes intact): the sidecar of the whole package catches it.
    edited = tmp_path / "edited.aemodel"
    copy_package_with_card(package, edited, spacing=[1.0, 1.0, 1.0])
    edited.with_name(edited.name + ".sha256").write_text(package.with_name(package.name + ".sha256").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="checksum file"):
        OnnxModel(edited)
    # 4. Not a zip at all.
    junk = tmp_path / "junk.aemodel"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid model package"):
        open_model(junk)


def test_open_model_dispatch_and_errors(package, tmp_path):
    assert open_model(package).backend == "onnxruntime"
    # A thread count reaches ONNX Runtime's session (it ignores OMP_NUM_THREADS, so a benchmark's "--threads 1"
    # used to run the network on every core).
    options = open_model(package, threads=1).session.get_session_options()
    assert options.intra_op_num_threads == 1
    # No memory pattern: it doubled the peak memory of large sliding windows for no speed (backends.OnnxModel).
    assert not options.enable_mem_pattern and options.enable_cpu_mem_arena
    with pytest.raises(ValueError, match="training run directory"):
        open_model(package, backend="torch")
    with pytest.raises(FileNotFoundError):
        open_model(tmp_path / "missing.aemodel")


def test_onnx_backend_does_not_import_torch(package):
    code = (
        "import sys, numpy as np\n"
        "from anatomical_embedding.inference.backends import open_model\n"
        "from anatomical_embedding.inference.embedding import embed_volume\n"
        "from anatomical_embedding.inference.matching import Matcher\n"
        "from anatomical_embedding.io import Volume\n"
        f"m = open_model({str(package)!r})\n"
        "v = Volume(np.random.default_rng(0).normal(size=(32, 40, 48)).astype(np.float32) * 300, spacing=(2, 2, 2))\n"
        "e = embed_volume(m, v)\n"
        "r = Matcher(e, e, prior_config=None).match(v.index_to_world([20.0, 20.0, 16.0]))\n"
        # Few-shot training and applying too (the viewer's few-shot child, `fewshot apply`): their preprocessing
        # lives outside the MONAI data sets.
        "from anatomical_embedding.fewshot.head import FewShotConfig, apply_head, train_head\n"
        "lab = v.with_array((v.array > 0).astype(np.int16))\n"
        "h = train_head(m, [v], [lab], {1: 'bright'}, FewShotConfig(epochs=2, voxels_per_class=200))\n"
        "seg = apply_head(m, h, v)\n"
        "assert seg.array.shape == v.array.shape\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'monai' not in sys.modules, 'MONAI was imported'\n"
        "print('ok', r[0].final.similarity)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


@pytest.mark.slow
def test_cli_export_of_trained_run(trained_aefm_run, tmp_path):
    from anatomical_embedding.cli.app import main
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    out = tmp_path / "trained.aemodel"
    assert main(["export", "--run", str(trained_aefm_run), "--out", str(out)]) == 0
    card = OnnxModel(out).card
    emb, info = load_embedder_from_run(trained_aefm_run)
    assert card["method"] == info["method"] and card["spacing"] == [float(s) for s in info["spacing"]]
    assert card["step"] == info["step"]
    torch_model = open_model(trained_aefm_run)  # a run directory opens with torch
    assert torch_model.backend == "torch" and torch_model.card["coarse_channels"] == card["coarse_channels"]
    x = np.random.default_rng(0).uniform(-1, 1, size=(1, 1, 32, 48, 32)).astype(np.float32)
    c1, f1 = OnnxModel(out).embed_patch(x)
    c2, f2 = torch_model.embed_patch(x)
    assert np.abs(c1 - c2).max() < 1e-4 and np.abs(f1 - f2).max() < 1e-4
    # Exporting again onto the same file is refused without --overwrite (exit code 2, one line).
    assert main(["export", "--run", str(trained_aefm_run), "--out", str(out)]) == 2


def test_an_export_that_disagrees_with_torch_is_removed(trained_aefm_run, tmp_path, monkeypatch, capsys):
    """The CLI and the training script share the check: a package whose outputs differ from torch's is not left
    where the viewer or `match` would load it (the parity check is made to fail: a real disagreement cannot be
    produced on purpose)."""
    import anatomical_embedding.inference.export as export
    from anatomical_embedding.cli.app import main

    monkeypatch.setattr(export, "verify_parity", lambda package, embedder: 0.5)
    out = tmp_path / "broken.aemodel"
    with pytest.raises(export.ParityError, match="package removed"):
        export.export_run_checked(trained_aefm_run, out)
    assert not out.exists() and not Path(f"{out}.sha256").exists()
    assert main(["export", "--run", str(trained_aefm_run), "--out", str(out)]) != 0
    assert "disagrees with torch" in capsys.readouterr().err
    assert not out.exists() and not Path(f"{out}.sha256").exists()
    monkeypatch.undo()
    path, diff = export.export_run_checked(trained_aefm_run, out)
    assert path == out and out.is_file() and diff <= export.PARITY_TOLERANCE


def test_cli_embed_writes_coarse_map_and_uses_cache(package, tmp_path, capsys):
    from anatomical_embedding.cli.app import main
    from anatomical_embedding.io import write_image

    vol = blob_volume((20, 40, 30))
    write_image(vol, tmp_path / "img.nrrd")
    args = ["embed", "--model", str(package), "--image", str(tmp_path / "img.nrrd"), "--cache", str(tmp_path / "c")]
    assert main(args + ["--out", str(tmp_path / "e.npz")]) == 0
    with np.load(tmp_path / "e.npz") as z:
        assert z["coarse"].shape == (16, 4, 6, 4) and z["coarse"].dtype == np.float16
        np.testing.assert_allclose(z["spacing"], [16.0, 16.0, 16.0])
    assert main(args + ["--out", str(tmp_path / "e.npz")]) == 2  # exists, no --overwrite
    assert len(list((tmp_path / "c").glob("*/coarse.npy"))) == 1
