"""Few-shot training and applying in a child process (as the embedding, see test_subprocess_embedding.py): Slicer's
PythonQt holds the interpreter lock while the Qt loop idles, which starves a worker *thread*, so the viewer's
``trainFewShotHeadAsync`` and ``applyFewShotHeadAsync`` run the engine in a child process.

On the headless MRML scene with a tiny exported model and small synthetic cases: no training or applying happens
in this process (the engine's functions are never called here, the model runs no window) and the results are
those of the blocking in-process calls, bit for bit; the child finishes while this thread holds the interpreter
lock; each case's voxel sample is kept in the disk cache, so retraining with one more case runs the network on
that case only; Cancel terminates the child and applies nothing; a failed child gives the job its one-line error.
"""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
from test_embedding import blob_volume
from test_subprocess_embedding import (  # noqa: F401
    has_exited, hold_interpreter_lock, kill_child_once_running, package, wait_for_child)
from test_viewer_module import viewer  # noqa: F401 - fixture

from anatomical_embedding import mrml
from anatomical_embedding.fewshot import head as fewshot
from anatomical_embedding.fewshot.head import FewShotConfig
from anatomical_embedding.io import Volume

NAMES = {1: "bright", 2: "dark"}
#: Small and quick: one tile per case, a few hundred voxels per class, no early stop before 20 epochs.
CONFIG = FewShotConfig(hidden=16, voxels_per_class=200, epochs=20, patience=20)


def new_logic(viewer, package, cache, child: bool = True):  # noqa: F811
    lg = viewer.AnatomicalEmbeddingLogic(cacheDir=str(cache))
    lg.loadModel(package, "ONNX Runtime", "cpu")
    lg.fewShotInSubprocess = child
    return lg


def add_case(scene, seed: int, shape=(40, 48, 56)):
    """A volume node and its segmentation: the brightest and darkest structures of a smooth random volume."""
    image = blob_volume(shape, seed=seed)
    label = np.zeros(image.array.shape, np.int16)
    label[image.array > 350], label[image.array < -350] = 1, 2
    volume = mrml.volume_to_node(image, scene, f"case{seed}")
    seg = mrml.labelmap_to_segmentation_node(Volume(label, image.spacing, image.origin, image.direction), NAMES,
                                             scene, f"case{seed} labels", colors={1: (1, 0, 0), 2: (0, 0, 1)},
                                             reference_node=volume)
    return volume, seg


@pytest.fixture
def engine_calls(monkeypatch):
    """The engine's train_head and apply_head calls made in this process (the logic imports them at each job)."""
    calls = []
    for name in ("train_head", "apply_head"):
        original = getattr(fewshot, name)
        monkeypatch.setattr(fewshot, name, lambda *a, _n=name, _f=original, **k: calls.append(_n) or _f(*a, **k))
    return calls


