"""Inference backends behind one interface: ONNX Runtime (no torch) and torch (from a run directory).

``open_model(path)`` accepts a ``.aemodel`` package (see :mod:`export` for its layout) or a training
run directory and returns an :class:`EmbeddingModel`:

* ``card``: the model card (method, modality, spacing along (i, j, k) mm, intensity preset, patch size,
  embedding dimensions, coarse stride, size multiple, ...);
* ``model_hash``: a sha256 identifying the weights (keys the embedding cache);
* ``embed_patch(x)``: ``x`` is ``(1, 1, k, j, i)`` float32 in the model's intensity preset, sizes multiples
  of ``size_multiple``; returns ``(coarse, fine)`` numpy float32 arrays (fine is ``None`` when
  ``want_fine=False``).

The ONNX backend never imports torch, so the Slicer viewer works without it. Sliding windows and
blending live in :mod:`embedding` and are shared by both backends (numpy), which is what keeps them
in parity.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PACKAGE_SUFFIX = ".aemodel"
CARD_NAME = "card.json"
ONNX_NAME = "model.onnx"
COARSE_ONNX_NAME = "coarse.onnx"
#: Member holding the sha256 of every other member, so an edited card is caught without the sidecar.
INTEGRITY_NAME = "integrity.json"


def integrity_record(members: dict[str, bytes]) -> bytes:
    """The ``integrity.json`` bytes for a package's members (names -> sha256, plus one digest over all)."""
    hashes = {n: sha256_bytes(d) for n, d in sorted(members.items()) if n != INTEGRITY_NAME}
    overall = sha256_bytes(json.dumps(hashes, sort_keys=True).encode())
    return json.dumps({"format": 1, "members": hashes, "sha256": overall}, indent=1, sort_keys=True).encode()


def verify_integrity(path: Path, members: dict[str, bytes]) -> None:
    """ValueError when the package's members differ from its ``integrity.json`` (older packages: a warning)."""
    if INTEGRITY_NAME not in members:
        log.warning("model package %s has no %s (exported by an older version): edits to its card cannot be "
                    "detected without the .sha256 sidecar; re-export it", path, INTEGRITY_NAME)
        return
    try:
        record = json.loads(members[INTEGRITY_NAME].decode("utf-8"))
        expected = dict(record["members"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"model package {path} has an unreadable {INTEGRITY_NAME} ({exc}); re-export it") from None
    actual = {n: sha256_bytes(d) for n, d in members.items() if n != INTEGRITY_NAME}
    changed = sorted(n for n in set(expected) | set(actual) if expected.get(n) != actual.get(n))
    if changed or record.get("sha256") != sha256_bytes(json.dumps(expected, sort_keys=True).encode()):
        raise ValueError(f"model package {path}: member(s) {', '.join(changed) or INTEGRITY_NAME} do not match "
                         f"the package's {INTEGRITY_NAME}; the package was modified or damaged: re-export it")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class EmbeddingModel:
    """Common interface; subclasses implement :meth:`_run`."""

    backend: str = "?"

    def __init__(self, card: dict, model_hash: str) -> None:
        self.card = dict(card)
        self.model_hash = model_hash

    # ---- card shortcuts ------------------------------------------------------------------
    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.card["spacing"], dtype=np.float64).reshape(3)

    @property
    def coarse_stride(self) -> int:
        return int(self.card["coarse_stride"])

    @property
    def size_multiple(self) -> int:
        return int(self.card["size_multiple"])

    @property
    def coarse_channels(self) -> int:
        return int(self.card["coarse_channels"])

    @property
    def fine_channels(self) -> int:
        return int(self.card["fine_channels"])

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Training patch size along (i, j, k) (used as the default sliding-window size)."""
        p = self.card.get("patch_size") or [64, 64, 64]
        p = list(np.broadcast_to(np.asarray(p, dtype=int), (3,)))
        return (int(p[0]), int(p[1]), int(p[2]))

    def preset(self):
        from anatomical_embedding.io import get_preset

        return get_preset(self.card["intensity_preset"])

    # ---- inference -----------------------------------------------------------------------
    def embed_patch(self, x: np.ndarray, want_fine: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 5 or x.shape[:2] != (1, 1):
            raise ValueError(f"embed_patch expects (1, 1, k, j, i), got {x.shape}")
        m = self.size_multiple
        if any(s % m for s in x.shape[2:]):
            raise ValueError(f"patch size {x.shape[2:]} must be a multiple of {m} along every axis")
        return self._run(x, want_fine)

    def _run(self, x: np.ndarray, want_fine: bool) -> tuple[np.ndarray, np.ndarray | None]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.card.get('method')!r}, hash={self.model_hash[:12]})"


# ---- ONNX Runtime ----------------------------------------------------------------------------
def write_package(out: Path, card: dict, members: dict[str, bytes], overwrite: bool = False) -> str:
    """Write the package zip (card + ONNX members) atomically and its ``.sha256`` sidecar; returns the digest."""
    from anatomical_embedding.io import atomic_write

    contents = {CARD_NAME: json.dumps(card, indent=1, sort_keys=True).encode("utf-8"),
                **{n: d for n, d in members.items() if n not in (CARD_NAME, INTEGRITY_NAME)}}
    contents[INTEGRITY_NAME] = integrity_record(contents)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name, data in contents.items():
                zf.writestr(name, data)

    atomic_write(out, write, overwrite=overwrite)
    digest = sha256_file(out)
    atomic_write(out.with_name(out.name + ".sha256"), lambda p: p.write_text(f"{digest}  {out.name}\n", encoding="utf-8"),
                 overwrite=True)
    return digest


def read_package(path: str | os.PathLike) -> tuple[dict, dict[str, bytes]]:
    """Read and verify a ``.aemodel`` package; returns (card, {member name: ONNX bytes}).

    Verification: the zip's CRCs (damage), ``integrity.json`` (the sha256 of every member, card included),
    the card's ``onnx_sha256`` against the ONNX bytes, and, when the sidecar ``<package>.sha256`` exists,
    the sha256 of the whole package file (see :mod:`export`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model package not found: {path}")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file():
        expected = sidecar.read_text(encoding="utf-8").split()[0].strip().lower() if sidecar.read_text(encoding="utf-8").strip() else ""
        actual = sha256_file(path)
        if expected != actual:
            raise ValueError(
                f"model package {path} does not match its checksum file {sidecar.name} "
                f"(expected {expected[:16]}..., got {actual[:16]}...): the file is damaged or was modified; "
                "re-export or re-download it"
            )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"model package {path} is damaged (CRC error in {bad}); re-export it")
            names = set(zf.namelist())
            for needed in (CARD_NAME, ONNX_NAME):
                if needed not in names:
                    raise ValueError(f"{path} is not an AnatomicalEmbedding model package (missing {needed})")
            everything = {n: zf.read(n) for n in names}
            verify_integrity(path, everything)
            card = json.loads(everything[CARD_NAME].decode("utf-8"))
            members = {ONNX_NAME: everything[ONNX_NAME]}
            if COARSE_ONNX_NAME in names:
                members[COARSE_ONNX_NAME] = everything[COARSE_ONNX_NAME]
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a valid model package (bad zip: {exc}); re-export it") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"model package {path} has an unreadable card.json ({exc}); re-export it") from exc
    for name, data in members.items():
        field_name = "onnx_sha256" if name == ONNX_NAME else "coarse_onnx_sha256"
        expected = str(card.get(field_name, ""))
        actual = sha256_bytes(data)
        if expected != actual:
            raise ValueError(
                f"model package {path}: {name} does not match the sha256 in its card "
                f"(card {expected[:16] or 'missing'}..., file {actual[:16]}...); the package is damaged or mismatched"
            )
    return card, members


