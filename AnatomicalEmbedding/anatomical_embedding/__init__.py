"""AnatomicalEmbedding engine: dense anatomical embeddings, matching, few-shot segmentation.

Importable without Slicer. Heavy dependencies (torch, MONAI, onnxruntime) are imported by the
submodules that need them, so that ``import anatomical_embedding`` stays cheap inside Slicer.
"""
__version__ = "0.1.0"
