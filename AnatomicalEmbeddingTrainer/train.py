#!/usr/bin/env python
"""Compatibility launcher for the documented ``AnatomicalEmbeddingTrainer/train.py`` command of a source checkout.

The training script is ``AnatomicalEmbeddingTrainerLib/train.py`` (Slicer loads every ``.py`` at the top of a
module folder as a module, so the script moved into the Lib folder). This file is not installed with the
extension (the Trainer's CMakeLists does not list it); it runs the real script with the same arguments and exit
code, for ``python``, ``torchrun`` and ``Slicer --python-script`` alike.
"""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    script = Path(globals().get("__file__") or sys.argv[0]).resolve().parent / "AnatomicalEmbeddingTrainerLib" / "train.py"
    sys.argv[0] = str(script)
    runpy.run_path(str(script), run_name="__main__")
