"""The viewer's coarse embedding in a child process (issue 19, defect 3): Slicer's PythonQt holds the interpreter
lock while the Qt loop idles, which starves a worker *thread*; a child process has its own interpreter.

On the headless MRML scene with a tiny exported model: the child writes the same cache entry the viewer reads (the
viewer then runs no network window), it finishes while this thread holds the interpreter lock in one long C call
(during which a Python thread, the job worker included, makes no progress at all), Cancel terminates it and leaves
no cache entry and no temporary file, and a child that fails gives the job a one-line error.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
import pytest
from test_embedding import CARD, blob_volume, tiny_aefm
from test_viewer_module import viewer  # noqa: F401 - fixture

from anatomical_embedding import mrml
from anatomical_embedding.inference.embedding import EmbeddingCache, embed_volume


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from anatomical_embedding.inference.export import export_embedder

    return export_embedder(tiny_aefm(0), CARD, tmp_path_factory.mktemp("pkg") / "tiny.aemodel")


def new_logic(viewer, package, cache, subprocess: bool = True):  # noqa: F811
    lg = viewer.AnatomicalEmbeddingLogic(cacheDir=str(cache))
    lg.loadModel(package, "ONNX Runtime", "cpu")
    lg.embedInSubprocess = subprocess
    lg.maxPrecomputedTiles = 0  # no fine-tile warming after the job: the only network runs are the coarse map's
    return lg


def add_volume(scene, shape_kji=(40, 48, 56), seed: int = 0):
    return mrml.volume_to_node(blob_volume(shape_kji, seed=seed), scene, f"blob{seed}")


def wait_for_child(job, timeout: float = 60.0):
    """The job's EmbeddingProcess once its child is started (the worker thread starts it)."""
    t_end = time.monotonic() + timeout
    while job.process is None or job.process.process is None:
        assert not job.done(), f"the job ended without starting a child: {job.future.exception()!r}"
        assert time.monotonic() < t_end, "no child process started"
        time.sleep(0.002)
    return job.process


def coarse_files(cache) -> list:
    return sorted(cache.glob("*/coarse.npy"))


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def hold_interpreter_lock(seconds: float) -> float:
    """Sleep ``seconds`` in one C call *with* the interpreter lock (a ``ctypes.PyDLL`` function keeps it; CDLL
    would release it), as PythonQt's idle Qt loop does; returns the seconds actually held."""
    nanosleep = ctypes.PyDLL(None).nanosleep
    request = _timespec(int(seconds), int(seconds % 1 * 1e9))
    t0 = time.perf_counter()
    nanosleep(ctypes.byref(request), None)
    return time.perf_counter() - t0


def has_exited(pid: int) -> bool:
    """Whether a child process has ended, without reaping it (Popen.poll() answers None while the worker waits)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped by the worker thread
        return True


class Spinner(threading.Thread):
    """A plain Python thread that notes the longest pause between two of its loop iterations."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.longest_pause, self.iterations, self._done = 0.0, 0, threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self._done.is_set():
            now = time.perf_counter()
            self.longest_pause = max(self.longest_pause, now - last)
            self.iterations += 1
            last = now
        # (a pause that ends with stop(): the thread may get the lock back only after the stop request)
        self.longest_pause = max(self.longest_pause, time.perf_counter() - last)

    def stop(self) -> None:
        self._done.set()
        self.join()


