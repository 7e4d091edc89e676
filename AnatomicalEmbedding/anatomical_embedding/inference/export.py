"""Export an embedder to a ``.aemodel`` package for inference without PyTorch (ONNX Runtime).

Package layout (a zip, members stored uncompressed so they can be read quickly)::

    MODEL.aemodel
      card.json          model card: method, modality, spacing (i, j, k mm), intensity_preset, patch_size,
                         coarse/fine channels, coarse_stride, size_multiple, training_data, engine_version,
                         step, opset, onnx_sha256 (of model.onnx), coarse_onnx_sha256 (of coarse.onnx)
      model.onnx         input "image" (1, 1, k, j, i) float32 -> outputs "coarse", "fine"; dynamic k, j, i
      coarse.onnx        optional: the same network pruned to the coarse output (whole-volume pass is cheaper)
      integrity.json     sha256 of every other member (card.json included) and one digest over them
    MODEL.aemodel.sha256 sidecar: "<sha256 of the whole .aemodel>  MODEL.aemodel" (sha256sum format)

Verification (:func:`backends.read_package`): the card's hashes are checked against the ONNX members on every
load (a damaged or swapped network is refused); the zip CRCs catch damage elsewhere; ``integrity.json``
catches an edited card even without the sidecar; the hash of the whole file cannot sit inside the file it
hashes, so it goes to the sidecar, checked whenever the sidecar is present. ``model_hash`` (the cache key) is the ONNX sha256.
"""
from __future__ import annotations

import io as _io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from anatomical_embedding.inference.backends import (COARSE_ONNX_NAME, ONNX_NAME,  # noqa: F401 (re-exported)
                                                     card_from_embedder, sha256_bytes, write_package)

log = logging.getLogger(__name__)

OPSET = 17


def _onnx_bytes(module, example, output_names: list[str], opset: int) -> bytes:
    import torch

    axes = {2: "k", 3: "j", 4: "i"}
    dynamic = {"image": axes}
    for name in output_names:
        dynamic[name] = {2: f"{name}_k", 3: f"{name}_j", 4: f"{name}_i"}
    buf = _io.BytesIO()
    with torch.no_grad():
        # The TorchScript exporter: InstanceNormalization with dynamic spatial axes exports cleanly with it,
        # and it needs no onnxscript (the dynamo exporter does).
        torch.onnx.export(module, (example,), buf, input_names=["image"], output_names=output_names,
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True, dynamo=False)
    return buf.getvalue()


