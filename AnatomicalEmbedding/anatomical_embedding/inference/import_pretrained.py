"""Import a published pretrained checkpoint (AEFM, vox2vec, HDSSL) into an ``.aemodel`` model package.

``import_published(fmt, checkpoint, out)`` reads the downloaded file with the container/prefix rules of
:mod:`pretrained` (``weights_only=True``, strict key and shape matching, every mismatch listed), wraps the
network as a dense :class:`~anatomical_embedding.nets.embedder.Embedder` that takes our ``(1, 1, k, j, i)``
arrays, exports it to ONNX with :func:`export.export_embedder`, checks the ONNX graph against torch, and
writes the package with a model card that records what the network was trained with:

* ``spacing`` (mm along i, j, k) and ``intensity_preset`` (the published window/scaling): applied by the
  embedding code exactly as for our own models;
* ``input_layout`` (``"LPS"`` for AEFM, ``"RAS"`` for vox2vec/HDSSL): the published array orientation. The
  ONNX graph permutes/flips an identity-direction ``[k, j, i]`` array into that layout itself, and the embedding
  code brings every volume to identity (LPS axial) axes first (``io.reorient_to_canonical``, a pure index
  shuffle), so any axis-aligned scan reaches the network in the published orientation;
* ``embedding``: which output is coarse/fine and how a voxel vector is formed;
* ``source``: the checkpoint's file name and sha256, the project, commit and paper; ``caveats`` (HDSSL).

Nothing is downloaded: the user supplies the file (``PUBLISHED_SOURCES`` says where each project publishes it).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anatomical_embedding.inference.backends import CARD_NAME, sha256_file
from anatomical_embedding.nets.embedder import Embedder
from anatomical_embedding.inference.published import FORMATS, HDSSL_CAVEAT, PUBLISHED_SOURCES  # noqa: F401

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

#: Model card of the published AEFM weights (reference: /work/shared/reference-networks/aefm/NOTES.md).
AEFM_PUBLISHED_INFO: dict = {
    "method": "aefm",
    "modality": "CT",
    "network": "sam_unet_3d(num_res_units=2, target_feature_size=64): widths 64/128/256/512, 44,814,609 parameters",
    "input_layout": "LPS",  # MONAI Orientationd('LPS'): array axes (x, y, z) increase toward L, P, S
    "spacing": (1.0, 1.0, 1.0),
    "intensity_preset": "ct_aefm",  # [-500, 750] HU clipped to [-1, 1]
    "patch_size": (160, 160, 160),  # the repo's sliding_window_inference roi
    "training_data": {"description": "4000 abdominal CTs (FLARE23)", "body_region": "abdomen", "modality": "CT"},
    "checkpoints": ("abdomen_foundation.pth",),
    "checkpoint_format": "torch.save dict; weights in ckpt['net'], embedding net under 'sam.' (other keys ignored)",
    "source": "https://github.com/DlutMedimgGroup/Anatomy-Embedding-Foundation-Model",
    "source_commit": "175f5cadbbd5977796da89a921120267caf0145d",
    "paper": "Zhuang et al., Anatomy Embedding Foundation Model (AEFM)",
    "license_note": "check the upstream repository's license before redistributing the weights",
}

_TRAINING_DATA: dict[str, dict] = {
    "vox2vec": {"description": "about 6550 public chest and abdominal CTs (NLST, MIDRC, NSCLC, LIDC, FLARE, ...)",
                "body_region": "chest and abdomen", "modality": "CT"},
    "hdssl/ct": {"description": "abdominal CT (BTCV, FLARE, AMOS-CT)", "body_region": "abdomen", "modality": "CT"},
    "hdssl/mri": {"description": "whole-body MRI (NAKO, per the default run name)", "body_region": "whole body / abdomen",
                  "modality": "MRI"},
}



@dataclass
class ImportResult:
    package: Path
    card: dict
    registry_entry: dict | None = None


# ---- embedders ---------------------------------------------------------------------------------------
class PublishedAEFMEmbedder(Embedder):
    """The published AEFM network behind our ``(N, 1, k, j, i)`` contract.

    The network saw MONAI arrays in (x, y, z) = LPS order; an identity-direction volume's ``[k, j, i]`` array is
    that array transposed, so the wrapper transposes in and out (part of the ONNX graph, exact).
    """

    input_layout = "LPS"
    coarse_stride = 8
    size_multiple = 16

    def __init__(self, net: Any) -> None:
        super().__init__()
        from anatomical_embedding.nets.blocks import layout_for_direction

        self.net = net
        self.layout = layout_for_direction(np.eye(3), "LPS")
        self.coarse_channels = int(net.feature_dim)
        self.fine_channels = int(net.feature_dim)

    def forward(self, image):
        g, local = self.net(self.layout.to_network(image))
        return self.layout.from_network(g), self.layout.from_network(local)

    def forward_coarse(self, image):
        from anatomical_embedding.nets.embedder import coarse_forward

        return self.layout.from_network(coarse_forward(self.net, self.layout.to_network(image)))


def published_info(fmt: str, modality: str = "ct") -> dict:
    """The published preprocessing and provenance of ``fmt`` (a fresh copy)."""
    from anatomical_embedding.inference.pretrained import published_model_info

    modality = modality.lower()
    if fmt == "aefm":
        if modality != "ct":
            raise ValueError("AEFM was published for CT only; use --modality ct")
        return dict(AEFM_PUBLISHED_INFO)
    if fmt == "vox2vec":
        info = published_model_info("vox2vec", modality)
        info["training_data"] = dict(_TRAINING_DATA["vox2vec"])
        return info
    if fmt == "hdssl":
        info = published_model_info("hdssl", modality)
        info["training_data"] = dict(_TRAINING_DATA[f"hdssl/{modality}"])
        return info
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _check_file(path: Path) -> None:
    """Refuse a missing, empty or truncated file before torch gives a cryptic message for it."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): the download failed; download it again")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; a cut-off download lacks the central directory at the end.
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
        except zipfile.BadZipFile as exc:
            raise ValueError(
                f"checkpoint {path} is truncated or damaged ({exc}; {size} bytes): probably an incomplete "
                "download; download it again and compare its size with the published one"
            ) from exc
        if bad is not None:
            raise ValueError(f"checkpoint {path} is damaged (CRC error in {bad}); download it again")