def test_child_writes_the_cache_entry_the_viewer_reads(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """The child's coarse map is the in-process one, bit for bit; the viewer reads it from the cache and runs no
    network window; prepareCorrespondenceAsync embeds a missing volume in a child too."""
    node = add_volume(mrml_scene)
    logic = new_logic(viewer, package, tmp_path / "child")
    t0 = time.perf_counter()
    job = logic.embedVolumeAsync(node)
    assert job.wait(timeout=120)
    seconds = time.perf_counter() - t0
    assert job.process is not None and job.process.process.returncode == 0
    assert logic.model.calls == 0  # every window ran in the child; this process only read the cache
    emb = logic.finishJob(job)
    assert logic.isEmbedded(node)
    assert [p.parent.name for p in coarse_files(tmp_path / "child")] == [emb.key]
    assert "window" in job.message and "separate process" in job.message

    # The same volume embedded in this process (another cache): the same key and the same map, exactly.
    reference = new_logic(viewer, package, tmp_path / "thread", subprocess=False)
    t1 = time.perf_counter()
    inproc = reference.embedVolume(node)
    thread_seconds = time.perf_counter() - t1
    assert reference.model.calls > 0
    assert inproc.key == emb.key
    np.testing.assert_array_equal(emb.coarse, inproc.coarse)
    # A third read of the child's cache entry with the engine alone is a hit too (no network run).
    again = embed_volume(logic.model, mrml.node_to_volume(node), EmbeddingCache(tmp_path / "child"),
                         logic.embedConfig)
    assert logic.model.calls == 0 and again.key == emb.key and "network_s" not in again.timings
    print(f"\nsubprocess embedding {seconds:.2f} s (start-up, {reference.model.calls} windows, cache read), "
          f"in-process {thread_seconds:.2f} s")

    # Preparing a pair embeds the missing target in a child as well; the prior fit stays in the worker.
    target = add_volume(mrml_scene, seed=1)
    prep = logic.prepareCorrespondenceAsync(node, [target])
    assert prep.wait(timeout=120)
    logic.finishJob(prep)
    assert prep.process is not None and prep.process.process.returncode == 0
    assert logic.model.calls == 0 and logic.isPrepared(node, [target])
    assert len(coarse_files(tmp_path / "child")) == 2


@pytest.mark.parametrize("in_child", [True, False], ids=["child process", "worker thread"])
def test_embedding_progresses_while_this_thread_holds_the_interpreter_lock(viewer, package, mrml_scene,  # noqa: F811
                                                                            tmp_path, in_child):
    """Holding the interpreter lock in one C call (as Slicer's idle Qt loop does) stops every Python thread, the
    job's worker included: a coarse map computed in a child is written during the hold, one computed in the worker
    thread (the old way, ``embedInSubprocess = False``) only after it."""
    logic = new_logic(viewer, package, tmp_path / "cache", subprocess=in_child)
    # How long one embedding takes on this machine now (with the child's start-up), to size the hold.
    t0 = time.perf_counter()
    warm = logic.embedVolumeAsync(add_volume(mrml_scene, seed=2))
    assert warm.wait(timeout=120)
    logic.finishJob(warm)
    job_seconds = time.perf_counter() - t0
    hold = 3 * job_seconds + 3

    node = add_volume(mrml_scene, seed=3)
    before = coarse_files(tmp_path / "cache")
    spinner = Spinner()
    spinner.start()
    while spinner.iterations < 1000:  # looping
        time.sleep(0.001)
    calls = logic.model.calls
    job = logic.embedVolumeAsync(node)
    reports = []  # when the worker thread reports progress (relayed from the child, or its own windows)
    report = job.report
    job.report = lambda fraction, message="": reports.append(time.perf_counter()) or report(fraction, message)
    if in_child:
        child = wait_for_child(job)
    else:
        t_end = time.monotonic() + 60
        while "window " not in job.message:  # the worker is embedding
            assert not job.done() and time.monotonic() < t_end
            time.sleep(0.001)
    t_hold, wall_hold = time.perf_counter(), time.time()
    held = hold_interpreter_lock(hold)
    ended = has_exited(child.process.pid) if in_child else None
    spinner.stop()
    assert job.wait(timeout=60)
    emb = logic.finishJob(job)
    written = [p for p in coarse_files(tmp_path / "cache") if p not in before]
    # (coarse.npy's mtime is its last read: the entry's meta.json dates the write)
    wrote = (written[0].parent / "meta.json").stat().st_mtime - wall_hold
    print(f"\n{'child' if in_child else 'worker thread'}: one embedding {job_seconds:.2f} s; held the interpreter "
          f"lock {held:.2f} s; spinner's longest pause {spinner.longest_pause:.2f} s; the coarse map was written "
          f"{wrote:.2f} s after the hold began; {len(reports)} progress reports, none during the hold")
    assert held >= hold, "the hold ended early (a signal?): inconclusive"
    # The lock was surely held from just after t_hold until t_hold + hold (the call starts after t_hold, and the
    # thread may be switched out for a moment before it and after it).
    inside = (t_hold + 0.1, t_hold + hold - 0.1)
    # A plain Python thread was stopped for the whole hold ...
    assert spinner.longest_pause >= hold - 0.2
    # ... and so was the job's worker thread (it reports again after the hold).
    assert not [t for t in reports if inside[0] < t < inside[1]] and reports[-1] > inside[1]
    assert len(written) == 1 and written[0].parent.name == emb.key
    if in_child:  # the child ran to its end during the hold; this process ran no network window
        assert ended and child.process.returncode == 0
        assert 0 < wrote <= hold and logic.model.calls == calls
    else:  # the worker thread could finish its windows only after the hold
        assert wrote > hold - 0.01 and logic.model.calls > calls


def test_cancel_terminates_the_child_and_leaves_nothing(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """Cancel stops the child at once (from the main thread); no cache entry, no temporary volume file."""
    logic = new_logic(viewer, package, tmp_path / "cache")
    node = add_volume(mrml_scene, (64, 96, 96), seed=4)  # 75 windows: still embedding when cancelled
    job = logic.embedVolumeAsync(node)
    child = wait_for_child(job)
    t_end = time.monotonic() + 60
    while "window " not in job.message:  # the child has started computing
        assert not job.done() and time.monotonic() < t_end
        time.sleep(0.002)
    assert child.workDir is not None and (child.workDir / "volume.npz").is_file()
    t0 = time.perf_counter()
    job.cancel()
    assert job.wait(timeout=30)
    latency = time.perf_counter() - t0
    with pytest.raises(InterruptedError):
        logic.finishJob(job)
    print(f"\ncancelled at '{job.message}'; job ended {latency * 1000:.0f} ms after Cancel")
    assert child.process.returncode < 0  # terminated by a signal, not finished
    assert not child.workDir.exists()
    assert coarse_files(tmp_path / "cache") == [] and list((tmp_path / "cache").glob("*/.*.tmp")) == []
    assert logic.model.calls == 0 and not logic.isEmbedded(node)


def test_failing_child_gives_a_one_line_error(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """A child that cannot open the model ends the job with its one-line message, not a hang."""
    logic = new_logic(viewer, package, tmp_path / "cache")
    corrupt = tmp_path / "corrupt.aemodel"
    corrupt.write_bytes(b"not a model package")
    logic.modelPath = corrupt
    job = logic.embedVolumeAsync(add_volume(mrml_scene))
    child = wait_for_child(job)
    assert job.wait(timeout=60)
    with pytest.raises(RuntimeError) as info:
        logic.finishJob(job)
    message = str(info.value)
    print(f"\n{job.description} failed: {message}")
    assert "\n" not in message and "Traceback" not in message
    assert "not a valid model package" in message and message.endswith("(embedding process, exit code 1)")
    assert not child.workDir.exists() and coarse_files(tmp_path / "cache") == []


def test_inside_slicer_the_child_runs_slicers_python(viewer, mrml_scene, tmp_path, monkeypatch):  # noqa: F811
    """The subprocess is the default only in a real Slicer application, and runs its PythonSlicer (same packages)."""
    import sys
    import types

    import slicer
    from AnatomicalEmbeddingLib import subprocess_job

    assert not viewer.AnatomicalEmbeddingLogic().embedInSubprocess  # headless: the worker thread
    assert subprocess_job.pythonExecutable() == sys.executable
    home = tmp_path / "Slicer-5.8"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "PythonSlicer").write_text("")
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path), slicerHome=str(home)))
    assert viewer.AnatomicalEmbeddingLogic().embedInSubprocess
    assert subprocess_job.pythonExecutable() == str(home / "bin" / "PythonSlicer")
