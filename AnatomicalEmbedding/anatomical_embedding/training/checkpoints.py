"""Checkpoints: atomic writes, keep-last-N, best-by-metric, exact resume, and loading a trained embedder.

Layout: ``RUN_DIR/checkpoints/step_00001234.pt`` (the newest ``keep_last`` are kept), ``last.pt`` (the
newest) and ``best.pt`` (lowest ``best_metric``). A checkpoint is a dict of tensors and plain containers
only, so it loads with ``torch.load(weights_only=True)``:

``{"format": 1, "step", "epoch", "model" (method state_dict: networks, momentum copies, queues),
"optimizer", "scaler", "scheduler", "rng": [per-rank {"python", "numpy", "torch", "cuda"}],
"best": float | None, "config": RunConfig.to_dict(), "model_info": dict}``
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from anatomical_embedding.io import atomic_write
from anatomical_embedding.methods.runs import (  # noqa: F401 (the run-folder API lives with the methods)
    CorruptCheckpoint, build_embedder, build_method, load_checkpoint, load_resume_checkpoint,
    newest_intact_checkpoint, resolve_checkpoint)

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def rng_state() -> dict:
    """This process's RNG states as plain containers (numpy's tuple -> list + tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> Path:
    """``torch.save`` through ``io.atomic_write`` (temporary file, then ``os.replace``: never half-written)."""
    return atomic_write(Path(path), lambda tmp: torch.save(obj, tmp), overwrite=True)


def _atomic_copy(src: Path, dst: Path) -> None:
    atomic_write(Path(dst), lambda tmp: shutil.copyfile(src, tmp), overwrite=True)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 3) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))

    def save(self, state: dict, step: int, is_best: bool = False) -> Path:
        path = atomic_torch_save(state, self.dir / f"step_{step:08d}.pt")
        _atomic_copy(path, self.dir / "last.pt")
        if is_best:
            _atomic_copy(path, self.dir / "best.pt")
        steps = sorted(p for p in self.dir.iterdir() if STEP_RE.match(p.name))
        for old in steps[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def clean_temporaries(self) -> int:
        """Remove half-written temporary files a killed save left behind (``.step_*.pt``, ``.last.*.pt``)."""
        n = 0
        for p in self.dir.glob(".*.pt") if self.dir.is_dir() else ():
            p.unlink(missing_ok=True)
            n += 1
        return n

    def has_checkpoint(self) -> bool:
        return (self.dir / "last.pt").is_file() or any(STEP_RE.match(p.name) for p in self.dir.glob("step_*.pt"))


def load_embedder_from_run(run_dir: str | Path, checkpoint: str = "last", device: str = "cpu"):
    """``(embedder in eval mode, model_info)`` from ``RUN_DIR`` (``config.toml`` + a checkpoint).

    ``model_info`` keys: method, modality, spacing, intensity_preset, patch_size, coarse_channels,
    fine_channels, coarse_stride, size_multiple, training_data {n_cases, source}, engine_version, step.
    """
    from anatomical_embedding.training.config import read_run_config

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found; {run_dir} is not a training run folder")
    cfg = read_run_config(cfg_path)
    ckpt = load_checkpoint(resolve_checkpoint(run_dir, checkpoint))
    method = build_method(cfg.method, cfg.to_dict()["config"])
    method.load_state_dict(ckpt["model"])
    emb = method.embedder().to(device).eval()
    info = dict(ckpt.get("model_info") or {})
    if method.calibration_samples > 0 and "calibration_samples" not in info:
        log.warning("%s step %d was saved before the run's end, so it is not calibrated for dense inference "
                    "(e.g. BatchNorm statistics from masked inputs); a finished run's last checkpoint is", run_dir,
                    int(ckpt["step"]))
    info["step"] = int(ckpt["step"])
    return emb, info
