"""The ONNX model reports the device its session really runs on (issue 19, item 11).

onnxruntime silently falls back to the CPU provider when CUDA's libraries are missing; the device used to be read
from the *requested* providers, so the model card said "cuda" while everything ran on the CPU. onnxruntime's
session is replaced by one that behaves like that fallback (no GPU here); OnnxModel itself is the real class.
"""
from __future__ import annotations

import onnxruntime as ort

from anatomical_embedding.inference import backends


class FallbackSession:
    """InferenceSession after a CUDA start failure: asked for CUDA, runs on CPU only."""

    def __init__(self, model, sess_options=None, providers=None):
        self.requested = list(providers or [])

    def get_providers(self):
        return ["CPUExecutionProvider"]

    def get_inputs(self):
        return [type("Input", (), {"name": "image"})()]


class CudaSession(FallbackSession):
    def get_providers(self):
        return list(self.requested)


def open_with(monkeypatch, session_class):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session_class)
    monkeypatch.setattr(backends, "read_package", lambda path: ({"onnx_sha256": "x"}, {backends.ONNX_NAME: b""}))
    return backends.OnnxModel("model.aemodel", device="auto")


def test_silent_cpu_fallback_is_reported_as_cpu(monkeypatch, caplog):
    model = open_with(monkeypatch, FallbackSession)
    assert model.session.requested[0] == "CUDAExecutionProvider"  # CUDA was asked for ...
    assert model.device == "cpu"  # ... but the session runs on the CPU, and says so
    assert "running on the CPU" in caplog.text


def test_cuda_session_is_reported_as_cuda(monkeypatch):
    assert open_with(monkeypatch, CudaSession).device == "cuda"
