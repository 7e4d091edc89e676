"""The viewer logic's tile warming (issue 22) on the headless MRML scene: preparing a pair ends after the coarse
maps and the prior, a low-priority warming job follows, a user job preempts it (it resumes behind), and a click
during warming writes the same match as a logic that never warms. Uses the tiny fixture model package of
``test_viewer_module``."""
from __future__ import annotations

import json
import threading
import time

import numpy as np
from test_viewer_module import load_pair, package, pair, viewer  # noqa: F401 - fixtures

from anatomical_embedding import mrml
from anatomical_embedding.inference.embedding import EmbedConfig
from anatomical_embedding.io import convert_points


class SlowWorkerFineForwards:
    """The package's own model, with a pause before each fine forward run outside the main thread.

    Its outputs are untouched; the pause only stretches the warming job so that a click and a new job happen
    while it runs, whatever the machine's speed.
    """

    def __init__(self, model, pause: float) -> None:
        self._model, self._pause = model, pause

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_patch(self, x, want_fine: bool = True):
        if want_fine and threading.current_thread() is not threading.main_thread():
            time.sleep(self._pause)
        return self._model.embed_patch(x, want_fine=want_fine)


def new_logic(viewer, package, cache):  # noqa: F811
    lg = viewer.AnatomicalEmbeddingLogic(cacheDir=str(cache))
    lg.loadModel(package, "ONNX Runtime", "cpu")
    lg.embedConfig = EmbedConfig(fine_tile=16)  # more, smaller tiles than the viewer's default: warming has steps
    return lg


def stored(markups) -> list:
    """What the user sees of each matched point: label, position and the scores (minus the timing and the source
    list's node ID, which differ between the two logics' lists)."""
    names, lps = mrml.markups_node_to_points(markups)
    scores = []
    for i in range(markups.GetNumberOfControlPoints()):
        d = json.loads(markups.GetNthControlPointDescription(i))
        d.pop("seconds", None)
        d.pop("source", None)
        scores.append(d)
    return list(zip(names, lps.tolist(), [json.dumps(s, sort_keys=True) for s in scores]))


def test_warming_follows_preparation_yields_to_new_jobs_and_keeps_clicks_exact(  # noqa: F811 - fixtures
        viewer, package, mrml_scene, pair, tmp_path):
    source, target = load_pair(mrml_scene, pair)
    src, dst = source["volume"], target["volume"]
    names, src_lps = mrml.markups_node_to_points(source["landmarks"])
    src_ras = convert_points(src_lps[:3], "LPS", "RAS")

    # Reference: a logic that never warms; every tile is computed by the clicks (blocking, main thread).
    cold = new_logic(viewer, package, tmp_path / "cold")
    coldClicks = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "cold clicks")
    coldOut = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "cold matches")
    for i, (name, ras) in enumerate(zip(names, src_ras)):
        coldClicks.AddControlPoint(*ras, name)
        cold.matchControlPoint(coldClicks, i, src, dst, coldOut)
    coldTransfer = cold.transferAll(coldClicks, src, [dst])[0]
    assert cold.warmingJob() is None

    logic = new_logic(viewer, package, tmp_path / "warm")
    logic.model.model = SlowWorkerFineForwards(logic.model.model, 0.2)
    job = logic.prepareCorrespondenceAsync(src, [dst], sourceMarkups=source["landmarks"])
    assert job.wait(timeout=300)
    logic.finishJob(job)
    assert logic.isPrepared(src, [dst])
    embs = [logic.embedding(v) for v in (src, dst)]
    # The preparation computed no fine tile: it ends with the coarse maps and the prior...
    assert all(e.stats["tiles_computed"] == 0 for e in embs)
    # ...and the warming job follows it in the worker (each of its tiles takes at least 0.2 s here).
    warm = logic.warmingJob()
    assert warm is not None and not warm.done()

    # A click during warming (main thread, as matchBackControlPoint and scripts do) writes the cold match.
    clicks = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    out = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "matches")
    for i, (name, ras) in enumerate(zip(names, src_ras)):
        clicks.AddControlPoint(*ras, name)
        logic.matchControlPoint(clicks, i, src, dst, out)
    assert not warm.done()  # the clicks really ran while warming
    assert stored(out) == stored(coldOut)

    # A user job preempts warming: it is cancelled at once and resumes behind the new job.
    transfer = logic.transferAllAsync(clicks, src, [dst])
    assert warm.cancelled
    resumed = logic.warmingJob()
    assert resumed is not None and resumed is not warm and not resumed.cancelled
    assert transfer.wait(timeout=120)
    assert stored(logic.finishJob(transfer)[0]) == stored(coldTransfer)
    assert warm.wait(timeout=5)  # stopped before its next tile

    # Once warming is done, a click at a source point computes no tile (the likely tiles came first).
    assert resumed.wait(timeout=300) and not resumed.cancelled and logic.warmingJob() is None
    assert resumed.future.result() >= 0
    before = [dict(e.stats) for e in embs]
    clicks.AddControlPoint(*convert_points(src_lps[5], "LPS", "RAS"), names[5])
    logic.matchControlPoint(clicks, 3, src, dst, out)
    assert [e.stats["tiles_computed"] for e in embs] == [b["tiles_computed"] for b in before]
    assert [e.stats["fine_forwards"] for e in embs] == [b["fine_forwards"] for b in before]
