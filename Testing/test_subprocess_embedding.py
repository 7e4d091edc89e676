"""The viewer's embeddings and robust priors in a child process (issue 19, defect 3): Slicer's PythonQt holds the
interpreter lock while the Qt loop idles, which starves a worker *thread*; a child process has its own interpreter.

On the headless MRML scene with a tiny exported model: the child writes the same cache entry the viewer reads (the
viewer then runs no network window), it finishes while this thread holds the interpreter lock in one long C call
(during which a Python thread, the job worker included, makes no progress at all), Cancel terminates it (while it
embeds or fits a prior) and leaves no cache entry and no temporary file, a child that fails gives the job its
one-line error (ValueError for bad input), the prior it fits (or refuses) is the one this process would, a cached
volume starts no child, and a child with many windows never blocks on a parent that does not read.
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


def kill_child_once_running(job) -> None:
    """SIGKILL the job's child as soon as its own python runs (it has said hello), before it can finish."""
    child = wait_for_child(job)
    t_end = time.monotonic() + 60
    while child.childPid is None:  # the child's own python is running
        assert not job.done() and time.monotonic() < t_end
        time.sleep(0.002)
    os.kill(child.process.pid, 9)


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

    # Preparing a pair embeds the missing target in a child as well, and fits the prior there.
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
    # Several network windows per volume (the viewer's single pass uses 64^3 windows), so that the worker thread
    # still has windows to run, and to report, after the hold.
    shape = (64, 96, 112)
    warm = logic.embedVolumeAsync(add_volume(mrml_scene, shape, seed=2))
    assert warm.wait(timeout=120)
    logic.finishJob(warm)
    job_seconds = time.perf_counter() - t0
    hold = 3 * job_seconds + 3

    node = add_volume(mrml_scene, shape, seed=3)
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


def cancel_when(logic, job, message: str):
    """Cancel ``job`` once its child runs and its message contains ``message``; check that it ends interrupted.
    Returns the child (its process and work folder, for the caller's checks)."""
    child = wait_for_child(job)
    t_end = time.monotonic() + 60
    while message not in job.message:
        assert not job.done() and time.monotonic() < t_end
        time.sleep(0.002)
    assert child.workDir is not None and (child.workDir / "volume0.npz").is_file()
    t0 = time.perf_counter()
    job.cancel()
    assert job.wait(timeout=30)
    latency = time.perf_counter() - t0
    with pytest.raises(InterruptedError):
        logic.finishJob(job)
    print(f"\ncancelled at '{job.message}'; job ended {latency * 1000:.0f} ms after Cancel")
    return child


