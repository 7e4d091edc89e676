# ruff: noqa: N999  (Slicer names module helper packages <Module>Lib)
"""Slicer-side helpers of the AnatomicalEmbedding module (kept out of the main module file)."""