class OnnxModel(EmbeddingModel):
    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int | None = None) -> None:
        import onnxruntime as ort

        card, members = read_package(path)
        super().__init__(card, card["onnx_sha256"])
        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda", "gpu") and "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device in ("cuda", "gpu"):
            raise ValueError("device=cuda requested but onnxruntime has no CUDA provider (install onnxruntime-gpu)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        # The memory pattern pre-plans one block for every intermediate of a run: one 176x128x512 window of the
        # full-size AEFM peaked at 2.7 GB with it and 1.6 GB without, at the same speed (2 cores); the default
        # model's 64^3 windows 229 against 171 MB, also at the same speed. The arena stays (off was slower).
        opts.enable_mem_pattern = False
        self.session = ort.InferenceSession(members[ONNX_NAME], sess_options=opts, providers=providers)
        # The coarse-only graph (when packaged) skips the full-resolution decoder for the whole-volume pass.
        self.coarse_session = (ort.InferenceSession(members[COARSE_ONNX_NAME], sess_options=opts, providers=providers)
                               if COARSE_ONNX_NAME in members else None)
        # What the session really runs on: onnxruntime falls back to CPU silently (missing CUDA/cuDNN libraries),
        # so the requested providers are not the answer.
        self.device = "cuda" if self.session.get_providers()[0].startswith("CUDA") else "cpu"
        if providers[0].startswith("CUDA") and self.device != "cuda":
            log.warning("onnxruntime could not start CUDA (libraries missing?); running on the CPU")
        self._input = self.session.get_inputs()[0].name

    def _run(self, x: np.ndarray, want_fine: bool) -> tuple[np.ndarray, np.ndarray | None]:
        if not want_fine and self.coarse_session is not None:
            return self.coarse_session.run(["coarse"], {self._input: x})[0].astype(np.float32, copy=False), None
        names = ["coarse", "fine"] if want_fine else ["coarse"]
        out = self.session.run(names, {self._input: x})
        return out[0].astype(np.float32, copy=False), (out[1].astype(np.float32, copy=False) if want_fine else None)


# ---- torch ------------------------------------------------------------------------------------
def state_dict_hash(module: Any) -> str:
    """sha256 over the sorted state_dict (names, shapes, bytes): independent of the file layout."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def card_from_embedder(embedder: Any, info: dict | None = None) -> dict:
    """A model card from an Embedder (class attributes) and the run's info (see checkpoints loader)."""
    info = dict(info or {})
    preset = info.get("intensity_preset", "ct_aefm")
    if not isinstance(preset, dict):
        from anatomical_embedding.io import get_preset

        preset = get_preset(preset).to_dict()
    spacing = info.get("spacing", (1.0, 1.0, 1.0))
    return {
        "format": "anatomical-embedding-model",
        "format_version": 1,
        "method": info.get("method", type(embedder).__name__),
        "modality": info.get("modality", "CT"),
        "spacing": [float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=float), (3,))],
        "intensity_preset": preset,
        "patch_size": [int(p) for p in np.broadcast_to(np.asarray(info.get("patch_size", 64)), (3,))],
        "coarse_channels": int(info.get("coarse_channels", embedder.coarse_channels)),
        "fine_channels": int(info.get("fine_channels", embedder.fine_channels)),
        "coarse_stride": int(info.get("coarse_stride", embedder.coarse_stride)),
        "size_multiple": int(info.get("size_multiple", embedder.size_multiple)),
        "training_data": info.get("training_data", {}),
        "engine_version": info.get("engine_version", _engine_version()),
        "step": info.get("step"),
    }


