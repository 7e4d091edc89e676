"""Python packages the modules need: which are missing, and installing them with one prompt and visible errors.

Requirements live in ``Resources/Requirements/*.txt`` of each module. One consent prompt covers everything that
is missing (pip packages and PyTorch): on Slicer >= 5.12 ``slicer.packaging.pip_ensure`` shows it (with progress)
and ours is skipped; on older Slicer we ask once and call ``slicer.util.pip_install``. PyTorch comes from the
PyTorch extension (``PyTorchUtils``, which picks the CUDA build) without a second question. Every failure,
including a declined install, is shown in the GUI (``errorDisplay``) and returns False: nothing is raised past the
caller's button handler.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import pathlib
import re
import shutil
from typing import Callable, Optional, Sequence

import slicer

RESOURCES = pathlib.Path(__file__).resolve().parents[1] / "Resources" / "Requirements"
#: Import names of pip distributions whose module name differs.
IMPORT_NAMES = {"simpleitk": "SimpleITK", "onnxruntime-gpu": "onnxruntime", "tomli-w": "tomli_w",
                "scikit-image": "skimage"}


def importable(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def readRequirements(path) -> list:
    """(import name, requirement) of a requirements file (comments and blank lines skipped)."""
    out = []
    for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        dist = re.split(r"[<>=!~;\[ ]", line, 1)[0]
        out.append((IMPORT_NAMES.get(dist.lower(), dist.replace("-", "_")), line))
    return out


#: Python packages the engine needs that Slicer does not ship, as (import name, pip requirement).
ENGINE_PACKAGES = tuple(readRequirements(RESOURCES / "viewer.txt"))


def missingRequirements(path, importable: Callable[[str], bool] = importable) -> list:
    return [req for module, req in readRequirements(path) if not importable(module)]


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


def _error(message: str) -> None:
    logging.error("%s", message)
    try:
        slicer.util.errorDisplay(message, windowTitle="Anatomical Embedding: Python packages")
    except Exception:  # noqa: BLE001 - no GUI (tests, scripts): the log has it
        pass


def install(missing: Sequence[str], needTorch: bool, requester: str = "AnatomicalEmbedding",
            progress: Optional[Callable[[str], None]] = None) -> bool:
    """One prompt, then pip-install ``missing`` and torch (PyTorch extension). False when declined or failed;
    the reason is shown in the GUI. ``progress`` receives status lines (the module's status label)."""
    if not missing and not needTorch:
        return True
    what = list(missing) + (["PyTorch (through the PyTorch extension)"] if needTorch else [])
    packaging = getattr(slicer, "packaging", None)
    pipEnsure = getattr(packaging, "pip_ensure", None) if packaging is not None else None
    # pip_ensure's own prompt covers pip packages only: with PyTorch to install too, we ask once for everything
    # and call pip_ensure without its prompt. Never two questions.
    ownPrompt = pipEnsure is None or needTorch
    if ownPrompt:
        if not slicer.util.confirmOkCancelDisplay(
                f"{requester} needs these Python packages: " + ", ".join(what)
                + ".\nInstall them now? (this may take a few minutes)"):
            _error(f"{requester}: not installed (declined): " + ", ".join(what))
            return False
    try:
        if missing:
            if progress:
                progress("Installing " + ", ".join(missing) + " ...")
            if pipEnsure is not None:
                from packaging.requirements import Requirement

                pipEnsure([Requirement(r) for r in missing], prompt_install=not ownPrompt, requester=requester,
                          show_progress=True)
            else:
                slicer.util.pip_install(list(missing))
            importlib.invalidate_caches()
            still = [r for r in missing if not importable(IMPORT_NAMES.get(
                re.split(r"[<>=!~;\[ ]", r, 1)[0].lower(), re.split(r"[<>=!~;\[ ]", r, 1)[0].replace("-", "_")))]
            if still:
                _error(f"{requester}: these packages are still missing after the install (declined or failed): "
                       + ", ".join(still))
                return False
        if needTorch:
            if progress:
                progress("Installing PyTorch ...")
            try:
                import PyTorchUtils  # the PyTorch extension picks the right CUDA build
            except ImportError:
                _error("PyTorch is needed: install the PyTorch extension from the Extensions Manager and restart "
                       "Slicer (or use the ONNX Runtime backend with a .aemodel package).")
                return False
            # The user already agreed above: no second question.
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                _error("PyTorch was not installed (see the Python console for the reason).")
                return False
    except Exception as exc:  # noqa: BLE001 - pip errors, network, permissions: shown, never raised
        _error(f"{requester}: installing {', '.join(what)} failed: {exc}")
        return False
    finally:
        if progress:
            progress("")
    return True
