"""Shared pytest fixtures.

* ``fixtures_mrml``: the headless MRML scene on slicer-core (application logic, colour nodes,
  segmentation converter rules, IO manager, module logics, ``slicer.mrmlScene``).
* ``fixtures_data``: a small phantom cohort and tiny trained models, built once per session.

Slicer's own ``ScriptedLoadableModuleTest`` classes live in each module's ``Testing/Python``
and run inside Slicer; this folder is the pytest suite that runs anywhere.
"""
import os

# Tests are sized for 2 CPU cores; avoid oversubscription between torch and BLAS threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = ["fixtures_mrml", "fixtures_data"]
