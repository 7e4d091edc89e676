"""Registry of installed model packages (``.aemodel``), shared by the Trainer and the viewer module.

A JSON file holding ``{"models": [entry, ...]}``; an entry is ``{"name", "path", "method", "sha256",
"registered", "run_dir"}``. The Trainer registers a package when a training run has been exported; the
AnatomicalEmbedding module lists ``list_models()`` to offer them. Packages stay where they were written;
the registry only remembers their paths (a missing file is dropped from ``list_models`` by default).

Location (first match): the ``path`` argument, ``$ANATOMICAL_EMBEDDING_MODEL_REGISTRY`` (tests point it at
a temporary file), else ``<user config dir>/AnatomicalEmbedding/installed_models.json`` where the user config
dir is ``%APPDATA%`` on Windows, ``~/Library/Application Support`` on macOS and ``$XDG_CONFIG_HOME`` or
``~/.config`` elsewhere. A plain file (not Slicer settings) so that the engine and the command line see the
same list as Slicer.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ENV_VAR = "ANATOMICAL_EMBEDDING_MODEL_REGISTRY"
FILE_NAME = "installed_models.json"


def registry_path(path: str | os.PathLike | None = None) -> Path:
    if path:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", Path.home() / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "AnatomicalEmbedding" / FILE_NAME


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"model registry {path} is not valid JSON ({exc}); fix or delete it") from exc
    models = data.get("models", []) if isinstance(data, dict) else []
    return [m for m in models if isinstance(m, dict) and m.get("path")]


def _write(path: Path, models: list[dict]) -> None:
    from anatomical_embedding.io import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"models": models}, indent=1)
    atomic_write(path, lambda p: Path(p).write_text(blob, encoding="utf-8"), overwrite=True)


def list_models(path: str | os.PathLike | None = None, include_missing: bool = False) -> list[dict]:
    """Registered packages, most recently registered last."""
    models = _read(registry_path(path))
    return models if include_missing else [m for m in models if Path(m["path"]).is_file()]


def available_models(path: str | os.PathLike | None = None) -> list[dict]:
    """The shipped default models first, then the registered packages (what the viewer's model list shows)."""
    from anatomical_embedding.inference.defaults import builtin_entries

    builtin = builtin_entries()
    shipped = {Path(m["path"]).resolve() for m in builtin}
    return builtin + [m for m in list_models(path) if Path(m["path"]).resolve() not in shipped]


def register_model(package: str | os.PathLike, name: str | None = None, run_dir: str | os.PathLike | None = None,
                   path: str | os.PathLike | None = None) -> dict:
    """Add (or refresh) ``package``; the card is read and checked, so a broken package is refused."""
    from anatomical_embedding.inference.backends import read_package, sha256_file

    package = Path(package).resolve()
    if not package.is_file():
        raise FileNotFoundError(f"model package {package} does not exist")
    card, _ = read_package(package)  # raises on a damaged package: never register one
    entry = {"name": name or package.stem, "path": str(package), "method": card.get("method", ""),
             "sha256": sha256_file(package), "registered": round(time.time(), 3),
             "run_dir": str(Path(run_dir).resolve()) if run_dir else ""}
    reg = registry_path(path)
    models = [m for m in _read(reg) if Path(m["path"]) != package]
    models.append(entry)
    _write(reg, models)
    return entry


def unregister_model(package: str | os.PathLike, path: str | os.PathLike | None = None) -> bool:
    """Forget ``package`` (the file is left alone). True if it was registered."""
    package = Path(package).resolve()
    reg = registry_path(path)
    models = _read(reg)
    keep = [m for m in models if Path(m["path"]) != package]
    if len(keep) != len(models):
        _write(reg, keep)
    return len(keep) != len(models)