def build_published_embedder(fmt: str, checkpoint: str | os.PathLike, modality: str = "ct",
                             network_config: Mapping[str, Any] | None = None) -> tuple[Embedder, dict]:
    """Load ``checkpoint`` strictly as ``fmt`` and wrap it as an Embedder; returns (embedder, published info)."""
    from anatomical_embedding.inference.pretrained import load_published_checkpoint

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    info = published_info(fmt, modality)
    path = Path(checkpoint)
    _check_file(path)
    try:
        net = load_published_checkpoint(path, fmt, network_config)  # type: ignore[arg-type]
    except ValueError as exc:  # same message, in the words of the command line / dialog
        message = str(exc).replace("use kind=", "use format ").replace("pass config=", "pass --network-config ")
        raise ValueError(message) from exc
    info["tensors_loaded"] = len(net.state_dict())  # strict load: exactly these came from the file
    if fmt == "aefm":
        embedder: Embedder = PublishedAEFMEmbedder(net)
    elif fmt == "vox2vec":
        from anatomical_embedding.nets.vox2vec import Vox2VecEmbedder

        embedder = Vox2VecEmbedder(net)
    else:
        from anatomical_embedding.nets.hdssl import HDSSLEmbedder

        embedder = HDSSLEmbedder(net, features="backbone")
    return embedder.eval(), info


# ---- model card ------------------------------------------------------------------------------------------
def _embedding_semantics(fmt: str, embedder: Embedder) -> dict:
    if fmt == "aefm":
        return {
            "coarse": f"AEFM global embedding ({embedder.coarse_channels}-d, stride 8, from up_layer_4), L2-normalised",
            "fine": f"AEFM local embedding ({embedder.fine_channels}-d, full resolution), L2-normalised",
            "voxel_vector": "as published: the network's own normalised outputs",
        }
    levels = getattr(embedder, "fine_levels", [])
    return {
        "coarse": f"concatenation of pyramid levels {embedder.coarse_levels} ({embedder.coarse_channels}-d) on the "
                  f"stride-{embedder.coarse_stride} grid, L2-normalised",
        "fine": f"concatenation of pyramid levels {levels} ({embedder.fine_channels}-d), each level nearest-upsampled "
                "to full resolution, L2-normalised",
        "voxel_vector": "the published voxel embedding (select_from_pyramid: level L read at voxel // 2**L, "
                        "concatenated), L2-normalised",
    }