def export_embedder(embedder: Any, info: dict | None, out: str | os.PathLike, overwrite: bool = False,
                    opset: int = OPSET, example_size: int = 32, coarse_graph: bool = True) -> Path:
    """Export an in-memory Embedder with its run info (see ``load_embedder_from_run``) to ``out``."""
    import torch
    from torch import nn

    from anatomical_embedding.nets.embedder import coarse_forward, has_coarse_path

    if opset < 17:
        raise ValueError("opset must be >= 17")
    out = Path(out)
    if out.suffix != ".aemodel":
        raise ValueError(f"model packages end in .aemodel, got {out.name}")
    embedder = embedder.cpu().eval()
    card = card_from_embedder(embedder, info)
    m = int(card["size_multiple"])
    size = max(example_size, 2 * m)  # instance norm needs >1 voxel at the bottleneck
    example = torch.rand(1, 1, size, size, size) * 2 - 1

    class _Both(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            c, f = self.net(x)
            return c, f

    class _Coarse(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return coarse_forward(self.net, x)

    model_bytes = _onnx_bytes(_Both(embedder), example, ["coarse", "fine"], opset)
    card.update({"opset": opset, "onnx_sha256": sha256_bytes(model_bytes), "inputs": {"image": "(1, 1, k, j, i)"},
                 "outputs": {"coarse": "(1, C, k/s, j/s, i/s)", "fine": "(1, C, k, j, i)"},
                 "axis_order": "k, j, i (ITK index order reversed); world frame of the card: LPS"})
    members = {ONNX_NAME: model_bytes}
    if coarse_graph and has_coarse_path(embedder):
        coarse_bytes = _onnx_bytes(_Coarse(embedder), example, ["coarse"], opset)
        members[COARSE_ONNX_NAME] = coarse_bytes
        card["coarse_onnx_sha256"] = sha256_bytes(coarse_bytes)

    digest = write_package(out, card, members, overwrite)
    log.info("exported %s (%.1f MB, sha256 %s)", out, out.stat().st_size / 2**20, digest[:16])
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "last",
               overwrite: bool = False, opset: int = OPSET, coarse_graph: bool = True, precision: str = "fp32",
               calibration_images: list[str] | None = None) -> Path:
    """Export a training run directory (torch checkpoint) to a ``.aemodel`` package.

    ``coarse_graph=False`` leaves out the coarse-only graph: the package is about half the size (the coarse
    graph repeats the encoder's weights), and whole-volume embedding then runs the full network.
    ``precision`` fp16/int8 exports fp32 first, then converts it (``inference.precision``)."""
    from anatomical_embedding.inference.precision import check_precision, convert_package
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    check_precision(precision, calibration_images)
    embedder, info = load_embedder_from_run(run_dir, checkpoint=checkpoint, device="cpu")
    if precision == "fp32":
        return export_embedder(embedder, info, out, overwrite=overwrite, opset=opset, coarse_graph=coarse_graph)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="ae_export_", dir=out.parent if out.parent.is_dir() else None) as tmp:
        fp32 = export_embedder(embedder, info, Path(tmp) / "fp32.aemodel", opset=opset, coarse_graph=coarse_graph)
        return convert_package(fp32, out, precision, calibration_images, overwrite=overwrite)


#: Largest ONNX Runtime vs torch difference (either output) an fp32 export may show.
PARITY_TOLERANCE = 1e-3


class ParityError(ValueError):
    """An exported package disagrees with the torch network it came from (it has been removed)."""


def export_run_checked(run_dir: str | os.PathLike, out: str | os.PathLike, checkpoint: str = "last",
                       overwrite: bool = False, **options) -> tuple[Path, float]:
    """:func:`export_run` in fp32, then :func:`verify_parity` against the run's torch network: (package, max abs
    difference). A package that disagrees by more than ``PARITY_TOLERANCE`` is removed with its ``.sha256`` (a
    broken model must not stay where the viewer or ``match`` would load it) and :class:`ParityError` is raised."""
    from anatomical_embedding.training.checkpoints import load_embedder_from_run

    path = export_run(run_dir, out, checkpoint=checkpoint, overwrite=overwrite, **options)
    embedder, _ = load_embedder_from_run(run_dir, checkpoint=checkpoint, device="cpu")
    diff = verify_parity(path, embedder)
    if not diff <= PARITY_TOLERANCE:  # (NaN fails too)
        Path(path).unlink(missing_ok=True)
        Path(str(path) + ".sha256").unlink(missing_ok=True)
        raise ParityError(f"the exported model disagrees with torch (max abs diff {diff:.2e}); package removed")
    return Path(path), diff


def verify_parity(package: str | os.PathLike, embedder: Any, size_kji=(32, 48, 64), seed: int = 0) -> float:
    """Max abs difference between ONNX Runtime and torch outputs on a random input (both outputs)."""
    import torch

    from anatomical_embedding.inference.backends import OnnxModel

    x = np.random.default_rng(seed).uniform(-1, 1, size=(1, 1, *size_kji)).astype(np.float32)
    onnx_model = OnnxModel(package, device="cpu")
    c1, f1 = onnx_model.embed_patch(x)
    with torch.no_grad():
        c2, f2 = embedder.cpu().eval()(torch.from_numpy(x))
    return float(max(np.abs(c1 - c2.numpy()).max(), np.abs(f1 - f2.numpy()).max()))
