"""The coarse embedding of one volume in a child process, so it progresses while Slicer holds the interpreter lock.

Slicer's PythonQt keeps the GIL while the Qt event loop idles, so a Python worker thread only runs when the main
thread gives the lock up. A child process has its own interpreter: it embeds the volume into the shared disk cache
(:class:`~anatomical_embedding.inference.embedding.EmbeddingCache`) whatever the GUI does, and the viewer then loads
the coarse map from the cache as usual (a cache hit, no network run).

Parent side: :class:`EmbeddingProcess` writes the volume to a temporary ``.npz`` (the voxels and the float64
geometry bit for bit, so the child computes the same cache key), starts ``python -m
AnatomicalEmbeddingLib.subprocess_job`` (PythonSlicer inside Slicer) and relays its progress; :meth:`stop` (any
thread) terminates it. Child side: :func:`main` prints one JSON object per line on stdout: ``started`` (its pid),
``progress`` (network windows done of expected), ``done`` (the cache key) or ``error`` (one line), and exits 0 or 1.

Nothing here imports slicer or torch at module level: the child loads only the engine.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Callable, Optional

#: The folder that holds AnatomicalEmbeddingLib and the engine package (the child's PYTHONPATH).
MODULE_DIR = pathlib.Path(__file__).resolve().parents[1]


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer: the same packages) inside Slicer; this interpreter elsewhere."""
    from anatomical_embedding.mrml import slicer_python

    try:
        import slicer
    except ImportError:
        slicer = None
    return slicer_python(getattr(getattr(slicer, "app", None), "slicerHome", None))