def assert_same_head(got, want) -> None:
    assert len(got.weights) == len(want.weights)
    for a, b in zip(got.weights + [got.mean, got.std], want.weights + [want.mean, want.std]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert (got.class_names, got.class_values, got.model_hash, got.config, got.colors) == \
        (want.class_names, want.class_values, want.model_hash, want.config, want.colors)
    ignore = {"seconds"}  # the time each took
    assert {k: v for k, v in got.history.items() if k not in ignore} == \
        {k: v for k, v in want.history.items() if k not in ignore}


def run_job(logic, job, timeout: float = 120):
    assert job.wait(timeout=timeout)
    return logic.finishJob(job)


def test_train_and_apply_run_in_a_child_and_match_the_blocking_calls(viewer, package, mrml_scene, tmp_path,  # noqa: F811
                                                                     engine_calls):
    """The async jobs run train_head / apply_head in a child (never here) and give the head and the segmentation
    the blocking in-process calls give."""
    volume, seg = add_case(mrml_scene, seed=0)
    target, _ = add_case(mrml_scene, seed=1)
    logic = new_logic(viewer, package, tmp_path / "child")
    cases = logic.fewShotCases(logic.addFewShotCase(None, volume, seg))

    t0 = time.perf_counter()
    job = logic.trainFewShotHeadAsync(cases, CONFIG)
    messages = []
    while not job.done():
        messages.append(job.message)
        time.sleep(0.005)
    head = run_job(logic, job)
    train_seconds = time.perf_counter() - t0
    child = job.process
    assert type(child).__name__ == "FewShotProcess" and child.process.returncode == 0
    assert child.childPid not in (None, os.getpid()) and child.networkRuns > 0
    assert engine_calls == [] and logic.model.calls == 0  # nothing trained, nothing embedded in this process
    assert logic.head is head and logic.headFile is None  # the head in memory, not on disk yet
    assert not child.workDir.exists()
    assert any("separate process" in m for m in messages)

    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my labels")
    t0 = time.perf_counter()
    job = logic.applyFewShotHeadAsync(target, output)
    segmented = run_job(logic, job)
    apply_seconds = time.perf_counter() - t0
    assert segmented is output and mrml.segment_names(output) == list(NAMES.values())
    assert job.process.childPid not in (None, os.getpid()) and job.process.process.returncode == 0
    assert engine_calls == [] and logic.model.calls == 0
    label = job.future.result()  # the child's label map, before the finish step wrote it into the node

    # The blocking calls, in this process: the same head and the same segmentation.
    reference = new_logic(viewer, package, tmp_path / "thread", child=False)
    t0 = time.perf_counter()
    want = reference.trainFewShotHead(cases, CONFIG)
    thread_train = time.perf_counter() - t0
    assert engine_calls == ["train_head"] and reference.model.calls > 0
    assert_same_head(head, want)
    t0 = time.perf_counter()
    in_process = reference.applyFewShotHead(target)
    thread_apply = time.perf_counter() - t0
    np.testing.assert_array_equal(label.array, fewshot.apply_head(reference.model, want,
                                                                  mrml.node_to_volume(target)).array)
    values = dict(enumerate(NAMES.values(), start=1))
    got, _ = mrml.segmentation_node_to_labelmap(output, target, values)
    expected, _ = mrml.segmentation_node_to_labelmap(in_process, target, values)
    np.testing.assert_array_equal(got.array, expected.array)
    assert (got.array > 0).any()
    print(f"\nchild process: train {train_seconds:.2f} s, apply {apply_seconds:.2f} s; blocking in this process: "
          f"train {thread_train:.2f} s, apply {thread_apply:.2f} s")


def test_training_progresses_while_this_thread_holds_the_interpreter_lock(viewer, package, mrml_scene,  # noqa: F811
                                                                          tmp_path):
    """Holding the interpreter lock in one C call (as Slicer's idle Qt loop does) stops every Python thread, the
    job's worker included; the child trains all the same and has ended when the hold does."""
    volume, seg = add_case(mrml_scene, seed=0)
    logic = new_logic(viewer, package, tmp_path / "cache")
    cases = logic.fewShotCases(logic.addFewShotCase(None, volume, seg))
    config = FewShotConfig(hidden=16, voxels_per_class=200, epochs=20, patience=20, seed=1)
    t0 = time.perf_counter()
    run_job(logic, logic.trainFewShotHeadAsync(cases, config))
    job_seconds = time.perf_counter() - t0

    job = logic.trainFewShotHeadAsync(cases, FewShotConfig(hidden=16, voxels_per_class=200, epochs=20, patience=20,
                                                           seed=2))  # another seed: another head
    child = wait_for_child(job)
    hold = 2 * job_seconds + 2
    held = hold_interpreter_lock(hold)
    ended = has_exited(child.process.pid)
    head = run_job(logic, job)
    print(f"\none training job {job_seconds:.2f} s; held the interpreter lock {held:.2f} s; the child had "
          f"{'ended' if ended else 'not ended'} by then")
    assert held >= hold, "the hold ended early (a signal?): inconclusive"
    assert ended and child.process.returncode == 0 and head.config.seed == 2 and logic.model.calls == 0


def test_retraining_with_one_more_case_runs_the_network_on_that_case_only(viewer, package, mrml_scene,  # noqa: F811
                                                                          tmp_path):
    """Each case's voxel sample is kept in the disk cache: a new child embeds only the case it has not seen (as the
    in-process memo did), and the head is still the in-process one."""
    first, second = add_case(mrml_scene, seed=0), add_case(mrml_scene, seed=2, shape=(48, 40, 56))
    logic = new_logic(viewer, package, tmp_path / "cache")
    table = logic.addFewShotCase(None, *first)
    job = logic.trainFewShotHeadAsync(logic.fewShotCases(table), CONFIG)
    run_job(logic, job)
    first_runs = job.process.networkRuns
    table = logic.addFewShotCase(table, *second)
    cases = logic.fewShotCases(table)
    job = logic.trainFewShotHeadAsync(cases, CONFIG)
    head = run_job(logic, job)
    pre = fewshot.preprocess_for_model(logic.model, mrml.node_to_volume(second[0]))
    assert job.process.networkRuns == fewshot.count_tiles(pre.array.shape, CONFIG) > 0
    job = logic.trainFewShotHeadAsync(cases, CONFIG)
    run_job(logic, job)
    assert job.process.networkRuns == 0 and logic.model.calls == 0
    print(f"\nnetwork runs: training on the first case {first_runs}; retraining with a second case "
          f"{fewshot.count_tiles(pre.array.shape, CONFIG)} (that case's tiles only); a plain retrain 0")
    assert_same_head(head, new_logic(viewer, package, tmp_path / "thread", child=False).trainFewShotHead(cases,
                                                                                                          CONFIG))


def cancel_when(logic, job, text: str):
    """Cancel ``job`` once its child reports ``text``; it ends interrupted. Returns the child."""
    child = wait_for_child(job)
    t_end = time.monotonic() + 60
    while text not in job.message:
        assert not job.done(), f"the job ended before '{text}': {job.future.exception()!r}"
        assert time.monotonic() < t_end
        time.sleep(0.002)
    t0 = time.perf_counter()
    job.cancel()
    assert job.wait(timeout=30)
    with pytest.raises(InterruptedError):
        logic.finishJob(job)
    print(f"\ncancelled at '{job.message}'; job ended {1000 * (time.perf_counter() - t0):.0f} ms after Cancel")
    assert child.process.returncode < 0 and not child.workDir.exists()  # terminated; its files removed
    return child


def test_cancel_stops_the_child_and_applies_nothing(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """Cancel while the child trains or segments: it is terminated, the head in memory stays the previous one, and
    no segment reaches the output node."""
    volume, seg = add_case(mrml_scene, seed=0)
    logic = new_logic(viewer, package, tmp_path / "cache")
    cases = logic.fewShotCases(logic.addFewShotCase(None, volume, seg))
    # Small tiles: the segmentation walks hundreds of them (the head's config sets the tiles it is applied in).
    previous = logic.trainFewShotHead(cases, FewShotConfig(hidden=16, voxels_per_class=200, epochs=5, tile=16,
                                                           margin=4))
    long = FewShotConfig(hidden=16, voxels_per_class=2000, epochs=3000, patience=3000)
    cancel_when(logic, logic.trainFewShotHeadAsync(cases, long), "epoch")
    assert logic.head is previous

    target, _ = add_case(mrml_scene, seed=3, shape=(64, 96, 112))
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my labels")
    nodes = mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    cancel_when(logic, logic.applyFewShotHeadAsync(target, output), "tile")
    assert output.GetSegmentation().GetNumberOfSegments() == 0
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == nodes
    assert logic.model.calls > 0  # (only the blocking training above ran here)


def test_failing_child_gives_its_one_line_error(viewer, package, mrml_scene, tmp_path):  # noqa: F811
    """A child that cannot open the model, one that refuses a head of another model, and one killed: the job's
    error is one line (the child's own ValueError as in this process, or an account of the crash)."""
    volume, seg = add_case(mrml_scene, seed=0)
    logic = new_logic(viewer, package, tmp_path / "cache")
    cases = logic.fewShotCases(logic.addFewShotCase(None, volume, seg))
    head = logic.trainFewShotHead(cases, CONFIG)

    corrupt = tmp_path / "corrupt.aemodel"
    corrupt.write_bytes(b"not a model package")
    logic.modelPath = corrupt
    job = logic.trainFewShotHeadAsync(cases, CONFIG)
    with pytest.raises(ValueError) as info:
        run_job(logic, job)
    assert "\n" not in str(info.value) and "not a valid model package" in str(info.value)
    assert logic.head is head and not job.process.workDir.exists()

    logic.loadModel(package, "ONNX Runtime", "cpu")
    foreign = fewshot.FewShotHead(**{**vars(head), "model_hash": "0" * 64})
    logic.head = foreign
    job = logic.applyFewShotHeadAsync(volume)
    with pytest.raises(ValueError) as info:
        run_job(logic, job)
    with pytest.raises(ValueError) as inproc:
        fewshot.apply_head(logic.model, foreign, mrml.node_to_volume(volume))
    assert str(info.value) == str(inproc.value) and "\n" not in str(info.value)

    logic.head = head
    job = logic.trainFewShotHeadAsync(cases, FewShotConfig(hidden=16, voxels_per_class=2000, epochs=3000,
                                                           patience=3000))
    kill_child_once_running(job)
    with pytest.raises(RuntimeError) as info:
        run_job(logic, job)
    message = str(info.value)
    print(f"\n{job.description} failed: {message}")
    assert message.startswith("the separate few-shot training process ended without a result (killed by signal 9")
    assert "\n" not in message and logic.head is head
