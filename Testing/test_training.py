"""The training engine: config, CLI input errors, checkpoints, exact resume after SIGKILL, SIGTERM
stop, and a 2-process gloo DDP run equal to the single-process run with the same global batch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anatomical_embedding.training.checkpoints import load_checkpoint, load_embedder_from_run
from anatomical_embedding.cli.train import main as train_main
from anatomical_embedding.training.config import load_run_config, read_run_config
from anatomical_embedding.training.progress import read_progress

from fixtures_data import write_training_manifest

#: A very small AEFM so that a step takes a fraction of a second on one CPU thread.
SMALL = [
    "method.widths=[4,8,16,32]", "method.feature_dim=8", "method.spacing=[8.0,8.0,8.0]",
    "method.patch_size=[32,32,32]", "method.n_pos=64", "method.n_neg=256", "method.epochs_region=0",
    "train.lr=1e-3", "train.num_workers=0", "train.log_every=1", "train.progress_bar=false",
    "train.tensorboard=false", "train.threads=1", "train.deterministic=true",
]


@pytest.fixture(scope="module")
def small_data(phantom_cohort, held_out_ids, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small_data")
    return write_training_manifest(phantom_cohort, held_out_ids, root / "train.json")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "anatomical_embedding.cli.train", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _sets(extra: list[str]) -> list[str]:
    out = []
    for s in SMALL + extra:
        out += ["--set", s]
    return out


def test_config_toml_and_typed_overrides(tmp_path):
    toml = Path(__file__).parents[1] / "Resources" / "configs" / "aefm.toml"
    cfg = load_run_config(None, toml, ["train.lr=3e-4", "method.n_pos=500", "method.patch_size=[64,64,48]",
                                       "train.compile=true"])
    assert cfg.method == "aefm" and cfg.train.lr == 3e-4 and cfg.train.compile is True
    assert cfg.method_config.n_pos == 500 and cfg.method_config.patch_size == (64, 64, 48)
    assert cfg.method_config.n_neg == 100000 and cfg.method_config.momentum == 0.999  # paper defaults
    with pytest.raises(ValueError, match="method.n_poss"):
        load_run_config("aefm", None, ["method.n_poss=3"])
    with pytest.raises(ValueError, match="train.batch_size"):
        load_run_config("aefm", None, ["train.batch_size=two"])
    with pytest.raises(ValueError, match="unknown method"):
        load_run_config("nope", None, [])


def _write(path: Path, array: np.ndarray, spacing=(4.0, 4.0, 4.0)) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing[: array.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def test_cli_rejects_bad_input_with_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    assert train_main(["--method", "aefm", "--data", str(tmp_path / "empty"), "--out", out]) == 2
    assert "no images found" in capsys.readouterr().err
    _write(tmp_path / "imgs" / "a.nii.gz", np.zeros((40, 40, 40), np.float32))
    _write(tmp_path / "labs" / "b.nii.gz", np.zeros((40, 40, 40), np.uint8))
    assert train_main(["--method", "aefm", "--data", str(tmp_path / "imgs"), "--labels", str(tmp_path / "labs"),
                       "--out", out]) == 2
    assert "match no image" in capsys.readouterr().err
    # 40 voxels at 4 mm = 160 mm, smaller than the default 96 mm... at 1 mm: 160 voxels; ask a bigger patch.
    assert train_main(["--method", "aefm", "--data", str(tmp_path / "imgs"), "--out", out,
                       "--set", "method.patch_size=[192,192,192]"]) == 2
    assert "smaller than the patch" in capsys.readouterr().err
    _write(tmp_path / "flat" / "x.nii.gz", np.zeros((64, 64), np.float32))
    assert train_main(["--method", "aefm", "--data", str(tmp_path / "flat"), "--out", out]) == 2
    assert "2D image" in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(small_data, tmp_path):
    steps = ["train.max_steps=8", "train.ckpt_every=2", "train.keep_last=2"]
    full = tmp_path / "full"
    r = subprocess.run(_cli("--method", "aefm", "--data", str(small_data), "--out", str(full), *_sets(steps)),
                       env=_env(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli("--method", "aefm", "--data", str(small_data), "--out", str(killed), *_sets(steps)),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace")
    killed_at = None
    for line in proc.stdout:
        rec = json.loads(line) if line.startswith("{") else {}
        if rec.get("event") == "checkpoint" and rec["step"] >= 2:
            proc.send_signal(signal.SIGKILL)  # no chance to clean up
            killed_at = rec["step"]
            break
    proc.wait(timeout=60)
    assert killed_at is not None and proc.returncode == -signal.SIGKILL
    assert load_checkpoint(killed / "checkpoints" / "last.pt")["step"] < 8
    r = subprocess.run(_cli("--data", str(small_data), "--out", str(killed), "--resume"),
                       env=_env(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(killed / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 8
    assert set(a["model"]) == set(b["model"])
    for k in a["model"]:  # networks, momentum network and both queues
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k
    # Same losses for the steps after the resume point.
    la = {e["step"]: e["loss"] for e in read_progress(full / "progress.jsonl") if e["event"] == "progress"}
    lb = {e["step"]: e["loss"] for e in read_progress(killed / "progress.jsonl") if e["event"] == "progress"}
    assert all(la[s] == pytest.approx(lb[s], rel=1e-6, abs=1e-7) for s in range(killed_at + 1, 9))
    # Run directory contract and the embedder loader.
    assert (killed / "config.toml").is_file() and (killed / "metrics.csv").is_file()
    assert len(list((killed / "checkpoints").glob("step_*.pt"))) == 2 and (killed / "checkpoints" / "best.pt").is_file()
    emb, info = load_embedder_from_run(killed)
    assert not emb.training and info["step"] == 8
    for key in ("method", "modality", "spacing", "intensity_preset", "patch_size", "coarse_channels",
                "fine_channels", "coarse_stride", "size_multiple", "training_data", "engine_version", "step"):
        assert key in info, key
    assert info["spacing"] == [8.0, 8.0, 8.0] and info["fine_channels"] == 8 and info["training_data"]["n_cases"] == 7
    coarse, fine = emb(torch.zeros(1, 1, 32, 32, 32))
    assert coarse.shape == (1, 8, 4, 4, 4) and fine.shape == (1, 8, 32, 32, 32)


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_130(small_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("--method", "aefm", "--data", str(small_data), "--out", str(out),
                                 *_sets(["train.max_steps=1000", "train.ckpt_every=1000"])),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace")
    events = []
    for line in proc.stdout:
        rec = json.loads(line) if line.startswith("{") else {}
        events.append(rec)
        if rec.get("event") == "progress" and rec["step"] == 2:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode == 130
    stopped = [e for e in events if e.get("event") == "stopped"]
    assert stopped and stopped[0]["signal"] == "SIGTERM"
    ck = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ck["step"] == stopped[0]["step"] >= 2
    # A new run into the same folder is refused without --resume.
    assert train_main(["--method", "aefm", "--data", str(small_data), "--out", str(out)]) == 2


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(small_data, tmp_path):
    """Same global batch (2): one process with batch 2 vs two gloo ranks with 1 each.

    The engine draws sample ``g = step * batch + b`` from a generator seeded by ``g`` alone and rank
    ``r`` takes ``b = r``, so both runs see identical patch pairs; DDP averages the gradients (= the
    gradient of the batch mean), the keys are gathered across ranks in rank order before they enter the
    queue, and the logged loss is averaged over ranks. Hence equal losses and weights up to float error.
    SGD, not Adam: conv biases in front of InstanceNorm get gradients of pure rounding noise (the norm
    removes them), which Adam would blow up to full-size steps and so tell the two runs apart.
    """
    steps = ["train.max_steps=4", "train.ckpt_every=4", "train.batch_size=2", "train.optimizer=sgd",
             "train.lr=0.05"]
    single = tmp_path / "single"
    r = subprocess.run(_cli("--method", "aefm", "--data", str(small_data), "--out", str(single), *_sets(steps)),
                       env=_env(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "anatomical_embedding.cli.train", "--method", "aefm", "--data", str(small_data),
           "--out", str(ddp), *_sets(steps)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    start = [e for e in read_progress(ddp / "progress.jsonl") if e["event"] == "start"]
    assert start[0]["world_size"] == 2
    ls = [e["loss"] for e in read_progress(single / "progress.jsonl") if e["event"] == "progress"]
    ld = [e["loss"] for e in read_progress(ddp / "progress.jsonl") if e["event"] == "progress"]
    assert len(ls) == len(ld) == 4
    assert ls[1] > 0  # the queue holds negatives from step 2 on: a real loss
    assert np.allclose(ls, ld, rtol=1e-4, atol=1e-5), (ls, ld)
    a = load_checkpoint(single / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(ddp / "checkpoints" / "last.pt")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k
    assert read_run_config(ddp / "config.toml").train.batch_size == 2


def test_region_stage_trains_segmentation_head(phantom_cohort, held_out_ids, tmp_path):
    """With labels, AEFM's region stage adds the Dice+CE and L_RC terms; the run stays loadable."""
    from anatomical_embedding.training.engine import Trainer

    manifest = write_training_manifest(phantom_cohort, held_out_ids, tmp_path / "labelled.json", with_labels=True)
    overrides = [s for s in SMALL if not s.startswith("method.epochs_region")]
    cfg = load_run_config("aefm", None, overrides + ["method.epochs_ac=1", "method.epochs_region=1",
                                                     "train.ckpt_every=100"])
    run = tmp_path / "run"
    assert Trainer(cfg, manifest, run).run() == 0
    saved = read_run_config(run / "config.toml")
    n_classes = max(phantom_cohort.label_names) + 1
    assert saved.method_config.num_classes == n_classes  # filled from the labels
    events = [e for e in read_progress(run / "progress.jsonl") if e["event"] == "progress"]
    steps_per_epoch = 4  # ceil(7 cases / batch 2)
    assert len(events) == 2 * steps_per_epoch
    assert all("seg" not in e["terms"] for e in events[:steps_per_epoch])
    late = events[steps_per_epoch:]
    assert all(np.isfinite(e["terms"]["seg"]) and e["terms"]["seg"] > 0 for e in late)
    assert all(np.isfinite(e["terms"]["region"]) for e in late)
    header = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert "seg" in header and "region" in header
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ck["model"]["seg_head.fc2.weight"].shape[0] == n_classes
    assert "momentum_seg_head.fc2.weight" in ck["model"]
    emb, info = load_embedder_from_run(run)
    assert info["step"] == 2 * steps_per_epoch
