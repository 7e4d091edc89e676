"""A real second process that holds a run folder's training lock (``anatomical_embedding.training.runlock``), as
a training process started elsewhere (a shell, or the child of a Slicer that crashed) does."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

HOLDER = """
import sys, time
from anatomical_embedding.training.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()  # kept: the lock lives as long as its open file
print("locked", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def hold_run_folder(run_dir: Path):
    """Yield the ``Popen`` of a process that holds ``run_dir``'s lock (ended, with SIGKILL, on exit)."""
    import anatomical_embedding

    engine = str(Path(anatomical_embedding.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([engine, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
