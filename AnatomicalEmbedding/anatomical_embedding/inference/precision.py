"""Reduced-precision model packages (``export --precision``): fp16 and int8 copies of an fp32 package, with
their parity to fp32 measured on image windows and written into the model card.

* ``fp16``: every weight and activation in half precision (``onnxruntime.transformers.float16``), inputs and
  outputs kept float32. Meant for ONNX Runtime on CUDA (half the memory); ONNX Runtime's CPU provider has
  few fp16 kernels and inserts casts, so on a CPU it is *slower* than fp32 (see
  ``benchmarks/results/embedding.md``).
* ``int8``: static QDQ quantisation (``onnxruntime.quantization.quantize_static``), per-channel int8 weights,
  uint8 activations, MinMax ranges calibrated on windows of the user's images at the model's spacing and
  intensity preset. Fast on CPUs with int8 dot-product instructions (VNNI/AMX); the loss depends on the
  network, hence the measured parity. Weights use 7 of the 8 bits (``reduce_range``): without VNNI, ONNX
  Runtime's u8s8 kernels sum pairs of products in saturating 16-bit integers, and on an AVX2-only AMD EPYC a
  full-range package's smoke-test cosine to fp32 fell to 0.72 (test_benchmarks' bound is 0.9).

Parity (card ``precision``): per-voxel cosine similarity of the coarse and fine maps to fp32 on held-out
windows (never the calibration ones). The defaults stay fp32: a reduced-precision package is an explicit
choice.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anatomical_embedding.inference.backends import COARSE_ONNX_NAME, ONNX_NAME, read_package, sha256_bytes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
_HASH_KEYS = {ONNX_NAME: "onnx_sha256", COARSE_ONNX_NAME: "coarse_onnx_sha256"}


def check_precision(precision: str, calibration_images: Sequence[str | os.PathLike] | None) -> None:
    """Refuse bad arguments before any work starts."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "int8" and not calibration_images:
        raise ValueError("--precision int8 needs --calibration-images (a few images like those the model will "
                         "embed) to set the activation ranges")
    for p in calibration_images or ():
        if not Path(p).is_file():
            raise FileNotFoundError(f"calibration image not found: {p}")