def _card_extra(fmt: str, info: dict, embedder: Embedder, checkpoint: Path, name: str,
                network_config: Mapping[str, Any] | None) -> dict:
    from anatomical_embedding.io import get_preset

    preset = get_preset(info["intensity_preset"])
    layout = info["input_layout"]
    preprocessing = {
        "spacing_mm_ijk": [float(s) for s in info["spacing"]],
        "intensity": preset.to_dict(),
        "array_orientation": layout,
        "orientation_note": (
            f"the published network expects arrays whose axes (x, y, z) increase toward "
            f"{'L, P, S (MONAI Orientationd LPS)' if layout == 'LPS' else 'R, A, S (RAS-canonical)'}; the ONNX graph "
            "takes the [k, j, i] array of an identity-direction volume and permutes/flips it itself; the "
            "embedding code reorients every volume to identity direction first (io.reorient_to_canonical)"),
    }
    for key in ("body_crop", "body_crop_hu", "intensity_preset_repo"):
        if key in info:
            preprocessing[key] = info[key]
    if fmt == "aefm":
        preprocessing["hu_plus_1000_note"] = (
            "the repo maps [990, 1140] to [-1, 1] when a volume's minimum is > -10 (data stored as HU+1000); "
            "images read here are in HU, so the [-500, 750] HU window applies")
    caveats = [HDSSL_CAVEAT] if fmt == "hdssl" else []
    if network_config:
        caveats.append(f"non-published network configuration {dict(network_config)}")
    return {
        "name": name,
        "input_layout": layout,
        "embedding": _embedding_semantics(fmt, embedder),
        "embedding_dim": int(embedder.fine_channels),
        "preprocessing": preprocessing,
        "published_configuration": not network_config,
        "network": info.get("network", ""),
        "source": {
            "format": fmt,
            "checkpoint_file": checkpoint.name,
            "checkpoint_sha256": sha256_file(checkpoint),
            "checkpoint_bytes": checkpoint.stat().st_size,
            "tensors_loaded": info.get("tensors_loaded"),
            "project": info.get("source", ""),
            "commit": info.get("source_commit", ""),
            "weights": info.get("weights", ""),
            "paper": info.get("paper", ""),
            "license_note": info.get("license_note", ""),
            "where_published": PUBLISHED_SOURCES[fmt],
            "imported": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "caveats": caveats,
    }


def _rewrite_with_card(src: Path, out: Path, extra: dict, overwrite: bool) -> dict:
    """Copy the package ``src`` to ``out`` with ``extra`` merged into its card; writes the sha256 sidecar."""
    from anatomical_embedding.inference.export import write_package

    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    card = json.loads(members.pop(CARD_NAME).decode("utf-8"))
    card.update(extra)
    write_package(out, card, members, overwrite)
    return card


def _check_sizes(embedder: Embedder) -> tuple[int, int, int]:
    """A small (k, j, i) test input: 8 voxels at AEFM's 1/16 bottleneck (its instance norm over only 2 voxels
    amplifies float rounding to ~6e-5), 2 at the coarsest FPN level."""
    m = int(embedder.size_multiple)
    return (2 * m, 2 * m, 2 * m) if isinstance(embedder, PublishedAEFMEmbedder) else (m, m, 2 * m)


# ---- import ------------------------------------------------------------------------------------------------
def import_published(fmt: str, checkpoint: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                     modality: str = "ct", network_config: Mapping[str, Any] | None = None,
                     overwrite: bool = False, register: bool = False, registry: str | os.PathLike | None = None,
                     progress: Progress | None = None, tolerance: float = 1e-3) -> ImportResult:
    """Turn a downloaded published checkpoint into the model package ``out`` (``.aemodel``).

    ``network_config`` overrides the published constructor (only for non-published sizes, e.g. tests); the
    card then says so. ``tolerance``: the largest ONNX-vs-torch difference accepted on a random input (float32
    rounding is ~1e-6..1e-5 on these unit vectors; an export bug shows as 1e-1). ``register`` adds the package to the model registry (``registry`` = its JSON file).
    Raises ``ValueError`` (wrong format, missing/unexpected keys, shape mismatch, truncated file, ONNX not
    matching torch), ``FileNotFoundError`` and ``FileExistsError`` (``out`` exists and not ``overwrite``).
    """
    from anatomical_embedding.inference.export import export_embedder, verify_parity

    def report(fraction: float, message: str) -> None:
        log.info("%s", message)
        if progress is not None:
            progress(fraction, message)

    fmt = str(fmt).lower()
    checkpoint = Path(checkpoint)
    out = Path(out)
    if out.suffix != ".aemodel":
        raise ValueError(f"model packages end in .aemodel, got {out.name}")
    if out.exists() and not overwrite:  # checked first: the export below takes a while
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    name = name or out.stem
    report(0.05, f"reading {checkpoint.name} as {fmt}")
    embedder, info = build_published_embedder(fmt, checkpoint, modality, network_config)
    report(0.3, "exporting the network to ONNX")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".import-", dir=out.parent) as tmp:
        staged = export_embedder(embedder, info, Path(tmp) / "staged.aemodel", overwrite=True)
        report(0.75, "checking the ONNX graph against torch")
        diff = verify_parity(staged, embedder, size_kji=_check_sizes(embedder))
        if not diff <= tolerance:
            raise ValueError(f"the exported ONNX graph differs from torch by {diff:.2e} (> {tolerance:g}); "
                             "please report this with the checkpoint's sha256")
        extra = _card_extra(fmt, info, embedder, checkpoint, name, network_config)
        extra["export_check_max_abs_diff"] = float(diff)
        report(0.9, f"writing {out.name}")
        card = _rewrite_with_card(staged, out, extra, overwrite)
    entry = None
    if register:
        from anatomical_embedding.inference.registry import register_model

        entry = register_model(out, name=name, path=registry)
        report(0.97, f"registered as {name!r}")
    report(1.0, f"imported {fmt} -> {out} (ONNX vs torch {diff:.1e})")
    return ImportResult(out, card, entry)


__all__ = [
    "AEFM_PUBLISHED_INFO",
    "FORMATS",
    "HDSSL_CAVEAT",
    "PUBLISHED_SOURCES",
    "ImportResult",
    "PublishedAEFMEmbedder",
    "build_published_embedder",
    "import_published",
    "published_info",
]
