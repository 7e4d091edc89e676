"""The viewer's heavy work in a child process, so it progresses while Slicer holds the interpreter lock.

Slicer's PythonQt keeps the GIL while the Qt event loop idles, so a Python worker thread only runs when the main
thread gives the lock up. A child process has its own interpreter: it embeds volumes into the shared disk cache
(:class:`~anatomical_embedding.inference.embedding.EmbeddingCache`) and fits the robust priors of volume pairs
(:func:`~anatomical_embedding.inference.prior.fit_prior`) whatever the GUI does; the viewer then loads the
embeddings from the cache as usual (cache hits, no network run) and the priors from the files the child wrote.
Few-shot training and applying run in a child the same way (:mod:`AnatomicalEmbeddingLib.fewshot_process`).

Parent side: :class:`ChildProcess` is what every such child shares: it writes each volume to a temporary ``.npz``
(the voxels and the float64 geometry bit for bit, so the child computes the same cache key), starts ``python -m
<its module>`` (PythonSlicer inside Slicer), relays its progress and returns what it computed; :meth:`stop` (any
thread) terminates it. :class:`EmbeddingProcess` is the embedding's. :func:`cachedKey` tells, without a child,
whether a volume's embedding is in the cache already. Child side: :func:`main` prints one JSON object per line on
stdout: ``started`` (its pid), ``progress`` (network windows done; at most about ``PROGRESS_STEPS`` lines, so a
parent that cannot read for a while never fills the pipe and blocks the child), ``fitting`` and ``prior`` (a pair's
prior: its file, or why the fit was refused), ``done`` (the cache keys) or ``error`` (one line), and exits 0 or 1.

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
from typing import Callable, Optional, Sequence

#: The folder that holds AnatomicalEmbeddingLib and the engine package (the child's PYTHONPATH).
MODULE_DIR = pathlib.Path(__file__).resolve().parents[1]

#: The child prints a progress line only when its overall fraction passes another 1/PROGRESS_STEPS (plus one at
#: each volume's first window): ~100 bytes a line keeps its whole output far below a pipe's 64 KiB, however many
#: windows, so it never blocks on a parent whose worker thread Slicer starves.
PROGRESS_STEPS = 100

#: Share of the progress bar for the embedding when priors are fitted after it (the rest is the priors').
EMBED_SHARE = 0.8


def pythonExecutable() -> str:
    """Slicer's own Python (PythonSlicer: the same packages) inside Slicer; this interpreter elsewhere."""
    from anatomical_embedding.mrml import slicer_python

    try:
        import slicer
    except ImportError:
        slicer = None
    return slicer_python(getattr(getattr(slicer, "app", None), "slicerHome", None))