def test_cancel_terminates_the_child_and_leaves_nothing(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """Cancel stops the child at once (from the main thread); no cache entry, no temporary volume file."""
    logic = new_logic(viewer, package, tmp_path / "cache")
    # 18 windows of 64^3 (the viewer's single pass): still embedding when cancelled after the first.
    node = add_volume(mrml_scene, (96, 160, 160), seed=4)
    job = logic.embedVolumeAsync(node)
    child = cancel_when(logic, job, "window ")  # the child has started computing
    assert child.process.returncode < 0  # terminated by a signal, not finished
    assert not child.workDir.exists()
    assert coarse_files(tmp_path / "cache") == [] and list((tmp_path / "cache").glob("*/.*.tmp")) == []
    assert logic.model.calls == 0 and not logic.isEmbedded(node)


def test_failing_child_gives_its_one_line_error(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """A child that cannot open the model ends the job with the child's own one-line message, a ValueError as in
    this process (bad input: the user picked a broken file), not a hang and not a generic RuntimeError."""
    logic = new_logic(viewer, package, tmp_path / "cache")
    corrupt = tmp_path / "corrupt.aemodel"
    corrupt.write_bytes(b"not a model package")
    logic.modelPath = corrupt
    job = logic.embedVolumeAsync(add_volume(mrml_scene))
    child = wait_for_child(job)
    assert job.wait(timeout=60)
    with pytest.raises(ValueError) as info:
        logic.finishJob(job)
    message = str(info.value)
    print(f"\n{job.description} failed: {message}")
    assert "\n" not in message and "Traceback" not in message
    assert "not a valid model package" in message and message.endswith("re-export it")
    assert not child.workDir.exists() and coarse_files(tmp_path / "cache") == []


def test_bad_input_in_the_child_is_a_value_error(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """A volume the engine refuses (too small for the model) raises the same one-line ValueError from the child as
    in this process; a child that dies without a word (killed) is a one-line RuntimeError."""
    from anatomical_embedding.inference.embedding import embed_volume as embed

    small = add_volume(mrml_scene, (8, 8, 8), seed=6)
    logic = new_logic(viewer, package, tmp_path / "cache")
    job = logic.embedVolumeAsync(small)
    assert job.wait(timeout=60)
    with pytest.raises(ValueError) as info:
        logic.finishJob(job)
    with pytest.raises(ValueError) as inproc:
        embed(logic.model, mrml.node_to_volume(small), None, logic.embedConfig)
    assert str(info.value) == str(inproc.value) and "\n" not in str(info.value)
    assert "use a larger field of view" in str(info.value) and job.process.process.returncode == 1

    job = logic.embedVolumeAsync(add_volume(mrml_scene, (64, 96, 96), seed=7))
    kill_child_once_running(job)
    assert job.wait(timeout=60)
    with pytest.raises(RuntimeError) as info:
        logic.finishJob(job)
    print(f"\nkilled child: {info.value}")
    assert "killed by signal 9" in str(info.value) and "\n" not in str(info.value)


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


# ---- the robust prior in the child ------------------------------------------------------------------------
def island_volume(shape_kji=(32, 40, 48), radius: float = 10.0, shift_mm=(0.0, 0.0, 0.0)):
    """A blob ball in air (-1000 HU), moved by ``shift_mm`` (LPS): few foreground voxels keep the prior's dense
    refinement short (about a second), and a shifted copy gives a prior that is accepted, spline included."""
    from anatomical_embedding.io import Volume

    v = blob_volume(shape_kji, seed=0)
    kji = np.indices(shape_kji) - np.asarray(shape_kji)[:, None, None, None] / 2
    array = np.where((kji ** 2).sum(axis=0) < radius ** 2, v.array, -1000.0).astype(np.float32)
    return Volume(array, v.spacing, v.origin + np.asarray(shift_mm), v.direction)


def add(scene, volume, name: str):
    return mrml.volume_to_node(volume, scene, name)


def relay_messages(job) -> list:
    """The messages the job's worker reports (in order), recorded as they come."""
    messages = []
    report = job.report
    job.report = lambda fraction, message="": messages.append(message) or report(fraction, message)
    return messages


def in_process_fit_is_refused(monkeypatch):
    """Make this process's Matcher unable to fit a prior (a prior it holds must come from the child)."""
    from anatomical_embedding.inference import matching

    def refuse(*args, **kwargs):
        raise AssertionError("the prior was fitted in this process, not in the child")

    monkeypatch.setattr(matching, "fit_prior", refuse)


def test_prior_fitted_in_the_child_equals_the_in_process_prior(viewer, package, mrml_scene, tmp_path,  # noqa: F811
                                                              monkeypatch):
    """prepareCorrespondenceAsync fits both priors (both ways) in the child; each Matcher holds one that predicts
    what this process's fit predicts, to 1e-9 mm (the same embeddings from the same cache)."""
    from anatomical_embedding.inference.prior import fit_prior

    source = add(mrml_scene, island_volume(), "island")
    target = add(mrml_scene, island_volume(shift_mm=(6.0, -4.0, 2.0)), "island moved")
    logic = new_logic(viewer, package, tmp_path / "cache")
    logic.usePrior = False
    first = logic.prepareCorrespondenceAsync(source, [target], bothWays=True)  # a child embeds both, fits nothing
    assert first.wait(timeout=120)
    logic.finishJob(first)

    logic = new_logic(viewer, package, tmp_path / "cache")  # both embeddings cached: the child only fits
    with monkeypatch.context() as patch:
        in_process_fit_is_refused(patch)
        job = logic.prepareCorrespondenceAsync(source, [target], bothWays=True)
        messages = relay_messages(job)
        assert job.wait(timeout=120)
        matchers = logic.finishJob(job)
    assert job.process is not None and job.process.process.returncode == 0 and logic.model.calls == 0
    assert any(m.startswith("fitting the robust prior island -> island moved") for m in messages)
    assert any(m.startswith("fitting the robust prior island moved -> island") for m in messages)
    points = np.random.default_rng(0).uniform([10, 20, 20], [60, 60, 50], size=(20, 3))
    timings = []
    for (a, b), matcher in matchers.items():
        assert matcher._prior is not None and matcher._prior_error is None
        t0 = time.perf_counter()
        reference = fit_prior(matcher.source, matcher.target)
        timings.append(time.perf_counter() - t0)
        child = matcher.prior
        assert child.rbf is not None and child.refined is not None
        assert child.summary() == reference.summary()
        np.testing.assert_allclose(child.predict(points), reference.predict(points), rtol=0, atol=1e-9)
        np.testing.assert_allclose(child.coarse_predict(points), reference.coarse_predict(points), rtol=0, atol=1e-9)
    print(f"\nprepare with both volumes cached (child start-up, cache reads, 2 priors): {job.seconds:.2f} s; "
          f"in-process fits {' + '.join(f'{t:.2f}' for t in timings)} s")
    # A click uses the child's prior (no fit here).
    assert matchers[(source.GetID(), target.GetID())].match(points[:2], use_prior=True)[0].corrected is not None


def test_refused_prior_reaches_the_matcher_as_in_process(viewer, package, mrml_scene, tmp_path, monkeypatch,  # noqa: F811
                                                         caplog):
    """A prior the child's fit refuses (a source whose foreground is a speck: too few stable points, and too few
    voxels to refine from the centres of mass) is a refusal in the Matcher with the same reason and warning as a
    refusal in this process."""
    import logging

    source, target = add(mrml_scene, island_volume(radius=2.5), "speck"), add(mrml_scene, island_volume(), "island")
    reference = new_logic(viewer, package, tmp_path / "thread", subprocess=False)
    job = reference.prepareCorrespondenceAsync(source, [target])
    assert job.wait(timeout=120)
    expected = reference.finishJob(job)[(source.GetID(), target.GetID())]
    assert expected._prior is None and expected._prior_error.startswith("robust prior: only")

    logic = new_logic(viewer, package, tmp_path / "child")
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        in_process_fit_is_refused(patch)
        job = logic.prepareCorrespondenceAsync(source, [target])
        assert job.wait(timeout=120)
        matcher = logic.finishJob(job)[(source.GetID(), target.GetID())]
    assert job.process.process.returncode == 0 and logic.model.calls == 0
    assert matcher.prior is None and matcher._prior_error == expected._prior_error
    assert f"{expected._prior_error}; using raw matching only" in caplog.text
    print(f"\nrefused in the child: {matcher._prior_error}")


def test_no_child_for_a_cached_volume(viewer, package, mrml_scene, tmp_path, monkeypatch):  # noqa: F811
    """A volume whose coarse and dense fine maps are in the disk cache is read in the worker: no child starts, and
    its voxels are hashed once for the cache check and the read."""
    from anatomical_embedding.inference import embedding

    node = add_volume(mrml_scene, seed=8)
    logic = new_logic(viewer, package, tmp_path / "cache")
    job = logic.embedVolumeAsync(node)
    assert job.wait(timeout=120)
    logic.finishJob(job)
    assert job.process is not None and (tmp_path / "cache" / logic.embedding(node).key / "fine_dense.npy").is_file()

    again = new_logic(viewer, package, tmp_path / "cache")
    hashed, image_hash = [], embedding.image_hash
    monkeypatch.setattr(embedding, "image_hash", lambda volume: hashed.append(1) or image_hash(volume))
    job = again.embedVolumeAsync(node)
    messages = relay_messages(job)
    assert job.wait(timeout=60)
    again.finishJob(job)
    assert job.process is None and again.model.calls == 0 and again.isEmbedded(node)
    assert len(hashed) == 1
    assert not any("separate process" in m for m in messages)
    cached_seconds = job.seconds
    # Preparing without a prior needs no child either; a missing dense fine map does.
    other = add_volume(mrml_scene, seed=8)
    again.usePrior = False
    prep = again.prepareCorrespondenceAsync(node, [other])
    assert prep.wait(timeout=60)
    again.finishJob(prep)
    assert prep.process is None and again.isPrepared(node, [other])
    (tmp_path / "cache" / again.embedding(node).key / "fine_dense.npy").unlink()
    job = new_logic(viewer, package, tmp_path / "cache").embedVolumeAsync(node)
    assert job.wait(timeout=60) and job.process is not None and job.process.process.returncode == 0
    print(f"\ncached volume read without a child in {cached_seconds:.2f} s; with the dense fine map missing, a "
          f"child computed it in {job.seconds:.2f} s")


def test_cancel_during_the_prior_stops_the_child(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """Cancel while the child fits the prior: the child is terminated, the job raises InterruptedError, no matcher
    is stored and no temporary file is left."""
    source = add(mrml_scene, island_volume(radius=13.0), "island")
    target = add(mrml_scene, island_volume(radius=13.0, shift_mm=(6.0, -4.0, 2.0)), "island moved")
    logic = new_logic(viewer, package, tmp_path / "cache")
    job = logic.prepareCorrespondenceAsync(source, [target])
    child = cancel_when(logic, job, "fitting the robust prior")
    assert child.process.returncode < 0 and not child.workDir.exists()
    assert not logic.isPrepared(source, [target]) and list((tmp_path / "cache").glob("*/.*.tmp")) == []


def test_many_windows_never_block_the_child_on_a_full_pipe(viewer, package, tmp_path):  # noqa: F811
    """1500 network windows: the child prints a bounded number of progress lines, so it runs to its end while the
    parent reads nothing (a worker thread starved by Slicer's Qt loop); one line per window (~100 bytes) would
    fill the 64 KiB pipe and block it."""
    from AnatomicalEmbeddingLib import subprocess_job

    from anatomical_embedding.inference.embedding import EmbedConfig, embedding_window_count
    from anatomical_embedding.io import Volume

    logic = new_logic(viewer, package, tmp_path / "cache")
    config = EmbedConfig(window=(16, 16, 16))
    volume = Volume(np.random.default_rng(9).normal(0, 400, (32, 416, 464)).astype(np.float32), (2.0, 2.0, 2.0),
                    (0.0, 0.0, 0.0), np.eye(3))
    windows = embedding_window_count(logic.model, volume, config)
    assert windows >= 1500
    child = subprocess_job.EmbeddingProcess([volume], package, "onnxruntime", "cpu", logic.cache, config)
    blocked = {}

    def report(fraction: float, message: str) -> bool:
        if child.process is not None and not blocked:  # the first progress line: stop reading until the child ends
            t0, blocked["pid"] = time.monotonic(), child.process.pid
            while not has_exited(child.process.pid) and time.monotonic() < t0 + 30:
                time.sleep(0.01)
            blocked["exited"], blocked["seconds"] = has_exited(child.process.pid), time.monotonic() - t0
        return True

    t0 = time.perf_counter()
    result = child.run(report)
    seconds = time.perf_counter() - t0
    print(f"\n{windows} windows in {seconds:.2f} s; {child.progressLines} progress lines; the parent read nothing "
          f"for {blocked['seconds']:.2f} s")
    assert blocked["exited"], "the child blocked on its output pipe"
    assert child.process.returncode == 0 and len(result.keys) == 1
    assert child.progressLines <= subprocess_job.PROGRESS_STEPS + 2


def test_prior_round_trip_through_plain_arrays(tmp_path):
    """save_prior / load_prior (np.savez, no pickle) give a prior that predicts bit for bit what the original does,
    with and without its spline, refinement and displacement grid."""
    from scipy.interpolate import RBFInterpolator

    from anatomical_embedding.inference.feature_registration import FeatureTransform
    from anatomical_embedding.inference.prior import RobustPrior, load_prior, save_prior

    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (40, 3))
    affine = np.eye(4)
    affine[:3] += rng.normal(0, 0.02, (3, 4))
    rbf = RBFInterpolator(src, rng.normal(0, 2, (40, 3)), kernel="thin_plate_spline", smoothing=400.0)
    grid = FeatureTransform(affine, rng.normal(0, 5, 3), 32.0, rng.normal(0, 3, (4, 5, 6, 3)), 0.8, 0.7)
    priors = [RobustPrior(affine, rbf, 1.5, 12.0, 100, 40, 30, src, src + 1, 2.5, grid),
              RobustPrior(affine, None, float("nan"), 12.0, 0, 0, 0, refined=FeatureTransform(affine),
                          initialisation="centres of mass"),
              RobustPrior(affine, None, 1.0, 8.0, 10, 9, 8)]
    points = rng.uniform(-20, 120, (100, 3))
    for n, prior in enumerate(priors):
        save_prior(tmp_path / f"{n}.npz", prior)
        with np.load(tmp_path / f"{n}.npz", allow_pickle=False) as f:
            assert all(f[k].dtype != object for k in f.files)
        back = load_prior(tmp_path / f"{n}.npz")
        assert np.array_equal(back.predict(points), prior.predict(points))
        assert np.array_equal(back.coarse_predict(points), prior.coarse_predict(points))
        assert back.initialisation == prior.initialisation and back.n_inliers == prior.n_inliers
        assert np.array_equal(back.stable_source_lps, prior.stable_source_lps)
        assert (back.rbf is None) == (prior.rbf is None) and (back.refined is None) == (prior.refined is None)