def image_windows(package: str | os.PathLike, images: Sequence[str | os.PathLike], n_per_image: int = 6,
                  seed: int = 0) -> list[np.ndarray]:
    """(1, 1, k, j, i) windows of the model's patch size, drawn (seeded) from ``images`` prepared exactly as
    embedding prepares them (reorientation, spacing, intensity preset, padding)."""
    from anatomical_embedding.inference.backends import OnnxModel
    from anatomical_embedding.inference.embedding import EmbedConfig, prepare_volume, window_kji
    from anatomical_embedding.io import read_image

    model = OnnxModel(package, device="cpu")
    m = model.size_multiple
    win = window_kji(model, EmbedConfig())
    rng = np.random.default_rng(seed)
    out = []
    for path in images:
        prepared, _, _ = prepare_volume(model, read_image(path), EmbedConfig())
        arr = prepared.array
        w = np.minimum(win, np.asarray(arr.shape))
        for _ in range(n_per_image):
            s = [int(rng.integers(0, n - x + 1)) // m * m for n, x in zip(arr.shape, w)]
            out.append(np.ascontiguousarray(arr[s[0]:s[0] + w[0], s[1]:s[1] + w[1], s[2]:s[2] + w[2]])[None, None])
    return out


def smooth_windows(package: str | os.PathLike, n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Smooth random fields of the model's patch size with unit spread: the parity inputs when no images
    are given (fp16 only; its error hardly depends on the input)."""
    from scipy.ndimage import gaussian_filter

    from anatomical_embedding.inference.backends import OnnxModel
    from anatomical_embedding.inference.embedding import EmbedConfig, window_kji

    win = tuple(int(v) for v in window_kji(OnnxModel(package, device="cpu"), EmbedConfig()))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = gaussian_filter(rng.standard_normal(win), 2.0)
        out.append(((x - x.mean()) / x.std()).astype(np.float32)[None, None])
    return out


def _to_fp16(onnx_bytes: bytes) -> bytes:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=True)
    return model.SerializeToString()


def _to_int8(onnx_bytes: bytes, calibration: list[np.ndarray]) -> bytes:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load_from_string(onnx_bytes).graph.input[0].name
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{input_name: x} for x in calibration])

        def get_next(self):
            return next(self._it, None)

    with tempfile.TemporaryDirectory(prefix="ae_quant_") as tmp:
        src, pre, dst = (Path(tmp) / n for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(onnx_bytes)
        # ONNX shape inference + graph clean-up, as ORT recommends; the symbolic pass cannot follow the dynamic
        # axes through our resizes and is skipped.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # uint8 activations: measured 1.4x faster than int8 ones on the CPU provider (u8s8 kernels).
        # CalibMaxIntermediateOutputs: merge the min/max ranges a few windows at a time (the same ranges) instead
        # of holding every activation of every window (7 GB for six 96^3 windows of the published-size AEFM).
        # onnxruntime 1.32 refuses a chunk size that divides the window count ("No data is collected").
        n = len(calibration)
        chunk = next((c for c in range(2, n) if n % c), None)
        quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True,  # 7-bit weights: see the module docstring
                        extra_options={"CalibMaxIntermediateOutputs": chunk} if chunk else {})
        return dst.read_bytes()


def _session(onnx_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def voxel_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity per voxel of two (N, C, ...) maps, flattened."""
    num = (a * b).sum(1)
    return (num / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)).ravel()


def parity(reference: bytes, candidate: bytes, windows: list[np.ndarray]) -> dict:
    """Cosine similarity of each output of ``candidate`` to ``reference`` per voxel over ``windows``."""
    ref, cand = _session(reference), _session(candidate)
    name = ref.get_inputs()[0].name
    outputs = [o.name for o in ref.get_outputs()]
    cos: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
    for x in windows:
        for o, r, c in zip(outputs, ref.run(outputs, {name: x}), cand.run(outputs, {name: x})):
            cos[o].append(voxel_cosines(r.astype(np.float32), c.astype(np.float32)))
    out = {}
    for o, parts in cos.items():
        v = np.concatenate(parts)
        out[o] = {"cosine_mean": round(float(v.mean()), 5), "cosine_p01": round(float(np.percentile(v, 1)), 5),
                  "cosine_min": round(float(v.min()), 5)}
    return out


def convert_package(package: str | os.PathLike, out: str | os.PathLike, precision: str,
                    calibration_images: Sequence[str | os.PathLike] | None = None, overwrite: bool = False,
                    windows_per_image: int = 6, seed: int = 0) -> Path:
    """Write ``out``: the fp32 ``package`` at ``precision``, its parity to fp32 in the card's ``precision``.

    Windows from ``calibration_images`` are split in two: even ones calibrate int8, odd ones measure parity.
    """
    from anatomical_embedding.inference.backends import write_package

    check_precision(precision, calibration_images)
    card, members = read_package(package)
    if card.get("precision", {}).get("dtype", "fp32") != "fp32":
        raise ValueError(f"{package} is already {card['precision']['dtype']}; convert the fp32 package instead")
    if precision == "fp32":
        raise ValueError("the package is fp32 already; choose --precision fp16 or int8")
    if calibration_images:
        windows = image_windows(package, calibration_images, windows_per_image, seed)
        source = f"{len(windows) - len(windows) // 2} windows of {len(calibration_images)} image(s)"
    else:
        windows = smooth_windows(package, 2 * windows_per_image, seed)
        source = f"{len(windows) - len(windows) // 2} smooth random windows (no images given)"
    calib, held_out = windows[0::2], windows[1::2] or windows[:1]
    converted, report = dict(members), {}
    for name in (ONNX_NAME, COARSE_ONNX_NAME):
        if name not in members:
            continue
        if precision == "fp16":
            data = _to_fp16(members[name])
        else:
            data = _to_int8(members[name], calib)
        converted[name] = data
        card[_HASH_KEYS[name]] = sha256_bytes(data)
        if name == ONNX_NAME:
            report = parity(members[name], data, held_out)
    card["precision"] = {"dtype": precision, "parity_inputs": source, **report,
                         "reference_onnx_sha256": sha256_bytes(members[ONNX_NAME])}
    if precision == "int8":
        card["precision"]["calibration"] = f"MinMax over {len(calib)} windows, per-channel int8 weights, uint8 activations"
    out = Path(out)
    write_package(out, card, converted, overwrite)
    log.info("wrote %s (%s): %s", out, precision, report)
    return out


__all__ = ["PRECISIONS", "check_precision", "convert_package", "image_windows", "parity", "smooth_windows",
           "voxel_cosines"]
