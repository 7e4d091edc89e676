"""Python packages the viewer's engine needs: which are missing, and installing them only after the user agrees."""
from __future__ import annotations

import importlib
import importlib.util
import shutil
from typing import Callable, Sequence

import slicer

#: Python packages the engine needs that Slicer does not ship, as (import name, pip requirement).
ENGINE_PACKAGES = (("scipy", "scipy>=1.10"), ("SimpleITK", "SimpleITK>=2.3"))


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def cudaAvailable() -> bool:
    """NVIDIA GPU with a driver present (decides onnxruntime-gpu vs onnxruntime)."""
    if shutil.which("nvidia-smi"):
        return True
    torch = importlib.sys.modules.get("torch")  # only when something imported it already: never import torch here
    return bool(torch is not None and torch.cuda.is_available())


def requiredPackages(backend: str, cudaAvailable: Callable[[], bool]) -> list:
    """(import name, pip requirement) the chosen backend needs; torch is handled separately."""
    packages = list(ENGINE_PACKAGES)
    if backend == "ONNX Runtime":
        packages.append(("onnxruntime", "onnxruntime-gpu" if cudaAvailable() else "onnxruntime"))
    return packages


def install(missing: Sequence[str], needTorch: bool) -> bool:
    """Ask, then pip-install ``missing`` and torch (through the PyTorch extension); False when declined or failed."""
    if missing:
        if not slicer.util.confirmOkCancelDisplay(
                "AnatomicalEmbedding needs these Python packages: " + ", ".join(missing)
                + ".\nInstall them now with pip? (this may take a few minutes)"):
            return False
        packaging = getattr(slicer, "packaging", None)
        installer = getattr(packaging, "pip_ensure", None) if packaging is not None else None
        (installer or slicer.util.pip_install)(missing)
        importlib.invalidate_caches()
    if needTorch:
        try:
            import PyTorchUtils  # the PyTorch extension picks the right CUDA build
        except ImportError:
            slicer.util.errorDisplay("The torch backend needs PyTorch: install the PyTorch extension from the "
                                     "Extensions Manager, or use the ONNX Runtime backend with a .aemodel package.")
            return False
        if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
            return False
    return True