def _engine_version() -> str:
    try:
        from importlib.metadata import version

        return version("anatomical-embedding")
    except Exception:  # noqa: BLE001 - metadata may be absent in a source checkout
        return "unknown"


class TorchModel(EmbeddingModel):
    """Torch backend: an in-memory Embedder, or one loaded from a run directory."""

    backend = "torch"

    def __init__(self, embedder: Any, info: dict | None = None, device: str = "auto", precision: str = "fp32"
                 ) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"torch precision must be fp32 or bf16, got {precision!r}")
        self.device = device
        #: CPU only: "bf16" runs under bfloat16 autocast (oneDNN; 1.7-2x faster measured on a CPU with AVX512-BF16
        #: and AMX, likely slower without them). Opt-in: fp32 is exact. On a GPU fp16 autocast is used (see _run).
        self.precision = precision
        self.embedder = embedder.to(device).eval()
        digest = state_dict_hash(embedder)
        # A bf16 map differs from the fp32 one: the cache key (model hash) must tell them apart.
        super().__init__(card_from_embedder(embedder, info), digest if precision == "fp32" else f"{digest}-{precision}")

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, checkpoint: str = "last", device: str = "auto",
                 precision: str = "fp32") -> "TorchModel":
        from anatomical_embedding.training.checkpoints import load_embedder_from_run

        embedder, info = load_embedder_from_run(run_dir, checkpoint=checkpoint, device="cpu")
        return cls(embedder, info, device=device, precision=precision)

    def _run(self, x: np.ndarray, want_fine: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from contextlib import nullcontext

        from anatomical_embedding.nets.embedder import coarse_forward

        t = torch.from_numpy(x).to(self.device)
        # fp16 on GPU halves memory and time; embeddings are unit vectors, fp16 keeps ~1e-3.
        if self.device.startswith("cuda"):
            amp = torch.autocast("cuda", dtype=torch.float16)
        elif self.precision == "bf16":
            amp = torch.autocast("cpu", dtype=torch.bfloat16)
        else:
            amp = nullcontext()
        with torch.inference_mode(), amp:
            if want_fine:
                coarse, fine = self.embedder(t)
                return coarse.float().cpu().numpy(), fine.float().cpu().numpy()
            return coarse_forward(self.embedder, t).float().cpu().numpy(), None


def is_run_dir(path: Path) -> bool:
    return path.is_dir()


def open_model(path: str | os.PathLike, backend: str = "auto", device: str = "auto",
               checkpoint: str = "last", threads: int | None = None) -> EmbeddingModel:
    """Open a ``.aemodel`` package (ONNX Runtime, or torch is not possible) or a run directory (torch).

    ``backend``: ``auto`` (package -> onnxruntime, run dir -> torch), ``onnxruntime``/``onnx`` or ``torch``.
    A run directory can only be served by torch; export it first for onnxruntime.
    ``threads``: ONNX Runtime's intra-op threads (``None``: its default, one per physical core; it ignores
    ``OMP_NUM_THREADS``). torch takes its threads from ``torch.set_num_threads`` instead.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p} (pass a .aemodel package or a training run directory)")
    backend = {"onnx": "onnxruntime", "ort": "onnxruntime"}.get(backend, backend)
    if backend not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"unknown backend {backend!r}: use auto, onnxruntime or torch")
    if p.is_dir():
        if backend == "onnxruntime":
            raise ValueError(f"{p} is a run directory: export it with `anatomical-embedding export` to use onnxruntime")
        return TorchModel.from_run(p, checkpoint=checkpoint, device=device)
    if backend == "torch":
        raise ValueError(f"{p} is an ONNX package; the torch backend needs the training run directory")
    return OnnxModel(p, device=device, threads=threads)
