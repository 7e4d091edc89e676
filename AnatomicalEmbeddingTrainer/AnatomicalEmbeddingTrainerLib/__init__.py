# ruff: noqa: N999  (Slicer names module helper packages <Module>Lib)
"""Slicer-side code of the AnatomicalEmbeddingTrainer module (logic, settings, live view), kept out of the module file."""