class EmbeddingProcess:
    """One volume's coarse map computed by a child process into the disk cache; see the module doc.

    ``run(report)`` blocks the calling (worker) thread in pipe reads, which release the interpreter lock, and
    returns the cache key the child wrote; ``stop()`` may be called from any thread (Cancel) and makes ``run``
    raise InterruptedError. A failed child raises RuntimeError with its last message line.
    """

    def __init__(self, volume, modelPath, backend: str, device: str, cache, config,
                 python: Optional[str] = None, tempDir: Optional[str] = None) -> None:
        self.volume = volume
        self.argsTail = ["--model", str(modelPath), "--backend", backend, "--device", device,
                         "--cache", str(cache.root), "--cache-budget", str(int(cache.budget_bytes)),
                         "--config", json.dumps(dataclasses.asdict(config))]
        self.cacheRoot = pathlib.Path(cache.root)
        self.python = python or pythonExecutable()
        self.tempDir = tempDir
        self.workDir: Optional[pathlib.Path] = None
        self.process: Optional[subprocess.Popen] = None
        self.childPid: Optional[int] = None
        self.stopped = False
        self._lock = threading.Lock()

    # ---- parent ---------------------------------------------------------------------------------
    def command(self, volumePath) -> list:
        return [self.python, "-u", "-m", "AnatomicalEmbeddingLib.subprocess_job", "--volume", str(volumePath),
                *self.argsTail]

    @staticmethod
    def environment() -> dict:
        env = dict(os.environ)
        paths = [str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        """Write the volume to a temporary file and start the child (refused once stopped)."""
        import numpy as np

        self.workDir = pathlib.Path(tempfile.mkdtemp(prefix="AnatomicalEmbedding-embed-", dir=self.tempDir))
        path = self.workDir / "volume.npz"
        v = self.volume
        with open(path, "wb") as f:  # uncompressed: fast, and exact (dtype, shape, float64 geometry)
            np.savez(f, array=v.array, spacing=v.spacing, origin=v.origin, direction=v.direction)
        self.volume = None  # the child reads the file; this copy of the voxels is not needed any more
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # stop() signals the group: PythonSlicer is a launcher with a child
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with self._lock:
            if self.stopped:
                raise InterruptedError("embedding cancelled")
            self.process = subprocess.Popen(self.command(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.environment(), cwd=str(self.workDir),
                                            **kwargs)

    def stop(self, force: bool = False) -> None:
        """Terminate the child (any thread; safe before start and after the end); ``force``: SIGKILL."""
        with self._lock:
            self.stopped = True
            proc = self.process
            if proc is None or proc.poll() is not None:
                return
            try:
                if os.name == "posix":
                    os.killpg(proc.pid, signal.SIGKILL if force else signal.SIGTERM)
                else:  # pragma: no cover - Windows: the launcher and its python
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
            except ProcessLookupError:
                pass

    def run(self, report: Callable[[float, str], bool]) -> str:
        """Start the child, relay its progress to ``report`` (False stops it) and return its cache key."""
        try:
            if not report(0.0, "starting a separate process"):
                self.stop()
            self.start()
            tail: collections.deque = collections.deque(maxlen=20)
            key, error = None, None
            for line in self.process.stdout:  # blocking reads: the interpreter lock is free meanwhile
                event = _event(line.decode("utf-8", "replace"))
                if event is None:
                    text = line.decode("utf-8", "replace").strip()
                    if text:
                        tail.append(text)
                        logging.debug("embedding process: %s", text)
                    continue
                kind = event.get("event")
                if kind == "started":
                    self.childPid = int(event.get("pid", 0)) or None
                elif kind == "progress":
                    done, total = int(event["window"]), max(int(event["windows"]), 1)
                    if not report(min(0.99, done / total), f"window {done}/{total} (separate process)"):
                        self.stop()
                elif kind == "done":
                    key = str(event["key"])
                elif kind == "error":
                    error = str(event.get("message", ""))
            rc = self.process.wait()
            if self.stopped:
                raise InterruptedError("embedding cancelled")
            if rc != 0 or key is None:
                if tail:
                    logging.warning("embedding process output:\n%s", "\n".join(tail))
                reason = error or (tail[-1] if tail else "no output")
                status = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
                raise RuntimeError(f"{reason} (embedding process, {status})")
            return key
        finally:
            self.stop()
            if self.process is not None:
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.stop(force=True)
                    self.process.wait()
                self.process.stdout.close()
                self._removeStrayCacheFiles()
            if self.workDir is not None:
                shutil.rmtree(self.workDir, ignore_errors=True)

    def _removeStrayCacheFiles(self) -> None:
        """A child killed while saving leaves its temporary file (EmbeddingCache._save names every one, coarse or
        dense fine map, ``.<name>.<pid>.tmp``)."""
        for pid in {self.childPid, self.process.pid} - {None}:
            for path in self.cacheRoot.glob(f"*/.*.{pid}.tmp"):
                path.unlink(missing_ok=True)


def _event(line: str) -> Optional[dict]:
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# ---- child ------------------------------------------------------------------------------------------
class _CountingModel:
    """The engine model, printing a progress line before each network window."""

    def __init__(self, model, windows: int, emit: Callable[..., None]) -> None:
        self._model, self._windows, self._emit, self._count = model, windows, emit, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_patch(self, x, want_fine: bool = True):
        self._count += 1
        self._emit("progress", window=self._count, windows=max(self._windows, self._count))
        return self._model.embed_patch(x, want_fine=want_fine)


def _emit(kind: str, **fields) -> None:
    print(json.dumps({"event": kind, **fields}), flush=True)


def main(argv: Optional[list] = None) -> int:
    """The child: embed ``--volume`` (an .npz of array, spacing, origin, direction) into the cache."""
    parser = argparse.ArgumentParser(prog="python -m AnatomicalEmbeddingLib.subprocess_job",
                                     description="coarse embedding of one volume into the embedding cache")
    for name in ("--volume", "--model", "--backend", "--device", "--cache", "--config"):
        parser.add_argument(name, required=True)
    parser.add_argument("--cache-budget", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _emit("started", pid=os.getpid())
    try:
        import numpy as np

        from anatomical_embedding.inference.backends import open_model
        from anatomical_embedding.inference.embedding import (EmbedConfig, EmbeddingCache, embedding_window_count,
                                                              embed_volume)
        from anatomical_embedding.io import Volume

        with np.load(args.volume, allow_pickle=False) as f:
            volume = Volume(f["array"], f["spacing"], f["origin"], f["direction"])
        fields = json.loads(args.config)
        config = EmbedConfig(**{**fields, "window": tuple(fields["window"]) if fields.get("window") else None})
        model = open_model(args.model, backend=args.backend, device=args.device)
        cache = EmbeddingCache(args.cache, args.cache_budget)
        counting = _CountingModel(model, embedding_window_count(model, volume, config), _emit)
        emb = embed_volume(counting, volume, cache, config)
    except Exception as exc:  # noqa: BLE001 - one line for the parent, the traceback on stderr
        traceback.print_exc()  # stderr: the parent logs it
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _emit("error", message=message, type=type(exc).__name__)
        return 1
    _emit("done", key=emb.key, windows=counting._count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
