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


def pytest_addoption(parser):
    parser.addoption("--run-demo-quick", action="store_true",
                     help="also run the tests marked demo_quick (the whole `demo --quick`; .ci/run does)")


def pytest_collection_modifyitems(config, items):
    import pytest

    if config.getoption("--run-demo-quick"):
        return
    skip = pytest.mark.skip(reason="`demo --quick` takes minutes: run it with --run-demo-quick (as .ci/run does)")
    for item in items:
        if "demo_quick" in item.keywords:
            item.add_marker(skip)
