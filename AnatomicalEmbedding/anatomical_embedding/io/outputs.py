"""Output paths checked before any work starts, and written all-or-none.

A command that finds out after minutes of work that its third output exists leaves the first two behind,
and the retry then trips over them. ``check_outputs`` looks at every output first (file ending, existing
file without ``--overwrite``, a folder that can be written), and ``OutputSet`` removes the outputs a
failed command had already created, so a retry starts clean.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Sequence


def _writable_folder(path: Path) -> Path | None:
    """The nearest existing ancestor folder of ``path`` if it is not writable, else None."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        return folder
    return None


def check_output(path: str | os.PathLike, flag: str, overwrite: bool, suffixes: Sequence[str] = ()) -> Path:
    """One output path: ValueError for a wrong ending or an unwritable folder, FileExistsError for an
    existing file without ``--overwrite``. ``flag`` is the CLI option that named it (for the message)."""
    path = Path(path)
    if suffixes and not path.name.lower().endswith(tuple(s.lower() for s in suffixes)):
        raise ValueError(f"{flag} {path.name}: the file name must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; choose another name or pass --overwrite")
    bad = _writable_folder(path)
    if bad is not None:
        raise ValueError(f"{flag} {path}: cannot write into {bad}; choose a writable folder")
    return path


def check_outputs(outputs: Sequence[tuple[str | os.PathLike | None, str, Sequence[str]]], overwrite: bool) -> list[Path]:
    """Check ``(path or None, flag, allowed endings)`` triples; also refuses two outputs with the same path."""
    seen: dict[Path, str] = {}
    out = []
    for path, flag, suffixes in outputs:
        if path is None:
            continue
        p = check_output(path, flag, overwrite, suffixes)
        key = p.resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} name the same file {p}; give each output its own name")
        seen[key] = flag
        out.append(p)
    return out


class OutputSet:
    """Context manager: on an exception, delete the listed outputs that did not exist when it was entered."""

    def __init__(self, paths: Sequence[str | os.PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        self._new = [p for p in self.paths if not p.exists()]

    def __enter__(self) -> "OutputSet":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            for p in self._new:
                p.unlink(missing_ok=True)


__all__ = ["check_output", "check_outputs", "OutputSet"]