def cachedKey(volume, model, cache, config, digest: Optional[str] = None) -> Optional[str]:
    """The volume's cache key when its coarse map, and its dense fine map when ``config.dense_fine`` keeps one, are
    in ``cache`` (embedding it is then a cache read, no child needed); None otherwise.

    Cheap: one hash of the voxels (none when ``digest``, its ``image_hash``, is given) and a few file checks (the
    prepared shape comes from the entry's meta.json).
    """
    from anatomical_embedding.inference.embedding import cache_key, image_hash, reads_dense_map

    key = cache_key(digest or image_hash(volume), model, config)
    entry = cache.entry_dir(key)
    if not (entry / "coarse.npy").is_file():
        return None
    if config.dense_fine:
        try:
            shape = json.loads((entry / "meta.json").read_text(encoding="utf-8"))["prepared_shape_kji"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        # A map over its budget is never computed, so only one within it must be there.
        if reads_dense_map(model, config, shape) and not (entry / "fine_dense.npy").is_file():
            return None
    return key


@dataclasses.dataclass
class ChildResult:
    """What a child computed: each volume's cache key (in the order given) and each requested prior."""

    keys: list
    #: (source index, target index) -> the fitted RobustPrior, or None when the fit was refused.
    priors: dict = dataclasses.field(default_factory=dict)
    #: (source index, target index) -> why the fit was refused (fit_prior's ValueError message).
    refusals: dict = dataclasses.field(default_factory=dict)


class ChildProcess:
    """A child process that computes for a job's worker thread; see the module doc. Subclasses name the child's
    module and arguments, and turn its events into a result.

    ``volumes`` are engine Volumes written for the child (``--volume``, in order); the model, backend, device and
    disk cache are the viewer's. ``run(report)`` blocks the calling (worker) thread in pipe reads, which release
    the interpreter lock, and returns what :meth:`_finish` makes of the child's ``done`` event; ``stop()`` may be
    called from any thread (Cancel) and makes ``run`` raise InterruptedError. A failed child raises its one-line
    message: ValueError when it was bad input (a ValueError in the child), RuntimeError otherwise.
    """

    #: The child's entry point (``python -m``).
    childModule = "AnatomicalEmbeddingLib.subprocess_job"
    #: What the child computes, for messages ("embedding cancelled", "the separate embedding process ...").
    what = "embedding"
    #: What the user may do when the child dies without a word (out of memory, most likely).
    advice = "free memory or embed a smaller volume"
    #: Name prefix of the temporary work folder.
    tempPrefix = "AnatomicalEmbedding-embed-"

    def __init__(self, volumes: Sequence, modelPath, backend: str, device: str, cache,
                 python: Optional[str] = None, tempDir: Optional[str] = None) -> None:
        self.volumes = list(volumes)
        self.argsTail = ["--model", str(modelPath), "--backend", backend, "--device", device,
                         "--cache", str(cache.root), "--cache-budget", str(int(cache.budget_bytes))]
        self.cacheRoot = pathlib.Path(cache.root)
        self.python = python or pythonExecutable()
        self.tempDir = tempDir
        self.workDir: Optional[pathlib.Path] = None
        self.process: Optional[subprocess.Popen] = None
        self.childPid: Optional[int] = None
        self.stopped = False
        #: Progress lines received (tests: the child's throttling).
        self.progressLines = 0
        self._lock = threading.Lock()

    # ---- what subclasses define ----------------------------------------------------------------------
    def arguments(self) -> list:
        """The child's own arguments (besides ``--volume``, ``--out`` and the model's)."""
        return []

    def writeInputs(self) -> list:
        """Write the child's input files into ``workDir`` (the volumes; subclasses add theirs); returns the volumes'
        paths."""
        paths = []
        for n, v in enumerate(self.volumes):
            paths.append(self.workDir / f"volume{n}.npz")
            saveVolume(paths[-1], v)
        self.volumes = []  # the child reads the files; these copies of the voxels are not needed any more
        return paths

    def _message(self, event: dict) -> str:
        """The progress message of a ``progress`` event (or any other with a ``fraction``)."""
        return f"{event.get('message', self.what)} (separate process)"

    def _receive(self, event: dict) -> None:
        """An event other than started/progress/done/error (read while ``workDir`` still exists)."""

    def _finish(self, done: dict):
        """The result of a successful child, from its ``done`` event (``workDir`` still exists)."""
        return done

    def inWorkDir(self, name) -> pathlib.Path:
        """A file the child names: always inside the work folder, never a path the child chose."""
        return self.workDir / pathlib.Path(str(name)).name

    # ---- parent ---------------------------------------------------------------------------------
    def command(self, volumePaths: Sequence) -> list:
        args = [a for p in volumePaths for a in ("--volume", str(p))]
        return [self.python, "-u", "-m", self.childModule, *args, *self.arguments(),
                "--out", str(self.workDir), *self.argsTail]

    @staticmethod
    def environment() -> dict:
        env = dict(os.environ)
        paths = [str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> None:
        """Write the inputs to temporary files and start the child (refused once stopped)."""
        self.workDir = pathlib.Path(tempfile.mkdtemp(prefix=self.tempPrefix, dir=self.tempDir))
        paths = self.writeInputs()
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # stop() signals the group: PythonSlicer is a launcher with a child
        else:  # pragma: no cover - Windows
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        with self._lock:
            if self.stopped:
                raise InterruptedError(f"{self.what} cancelled")
            # stderr joins stdout: one pipe, read to its end by run(), so neither can fill up unread.
            self.process = subprocess.Popen(self.command(paths), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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

    def run(self, report: Callable[[float, str], bool]):
        """Start the child, relay its progress to ``report`` (False stops it) and return what it computed."""
        try:
            if not report(0.0, "starting a separate process"):
                self.stop()
            self.start()
            return self._relay(report)
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

    def _relay(self, report: Callable[[float, str], bool]):
        """Read the child's output to its end (blocking reads: the interpreter lock is free meanwhile)."""
        tail: collections.deque = collections.deque(maxlen=20)
        done, error = None, None
        for line in self.process.stdout:
            text = line.decode("utf-8", "replace").strip()
            event = _event(text)
            if event is None:
                if text:
                    tail.append(text)
                    # the child's warnings (e.g. a prior refined from the centres of mass) reach the user's log
                    (logging.warning if text.startswith("WARNING ") else logging.debug)("%s process: %s", self.what,
                                                                                        text)
                continue
            kind = event.get("event")
            if kind == "started":
                self.childPid = int(event.get("pid", 0)) or None
            elif "fraction" in event:  # progress (and the embedding's "fitting")
                self.progressLines += kind == "progress"
                if not report(min(0.99, float(event["fraction"])), self._message(event)):
                    self.stop()
            elif kind == "done":
                done = event
            elif kind == "error":
                error = event
            else:
                self._receive(event)
        rc = self.process.wait()
        if self.stopped:
            raise InterruptedError(f"{self.what} cancelled")
        if rc != 0 or done is None:
            raise _failure(rc, error, tail, self.what, self.advice)
        return self._finish(done)

    def _removeStrayCacheFiles(self) -> None:
        """A child killed while saving leaves its temporary file (EmbeddingCache._save names every one, coarse or
        dense fine map, ``.<name>.<pid>.tmp``)."""
        for pid in {self.childPid, self.process.pid} - {None}:
            for path in self.cacheRoot.glob(f"*/.*.{pid}.tmp"):
                path.unlink(missing_ok=True)


class EmbeddingProcess(ChildProcess):
    """Volumes embedded, and priors fitted, by a child process into the disk cache; see the module doc.

    ``volumes`` are engine Volumes; ``priors`` (source index, target index) pairs of them whose robust prior
    (the Matcher's default PriorConfig) the child fits after embedding them all; ``names`` label the progress
    messages. ``run(report)`` returns a :class:`ChildResult` (see :class:`ChildProcess`).
    """

    def __init__(self, volumes: Sequence, modelPath, backend: str, device: str, cache, config,
                 priors: Sequence[tuple] = (), names: Optional[Sequence[str]] = None,
                 python: Optional[str] = None, tempDir: Optional[str] = None) -> None:
        super().__init__(volumes, modelPath, backend, device, cache, python, tempDir)
        self.priors = [(int(i), int(j)) for i, j in priors]
        self.names = list(names) if names is not None else [f"volume {n + 1}" for n in range(len(self.volumes))]
        self.argsTail += ["--config", json.dumps(dataclasses.asdict(config))]
        self._result = ChildResult([])

    def arguments(self) -> list:
        return [a for i, j in self.priors for a in ("--prior", str(i), str(j))]

    def _message(self, event: dict) -> str:
        if event["event"] == "progress":
            name = self.names[int(event["volume"])]
            return f"embedding {name}: window {int(event['window'])}/{int(event['windows'])} (separate process)"
        i, j = event["pair"]
        return f"fitting the robust prior {self.names[i]} -> {self.names[j]} (separate process)"

    def _receive(self, event: dict) -> None:
        """Load a prior the child wrote (before run() removes the folder), or note why it was refused."""
        from anatomical_embedding.inference.prior import load_prior

        if event.get("event") != "prior":
            return
        pair = tuple(int(n) for n in event["pair"])
        if "refused" in event:
            self._result.priors[pair], self._result.refusals[pair] = None, str(event["refused"])
        else:
            self._result.priors[pair] = load_prior(self.inWorkDir(event["file"]))

    def _finish(self, done: dict) -> ChildResult:
        self._result.keys = [str(k) for k in done["keys"]]
        return self._result


def saveVolume(path, volume) -> None:
    """An engine Volume as an uncompressed ``.npz``: fast, and exact (dtype, shape, float64 geometry)."""
    import numpy as np

    with open(path, "wb") as f:
        np.savez(f, array=volume.array, spacing=volume.spacing, origin=volume.origin, direction=volume.direction)


def loadVolume(path):
    """The engine Volume :func:`saveVolume` wrote (no pickle)."""
    import numpy as np

    from anatomical_embedding.io import Volume

    with np.load(path, allow_pickle=False) as f:
        return Volume(f["array"], f["spacing"], f["origin"], f["direction"])


def _failure(rc: int, error: Optional[dict], tail, what: str = ChildProcess.what,
             advice: str = ChildProcess.advice) -> Exception:
    """The exception for a failed child: its own one-line message (ValueError for bad input), else a one-line
    account of the crash; the details go to the log."""
    status = f"exit code {rc}" if rc >= 0 else f"killed by signal {-rc}"
    if tail:
        logging.warning("%s process (%s) output:\n%s", what, status, "\n".join(tail))
    if error is not None and error.get("message"):
        return (ValueError if error.get("bad_input") else RuntimeError)(str(error["message"]))
    last = tail[-1] if tail else "no output"
    return RuntimeError(f"the separate {what} process ended without a result ({status}; last output: {last}); "
                        f"see the Python log, and {advice}")


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
def emit(kind: str, **fields) -> None:
    """One event for the parent: a JSON line on stdout, flushed at once."""
    print(json.dumps({"event": kind, **fields}, separators=(",", ":")), flush=True)


class _Progress:
    """The child's progress lines: network windows over every volume it computes, then the priors; throttled to
    about ``PROGRESS_STEPS`` lines (see there)."""

    def __init__(self, windows: Sequence[int], priors: int) -> None:
        self.windows = list(windows)
        self.total = max(sum(self.windows), 1)
        self.embedShare = 0.0 if not sum(self.windows) else (EMBED_SHARE if priors else 1.0)
        self.priors = priors
        self.done = 0
        self.step = -1
        self.volume = -1

    def window(self, volume: int, count: int) -> None:
        self.done += 1
        fraction = self.embedShare * min(self.done / self.total, 1.0)
        step = int(fraction * PROGRESS_STEPS)
        if step != self.step or volume != self.volume:
            self.step, self.volume = step, volume
            emit("progress", volume=volume, window=count, windows=max(self.windows[volume], count),
                  fraction=round(fraction, 4))

    def prior(self, index: int, pair: tuple) -> None:
        fraction = self.embedShare + (1.0 - self.embedShare) * index / max(self.priors, 1)
        emit("fitting", pair=list(pair), index=index, count=self.priors, fraction=round(fraction, 4))


class CountingModel:
    """The engine model, counting network windows (for :class:`_Progress` when given one)."""

    def __init__(self, model, progress: Optional[_Progress] = None) -> None:
        self._model, self._progress, self._count, self.volume = model, progress, 0, 0
        #: Network windows run in all (the few-shot child reports them: the sample cache's effect).
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def start(self, volume: int) -> None:
        self.volume, self._count = volume, 0

    def embed_patch(self, x, want_fine: bool = True):
        self._count += 1
        self.calls += 1
        if self._progress is not None:
            self._progress.window(self.volume, self._count)
        return self._model.embed_patch(x, want_fine=want_fine)


def childParser(prog: str, description: str, out: str) -> argparse.ArgumentParser:
    """The arguments every child takes: its volumes, its output folder, the model and the disk cache."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--volume", action="append", required=True, help="an .npz of array, spacing, origin, "
                        "direction (repeat for several)")
    parser.add_argument("--out", default=".", help=out)
    for name in ("--model", "--backend", "--device", "--cache"):
        parser.add_argument(name, required=True)
    parser.add_argument("--cache-budget", type=int, required=True)
    return parser


def openModelAndCache(args: argparse.Namespace) -> tuple:
    """The child's engine model and disk cache, as the parent's (same file, backend, device, cache)."""
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import EmbeddingCache

    return (open_model(args.model, backend=args.backend, device=args.device),
            EmbeddingCache(args.cache, args.cache_budget))


def runChild(work: Callable[[], dict]) -> int:
    """The child's frame: ``started``, then ``done`` with what ``work`` returns, or ``error`` with one line (the
    traceback goes to stderr, which the parent logs); returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    emit("started", pid=os.getpid())
    try:
        fields = work()
    except Exception as exc:  # noqa: BLE001 - one line for the parent, the traceback on stderr
        traceback.print_exc()  # stderr: the parent logs it
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        emit("error", message=message, type=type(exc).__name__, bad_input=isinstance(exc, ValueError))
        return 1
    emit("done", **fields)
    return 0


def _arguments(argv: Optional[list]) -> argparse.Namespace:
    parser = childParser("python -m AnatomicalEmbeddingLib.subprocess_job",
                         "embed volumes into the embedding cache and fit robust priors",
                         "folder for the priors' .npz files")
    parser.add_argument("--prior", nargs=2, type=int, action="append", default=[], metavar=("SOURCE", "TARGET"),
                        help="fit the robust prior between these volumes (indices into --volume; repeatable)")
    parser.add_argument("--config", required=True)
    return parser.parse_args(argv)


def _fitPriors(embs: list, pairs: list, progress: _Progress, out: pathlib.Path) -> None:
    """Fit each pair's prior as Matcher.prior would (a ValueError is a refusal, not a failure) and hand it over."""
    from anatomical_embedding.inference.prior import PriorConfig, fit_prior, save_prior

    for n, (i, j) in enumerate(pairs):
        progress.prior(n, (i, j))
        try:
            prior = fit_prior(embs[i], embs[j], PriorConfig())
        except ValueError as exc:
            emit("prior", pair=[i, j], refused=str(exc))
            continue
        name = f"prior_{i}_{j}.npz"
        save_prior(out / name, prior)  # written in full before the parent hears of it
        emit("prior", pair=[i, j], file=name)


def _embed(args: argparse.Namespace) -> dict:
    """Embed each ``--volume`` into the cache, then fit each ``--prior`` pair into ``--out``; the cache keys."""
    from anatomical_embedding.inference.embedding import EmbedConfig, embedding_window_count, embed_volume, \
        image_hash

    volumes = [loadVolume(path) for path in args.volume]
    fields = json.loads(args.config)
    config = EmbedConfig(**{**fields, "window": tuple(fields["window"]) if fields.get("window") else None})
    model, cache = openModelAndCache(args)
    pairs = [(int(i), int(j)) for i, j in args.prior]
    if any(not 0 <= n < len(volumes) for pair in pairs for n in pair):
        raise ValueError(f"--prior indices must name --volume arguments (0 to {len(volumes) - 1})")
    digests = [image_hash(v) for v in volumes]  # once per volume: the cache check and the embedding share it
    windows = [0 if cachedKey(v, model, cache, config, d) else embedding_window_count(model, v, config)
               for v, d in zip(volumes, digests)]
    progress = _Progress(windows, len(pairs))
    counting = CountingModel(model, progress)
    embs = []
    for n, volume in enumerate(volumes):
        counting.start(n)
        embs.append(embed_volume(counting, volume, cache, config, image_digest=digests[n]))
    _fitPriors(embs, pairs, progress, pathlib.Path(args.out))
    return {"keys": [e.key for e in embs]}


def main(argv: Optional[list] = None) -> int:
    """The embedding child: see :func:`_embed` and the module doc."""
    args = _arguments(argv)
    return runChild(lambda: _embed(args))


if __name__ == "__main__":
    sys.exit(main())
