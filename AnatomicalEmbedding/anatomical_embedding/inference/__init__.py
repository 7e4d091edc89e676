"""Inference: dense embedding of whole volumes (``embedding``), point matching (``matching``) with the robust
prior (``prior``), model backends and packages (``backends``, ``export``), the model list (``registry``), and
published checkpoints (``pretrained``, ``import_pretrained``).

The ONNX path (``backends.OnnxModel``, ``embedding``, ``matching``, ``prior``, ``registry``) imports neither torch
nor MONAI, so the Slicer viewer runs without them.
"""
