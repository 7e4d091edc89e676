"""AnatomicalEmbedding: the viewer module (click-to-correspond and few-shot labelling in Slicer).

The engine (``anatomical_embedding``, next to this file) does the work; this module moves data between
the scene and the engine through ``anatomical_embedding.mrml`` and keeps Slicer responsive:

* **Model**: a ``.aemodel`` package (ONNX Runtime, no PyTorch needed) or a training run directory (torch),
  picked from disk or from the installed-model registry; its model card is shown.
* **Correspond**: volumes are embedded in a worker thread (progress, cancel, disk cache); once both are
  embedded, each point placed on the source is matched at once into the target's point list, with the
  same label, its similarity and confidence (control point description, JSON) and a visible flag for
  low-confidence matches (unselected state, which Slicer draws in the list's second colour, plus the
  results table). The similarity heatmap is a scalar volume on the target's grid, shown as foreground.
* **Few-shot labelling**: (volume, segmentation) cases in a table node; segment names are the classes;
  the head trains in a worker thread and is applied to a volume, giving a named, coloured segmentation.
  Patch embeddings are memoised, so "label one more case and retrain" only embeds the new case.

Everything except the Widget runs on slicer-core (no Qt): see ``Testing/test_viewer_module.py``.
"""
import concurrent.futures
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from typing import Annotated, Callable, Optional, Sequence

import numpy as np
import slicer
import vtk
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: Python packages the engine needs that Slicer does not ship, as (import name, pip requirement).
ENGINE_PACKAGES = (("scipy", "scipy>=1.10"), ("SimpleITK", "SimpleITK>=2.3"))

BACKENDS = ["ONNX Runtime", "torch"]
DEVICES = ["auto", "cpu", "cuda"]
#: GUI backend names -> engine backend names (``backends.open_model``).
ENGINE_BACKEND = {"ONNX Runtime": "onnxruntime", "torch": "torch"}

#: Attribute / description keys written on matched points and nodes.
SCORES_ATTRIBUTE = "AnatomicalEmbedding.matches"
SOURCE_ATTRIBUTE = "AnatomicalEmbedding.sourceMarkups"
HEATMAP_ATTRIBUTE = "AnatomicalEmbedding.heatmap"
CASE_VOLUME_ROLE = "AnatomicalEmbeddingCaseVolume"
CASE_SEGMENTATION_ROLE = "AnatomicalEmbeddingCaseSegmentation"
#: Colours of matched points: confident matches are drawn selected (green), low-confidence ones unselected (orange).
MATCH_COLOR = (0.2, 0.9, 0.3)
LOW_CONFIDENCE_COLOR = (1.0, 0.5, 0.0)
RESULT_COLUMNS = ("label", "target", "R", "A", "S", "similarity", "confidence", "fb_distance_mm", "flag")
LOW_CONFIDENCE_TEXT = "low confidence"


#
# AnatomicalEmbedding
#
class AnatomicalEmbedding(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Anatomical Embedding"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["AnatomicalEmbedding developers"]
        self.parent.helpText = """
Dense anatomical embeddings: every voxel gets a vector that says where in the anatomy it is.
Pick a model, a source and a target scan; points placed on the source are matched in the target
(click-to-correspond), with a similarity heatmap and a confidence for every match. Few-shot labelling
trains a small segmentation head from a few segmented cases. Try it on the "Phantom pair" sample data.
"""
        self.parent.acknowledgementText = """
Methods: AEFM (Zhuang et al.), Adam/Eve (Hosseinzadeh Taher et al.), AnatoMask (Li et al.),
HDSSL (Kats et al.). See the extension's README for references.
"""
        # SampleData is a GUI module; register once the application has started (standard template).
        try:
            slicer.app.connect("startupCompleted()", registerSampleData)
        except AttributeError:  # no application (headless tests)
            pass


#
# Sample data: a phantom pair generated locally by the engine (no download)
#
def registerSampleData() -> bool:
    """Register "Phantom pair" with the SampleData module; False when SampleData is absent."""
    try:
        import SampleData
    except ImportError:
        logging.info("SampleData module not available; the phantom pair is still in the module's Phantom data panel")
        return False
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")

    def generate(source=None):
        # Called by SampleData instead of a download: generate and load the pair (no network).
        logic = AnatomicalEmbeddingLogic()
        return logic.loadPhantomPairSample()

    try:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="AnatomicalEmbedding", sampleName="PhantomPair",
            thumbnailFileName=os.path.join(iconsPath, "AnatomicalEmbedding.png"),
            uris=None, fileNames=None, nodeNames=None, loadFiles=False, customDownloader=generate)
        return True
    except Exception as exc:  # noqa: BLE001 - an older SampleData API must not break module loading
        logging.warning("Could not register the phantom pair with SampleData (%s)", exc)
        return False


#
# Parameter node
#
@parameterNodeWrapper
class AnatomicalEmbeddingParameterNode:
    """Module state saved in the scene.

    modelPath - model package (.aemodel) or training run directory (torch backend).
    backend, device - how to run it (ONNX Runtime needs no PyTorch; auto uses CUDA when present).
    sourceVolume, targetVolume - the scans to match between; sourceLandmarks receives the clicks,
        targetLandmarks the matches (created when empty).
    clickToCorrespond - match every point placed on the source at once.
    transferToAllVolumes - "Transfer all" also maps into every other scalar volume of the scene.
    showHeatmap, heatmapOpacity, heatmapVolume - similarity heatmap of the last query (foreground layer).
    lowConfidenceThreshold - matches with a lower confidence are flagged.
    resultsTable - one row per match (label, target, RAS, similarity, confidence, flag).
    fewShotCases - table of (volume, segmentation) training cases; fewShotVolume/fewShotSegmentation
        pick the case to add; segmentVolume is segmented into outputSegmentation; headPath saves the head.
    phantomSeed - random seed of the synthetic phantom pair.
    """

    modelPath: pathlib.Path
    backend: Annotated[str, Choice(BACKENDS)] = "ONNX Runtime"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    sourceVolume: vtkMRMLScalarVolumeNode
    targetVolume: vtkMRMLScalarVolumeNode
    sourceLandmarks: vtkMRMLMarkupsFiducialNode
    targetLandmarks: vtkMRMLMarkupsFiducialNode
    clickToCorrespond: bool = False
    transferToAllVolumes: bool = False
    showHeatmap: bool = True
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    heatmapVolume: vtkMRMLScalarVolumeNode
    lowConfidenceThreshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    resultsTable: vtkMRMLTableNode
    fewShotCases: vtkMRMLTableNode
    fewShotVolume: vtkMRMLScalarVolumeNode
    fewShotSegmentation: vtkMRMLSegmentationNode
    segmentVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    headPath: pathlib.Path
    phantomSeed: Annotated[int, WithinRange(0, 1000000)] = 0


#
# Widget
#
class AnatomicalEmbeddingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin GUI: every action is one logic call; background jobs are polled with a QTimer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._afterJob = None
        self._timer = None

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomicalEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatomicalEmbeddingLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)  # polls background jobs; the GUI never waits on them
        self._timer.connect("timeout()", self.onPollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadModelButton.connect("clicked(bool)", self.onLoadModel)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshInstalledModels)
        self.ui.importPublishedButton.connect("clicked(bool)", self.onImportPublished)
        self.ui.installedModelsComboBox.connect("activated(int)", self.onInstalledModelChosen)
        self.ui.embedButton.connect("clicked(bool)", self.onEmbed)
        self.ui.transferAllButton.connect("clicked(bool)", self.onTransferAll)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.trainHeadButton.connect("clicked(bool)", self.onTrainHead)
        self.ui.applyHeadButton.connect("clicked(bool)", self.onApplyHead)
        self.ui.loadPhantomPairButton.connect("clicked(bool)", self.onLoadPhantomPair)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.refreshInstalledModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.logic.stopClickToCorrespond()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.stopClickToCorrespond()
        self.logic.forgetScene()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[AnatomicalEmbeddingParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected to the fields.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.logic.lowConfidence = p.lowConfidenceThreshold
        self.logic.setHeatmapOpacity(p.heatmapVolume, p.heatmapOpacity if p.showHeatmap else 0.0)
        self.ui.modelCardLabel.setText(self.logic.modelCardText())
        if p.clickToCorrespond and not self.logic.clickToCorrespondActive() and self._job is None:
            self._startClickMode()  # (while its preparation job runs, parameter changes must not restart it)
        elif not p.clickToCorrespond and self.logic.clickToCorrespondActive():
            self.logic.stopClickToCorrespond()

    # ---- model ----
    def refreshInstalledModels(self) -> None:
        self.ui.installedModelsComboBox.clear()
        self.ui.installedModelsComboBox.addItem("(choose an installed model)", "")
        for entry in self.logic.installedModels():
            self.ui.installedModelsComboBox.addItem(f"{entry['name']} ({entry.get('method', '')})", entry["path"])

    def onImportPublished(self) -> None:
        """Dialog: published checkpoint -> model package, registered and selected here."""
        if not self.logic.ensureDependencies("torch", askUser=True):  # importing runs the published network
            return
        from AnatomicalEmbeddingLib.ImportPretrained import ImportPretrainedDialog

        def imported(entry: dict) -> None:
            self.refreshInstalledModels()
            combo = self.ui.installedModelsComboBox
            combo.setCurrentIndex(combo.findData(entry["path"]))
            self._parameterNode.modelPath = pathlib.Path(entry["path"])

        ImportPretrainedDialog(parent=slicer.util.mainWindow(), on_imported=imported).exec_()

    def onInstalledModelChosen(self, index: int) -> None:
        path = self.ui.installedModelsComboBox.itemData(index)
        if path:
            self._parameterNode.modelPath = pathlib.Path(path)

    def onLoadModel(self) -> bool:
        p = self._parameterNode
        if not self.logic.ensureDependencies(p.backend, askUser=True):
            return False
        with slicer.util.tryWithErrorDisplay("Could not load the model.", waitCursor=True):
            self.logic.loadModel(p.modelPath, p.backend, p.device)
            self.ui.modelCardLabel.setText(self.logic.modelCardText())
            return True
        return False

    def _ensureModel(self) -> bool:
        return self.logic.model is not None or self.onLoadModel()

    # ---- background jobs ----
    def _runJob(self, job, afterJob=None) -> None:
        self._job, self._afterJob = job, afterJob
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.setValue(0)
        self.ui.cancelButton.setEnabled(True)
        self._timer.start()

    def onPollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        self.ui.progressBar.setValue(int(100 * job.progress))
        self.ui.statusLabel.setText(job.message)
        if not job.done():
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        try:
            self.logic.finishJob(job)
        except InterruptedError:
            self.ui.statusLabel.setText("Cancelled.")
            self._parameterNode.clickToCorrespond = False
            return
        except Exception as exc:  # shown to the user, with the details in the log
            logging.exception("background job failed")
            slicer.util.errorDisplay(f"{job.description} failed: {exc}")
            self._parameterNode.clickToCorrespond = False
            return
        self.ui.statusLabel.setText(f"{job.description}: done in {job.seconds:.1f} s")
        if self._afterJob is not None:
            after, self._afterJob = self._afterJob, None
            after()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()

    def _embedThen(self, after, targets: Optional[list] = None) -> None:
        """Embed the source and targets and fit their priors (one background job), then call ``after``."""
        p = self._parameterNode
        targets = targets or [p.targetVolume]
        if not self._ensureModel() or p.sourceVolume is None or None in targets:
            slicer.util.warningDisplay("Choose a model, a source volume and a target volume first.")
            p.clickToCorrespond = False
            return
        if self.logic.isPrepared(p.sourceVolume, targets):
            after()
            return
        self._runJob(self.logic.prepareCorrespondenceAsync(p.sourceVolume, targets), after)

    def onEmbed(self) -> None:
        self._embedThen(lambda: self.ui.statusLabel.setText("Source and target are embedded."))

    # ---- correspond ----
    def _startClickMode(self) -> None:
        def start():
            p = self._parameterNode
            if p.sourceLandmarks is None:
                p.sourceLandmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Source points")
            p.targetLandmarks = self.logic.startClickToCorrespond(
                p.sourceLandmarks, p.sourceVolume, p.targetVolume, p.targetLandmarks, onMatched=self._onMatched)
            # Place points on the source: the Markups place mode with the source list active.
            slicer.modules.markups.logic().SetActiveList(p.sourceLandmarks)
            slicer.modules.markups.logic().StartPlaceMode(True)
            self.ui.statusLabel.setText("Click on the source volume: each point is matched in the target.")

        self._embedThen(start)

    def _onMatched(self, result: dict) -> None:
        p = self._parameterNode
        if p.showHeatmap:
            p.heatmapVolume = self.logic.updateHeatmap(p.sourceVolume, p.targetVolume, result["query_ras"],
                                                       p.heatmapVolume, p.heatmapOpacity)
        p.resultsTable = self.logic.updateResultsTable(p.resultsTable, [p.targetLandmarks])
        flag = f" ({LOW_CONFIDENCE_TEXT})" if result["low_confidence"] else ""
        self.ui.statusLabel.setText(f"{result['label']}: similarity {result['similarity']:.2f}, confidence "
                                    f"{result['confidence']:.2f}{flag}, {1000 * result['seconds']:.0f} ms")

    def onTransferAll(self) -> None:
        p = self._parameterNode
        targets = self.logic.targetVolumes(p.sourceVolume, p.targetVolume, p.transferToAllVolumes)

        def transfer():
            with slicer.util.tryWithErrorDisplay("Transfer failed.", waitCursor=True):
                outputs = self.logic.transferAll(p.sourceLandmarks, p.sourceVolume, targets,
                                                 [p.targetLandmarks] + [None] * (len(targets) - 1))
                p.targetLandmarks = outputs[0]
                p.resultsTable = self.logic.updateResultsTable(p.resultsTable, outputs)

        if self._parameterNode.sourceLandmarks is None:
            slicer.util.warningDisplay("Choose the source point list to transfer.")
            return
        self._embedThen(transfer, targets)

    def onResultClicked(self, index) -> None:
        self.logic.jumpToResult(self._parameterNode.resultsTable, index.row())

    # ---- few-shot ----
    def onAddCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not add the case.", waitCursor=False):
            p.fewShotCases = self.logic.addFewShotCase(p.fewShotCases, p.fewShotVolume, p.fewShotSegmentation)

    def onRemoveCase(self) -> None:
        p = self._parameterNode
        row = self.ui.casesTableView.currentIndex().row()
        if p.fewShotCases is not None and row >= 0:
            self.logic.removeFewShotCase(p.fewShotCases, row)

    def onTrainHead(self) -> None:
        p = self._parameterNode
        if not self._ensureModel():
            return
        with slicer.util.tryWithErrorDisplay("Could not train the head.", waitCursor=False):
            job = self.logic.trainFewShotHeadAsync(self.logic.fewShotCases(p.fewShotCases))
            self._runJob(job, self._saveHead)

    def _saveHead(self) -> None:
        p = self._parameterNode
        if str(p.headPath) not in ("", ".") and self.logic.head is not None:
            self.logic.head.save(p.headPath, overwrite=True)

    def onApplyHead(self) -> None:
        p = self._parameterNode
        if not self._ensureModel() or p.segmentVolume is None:
            slicer.util.warningDisplay("Choose a model and the volume to segment.")
            return
        with slicer.util.tryWithErrorDisplay("Could not apply the head.", waitCursor=False):
            if self.logic.head is None and str(p.headPath) not in ("", ".") and p.headPath.is_file():
                self.logic.loadHead(p.headPath)
            job = self.logic.applyFewShotHeadAsync(p.segmentVolume, p.outputSegmentation)

            def done():
                p.outputSegmentation = job.output
            self._runJob(job, done)

    # ---- phantom data ----
    def onLoadPhantomPair(self) -> None:
        if not self.logic.ensureDependencies(self._parameterNode.backend, askUser=True):
            return
        with slicer.util.tryWithErrorDisplay("Could not load the phantom pair.", waitCursor=True):
            self.logic.loadPhantomPairSample(seed=self._parameterNode.phantomSeed)


#
# Background work
#
class BackgroundJob:
    """A function run in the logic's worker thread, with progress, cancel and a main-thread finish step.

    The worker only touches numpy/engine objects; everything that touches MRML happens before
    submission or in ``finish`` (run by :meth:`AnatomicalEmbeddingLogic.finishJob` on the main thread).
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = 0.0
        self.message = "waiting"
        self.seconds = 0.0
        self.output = None
        self.finish: Optional[Callable] = None
        self._cancel = threading.Event()
        self.future: Optional[concurrent.futures.Future] = None

    def report(self, fraction: float, message: str = "") -> bool:
        """Progress callback (engine convention): returns False once cancelled."""
        self.progress = float(min(max(fraction, 0.0), 1.0))
        if message:
            self.message = message
        return not self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise InterruptedError(f"{self.description} cancelled")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self.future is not None and self.future.done()

    def wait(self, timeout: Optional[float] = None):
        """Block until the worker is done (tests; never from the GUI)."""
        concurrent.futures.wait([self.future], timeout=timeout)
        return self.done()


class _EngineModel:
    """Wraps an engine model: per-thread progress/cancel hooks and an LRU memo of few-shot patch outputs.

    The memo makes "label one more case and retrain" quick: the few-shot code walks every case in
    the same tiles each time, so only a new case's tiles reach the network. Keys hash the patch
    bytes, so a changed image or model never hits a stale entry.
    """

    def __init__(self, model, memo_bytes: int = 1 << 30) -> None:
        self.model = model
        self.card = model.card
        self.model_hash = model.model_hash
        self.backend = model.backend
        self.memo_bytes = int(memo_bytes)
        self._memo: "OrderedDict[str, tuple]" = OrderedDict()
        self._memo_size = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self.calls = 0

    def __getattr__(self, name):  # card shortcuts (spacing, coarse_stride, preset ...) of the engine model
        return getattr(self.__dict__["model"], name)

    def set_hook(self, hook: Optional[Callable[[], None]]) -> None:
        self._local.hook = hook

    def set_memo(self, enabled: bool) -> None:
        """Memoise patch outputs in this thread (few-shot work only; volume embeddings have their own cache)."""
        self._local.memo = bool(enabled)

    def embed_patch(self, x: np.ndarray, want_fine: bool = True):
        hook = getattr(self._local, "hook", None)
        if hook is not None:
            hook()  # counts windows for the progress bar; raises InterruptedError when cancelled
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not getattr(self._local, "memo", False):
            self.calls += 1
            return self.model.embed_patch(x, want_fine=want_fine)
        key = hashlib.sha1(x.tobytes() + str((x.shape, want_fine)).encode()).hexdigest()
        with self._lock:
            hit = self._memo.get(key)
            if hit is not None:
                self._memo.move_to_end(key)
                return hit
        self.calls += 1
        out = self.model.embed_patch(x, want_fine=want_fine)
        size = sum(a.nbytes for a in out if a is not None)
        if size <= self.memo_bytes // 4:
            with self._lock:
                self._memo[key] = out
                self._memo_size += size
                while self._memo_size > self.memo_bytes and self._memo:
                    _, old = self._memo.popitem(last=False)
                    self._memo_size -= sum(a.nbytes for a in old if a is not None)
        return out


#
# Logic
#
class AnatomicalEmbeddingLogic(ScriptedLoadableModuleLogic):
    """Scene-level operations; all conversions go through ``anatomical_embedding.mrml``.

    Runs on slicer-core: nothing here needs Qt. Blocking calls (``embedVolume``, ``trainFewShotHead``,
    ``applyFewShotHead``) are for scripts and tests; the ``...Async`` variants return a
    :class:`BackgroundJob` that the widget polls with a QTimer and completes with :meth:`finishJob`.
    """

    def __init__(self, cacheDir: Optional[str] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.cacheDir = cacheDir
        self.model: Optional[_EngineModel] = None
        self.modelPath: Optional[pathlib.Path] = None
        self.head = None
        self.lowConfidence = 0.5
        #: Use the robust prior (fitted once per volume pair) to keep matches anatomically plausible.
        self.usePrior = True
        #: Sliding-window and fine-tile settings (engine defaults; part of the cache key).
        self.embedConfig = self._defaultEmbedConfig()
        #: Volumes with at most this many fine tiles get all of them computed in the background.
        self.maxPrecomputedTiles = 512
        self._cache = None
        self._embeddings: dict = {}   # volume node ID -> (geometry/content stamp, VolumeEmbedding)
        self._matchers: dict = {}     # (source ID, target ID) -> Matcher
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._click: Optional[dict] = None
        self._busy = False

    def getParameterNode(self):
        return AnatomicalEmbeddingParameterNode(super().getParameterNode())

    @staticmethod
    def _defaultEmbedConfig():
        from anatomical_embedding.inference.embedding import EmbedConfig

        # Fine tiles of 32 voxels (engine default 16) with the same 16-voxel context: precomputing a whole
        # volume then runs ~3x fewer voxels through the network (32^3 of every 64^3 window are kept).
        return EmbedConfig(fine_tile=32)

    # ---- dependencies -----------------------------------------------------------------------------
    @staticmethod
    def _importable(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    @staticmethod
    def cudaAvailable() -> bool:
        """NVIDIA GPU with a driver present (decides onnxruntime-gpu vs onnxruntime)."""
        if shutil.which("nvidia-smi"):
            return True
        torch = importlib.sys.modules.get("torch")
        return bool(torch is not None and torch.cuda.is_available())

    def requiredPackages(self, backend: str = "ONNX Runtime") -> list:
        """(import name, pip requirement) the chosen backend needs; torch is handled separately."""
        packages = list(ENGINE_PACKAGES)
        if backend == "ONNX Runtime":
            packages.append(("onnxruntime", "onnxruntime-gpu" if self.cudaAvailable() else "onnxruntime"))
        return packages

    def missingPackages(self, backend: str = "ONNX Runtime") -> list:
        return [requirement for module, requirement in self.requiredPackages(backend) if not self._importable(module)]

    def missingEnginePackages(self) -> list:
        """pip requirements of engine packages that cannot be imported in this Python."""
        return [requirement for module, requirement in ENGINE_PACKAGES if not self._importable(module)]

    def ensureDependencies(self, backend: str = "ONNX Runtime", askUser: bool = True) -> bool:
        """Check the Python packages; install missing ones only after the user confirms (never silently).

        Returns True when everything is importable. ``askUser=False`` only checks (a script or test that
        must not install). torch comes from the PyTorch extension (``PyTorchUtils``) when it is installed.
        """
        missing = self.missingPackages(backend)
        needTorch = backend == "torch" and not self._importable("torch")
        if not missing and not needTorch:
            return True
        if not askUser:
            logging.warning("Missing Python packages: %s", ", ".join(missing + (["torch"] if needTorch else [])))
            return False
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
        return not self.missingPackages(backend) and (backend != "torch" or self._importable("torch"))

    # keep the earlier name working (scripts written against the first version)
    def ensureEngineDependencies(self, askUser: bool = True) -> bool:
        return self.ensureDependencies("ONNX Runtime", askUser)

    # ---- model ------------------------------------------------------------------------------------
    @staticmethod
    def installedModels() -> list:
        from anatomical_embedding.inference import registry as model_registry

        try:
            return model_registry.list_models()
        except ValueError as exc:
            logging.warning("%s", exc)
            return []

    def loadModel(self, path, backend: str = "ONNX Runtime", device: str = "auto"):
        """Open a package (ONNX Runtime) or a run directory (torch); embeddings of another model are dropped."""
        from anatomical_embedding.inference.backends import open_model

        if path is None or str(path) in ("", "."):
            raise ValueError("no model chosen: pick a .aemodel package (or a run directory for torch)")
        if backend not in ENGINE_BACKEND:
            raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
        model = open_model(path, backend=ENGINE_BACKEND[backend], device=device)
        if self.model is None or self.model.model_hash != model.model_hash:
            self._embeddings.clear()
            self._matchers.clear()
        self.model = _EngineModel(model)
        self.modelPath = pathlib.Path(path)
        logging.info("Loaded %r (%s on %s)", model, model.backend, getattr(model, "device", "cpu"))
        return self.model

    def modelCardText(self) -> str:
        if self.model is None:
            return "No model loaded."
        card = self.model.card
        data = card.get("training_data") or {}
        if isinstance(data, dict):
            data = ", ".join(f"{k}: {v}" for k, v in data.items()) or "not recorded"
        return (f"Method: {card.get('method', '?')}   Modality: {card.get('modality', '?')}\n"
                f"Spacing: {' x '.join(f'{s:g}' for s in card.get('spacing', []))} mm   "
                f"Embedding: {card.get('coarse_channels')} coarse + {card.get('fine_channels')} fine channels\n"
                f"Training data: {data}\n"
                f"Backend: {self.model.backend} on {getattr(self.model.model, 'device', 'cpu')}   "
                f"Step: {card.get('step')}   Engine: {card.get('engine_version', '?')}")

    def _requireModel(self) -> _EngineModel:
        if self.model is None:
            raise RuntimeError("no model loaded: choose a model package in the Model panel and load it")
        return self.model

    @property
    def cache(self):
        from anatomical_embedding.inference.embedding import EmbeddingCache

        if self._cache is None:
            self._cache = EmbeddingCache(self.cacheDir)
        return self._cache

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        # One worker: jobs run in order, and the network is never run twice at once.
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="AnatomicalEmbedding")
        return self._executor

    def _submit(self, job: BackgroundJob, fn: Callable) -> BackgroundJob:
        def run():
            t0 = time.perf_counter()
            job.report(0.0, "started")
            try:
                job.check()  # cancelled while queued
                return fn()
            finally:
                job.seconds = time.perf_counter() - t0
        job.future = self._worker().submit(run)
        return job

    def finishJob(self, job: BackgroundJob):
        """Main thread: collect a finished job (re-raises its error or InterruptedError) and apply its result."""
        result = job.future.result()
        if job.finish is not None:
            job.output = job.finish(result)
        job.progress = 1.0
        return job.output

    def forgetScene(self) -> None:
        """Drop in-memory embeddings and matchers (scene closed); the disk cache stays."""
        self._embeddings.clear()
        self._matchers.clear()

    # ---- embedding --------------------------------------------------------------------------------
    @staticmethod
    def _stamp(volumeNode) -> tuple:
        # Image content or geometry changes invalidate the in-memory embedding (disk cache keys by content).
        image = volumeNode.GetImageData()
        m = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(m)
        parent = volumeNode.GetParentTransformNode()
        return (image.GetMTime() if image else 0, tuple(slicer.util.arrayFromVTKMatrix(m).ravel().round(6)),
                parent.GetMTime() if parent else 0)

    def isPrepared(self, sourceVolume, targetVolumes: Sequence) -> bool:
        """True when every volume is embedded and each (source, target) matcher exists (clicks are then fast)."""
        return all(self.isEmbedded(v) for v in [sourceVolume, *targetVolumes]) and all(
            (sourceVolume.GetID(), t.GetID()) in self._matchers for t in targetVolumes if t is not sourceVolume)

    def isEmbedded(self, volumeNode) -> bool:
        entry = self._embeddings.get(volumeNode.GetID()) if volumeNode is not None else None
        return entry is not None and entry[0] == self._stamp(volumeNode)

    def embedding(self, volumeNode):
        """The embedding of a volume node, computed (blocking) when needed."""
        if not self.isEmbedded(volumeNode):
            self.embedVolume(volumeNode)
        return self._embeddings[volumeNode.GetID()][1]

    def _embedWork(self, volumeNode, job: BackgroundJob) -> tuple:
        """Read the node (main thread); return (worker function, store function) for one volume.

        The worker embeds the coarse map and, for volumes of at most ``maxPrecomputedTiles`` fine tiles,
        every fine tile too, so that later clicks are pure numpy (well under a second). Larger volumes get
        their fine tiles on demand around each click (both are cached on disk).
        """
        from anatomical_embedding import mrml
        from anatomical_embedding.inference.embedding import embed_volume, window_starts

        model = self._requireModel()
        volume = mrml.node_to_volume(volumeNode)
        nodeId, stamp, name = volumeNode.GetID(), self._stamp(volumeNode), volumeNode.GetName()
        config = self.embedConfig
        # Expected network runs (progress bar): the volume at the model spacing, padded to the size multiple.
        m = model.size_multiple
        shape = np.ceil(np.asarray(volume.shape_ijk) * volume.spacing / model.spacing).astype(int)
        shape = np.maximum(-(-shape // m) * m, m)
        window = -(-np.asarray(config.window or model.patch_size) // m) * m
        nCoarse = int(np.prod([len(window_starts(int(s), int(min(w, s)), config.overlap, m))
                               for s, w in zip(shape, window)]))
        nTiles = int(np.prod(-(-shape // config.fine_tile)))
        precompute = nTiles <= self.maxPrecomputedTiles
        total = nCoarse + (nTiles if precompute else 0)
        count = [0]

        def hook():
            job.check()
            count[0] += 1
            stage = "coarse window" if count[0] <= nCoarse else "fine tile"
            job.report(min(0.99, count[0] / max(total, 1)), f"embedding {name}: {stage} {count[0]}/{total}")

        def work():
            model.set_hook(hook)
            try:
                emb = embed_volume(model, volume, self.cache, config)
                if precompute:
                    emb.fine_block(emb.valid_start, emb.valid_size)  # every tile, from disk cache when there
                return emb
            finally:
                model.set_hook(None)

        def store(emb):
            self._embeddings[nodeId] = (stamp, emb)
            for key in [k for k in self._matchers if nodeId in k]:
                del self._matchers[key]
            return emb

        return work, store

    def _embedJob(self, volumeNode, job: BackgroundJob) -> Callable:
        work, job.finish = self._embedWork(volumeNode, job)
        return work

    def embedVolume(self, volumeNode, progress: Optional[Callable[[float, str], bool]] = None):
        """Embed a volume node now (blocking; cached on disk and in memory)."""
        job = BackgroundJob(f"Embedding {volumeNode.GetName()}")
        if progress is not None:
            def report(fraction: float, message: str = "") -> bool:
                if progress(fraction, message) is False:
                    job.cancel()
                return BackgroundJob.report(job, fraction, message)
            job.report = report
        work = self._embedJob(volumeNode, job)
        t0 = time.perf_counter()
        emb = job.finish(work())
        logging.info("Embedded %s in %.2f s", volumeNode.GetName(), time.perf_counter() - t0)
        return emb

    def embedVolumeAsync(self, volumeNode) -> BackgroundJob:
        """Embed a volume node in the worker thread; poll ``job.done()`` and call :meth:`finishJob`."""
        job = BackgroundJob(f"Embedding {volumeNode.GetName()}")
        return self._submit(job, self._embedJob(volumeNode, job))

    def prepareCorrespondenceAsync(self, sourceVolume, targetVolumes: Sequence) -> BackgroundJob:
        """One background job that embeds what is missing and fits the robust prior of each pair.

        After :meth:`finishJob`, clicks between these volumes only search (no network, no prior fit).
        """
        job = BackgroundJob("Preparing correspondence")
        volumes = [sourceVolume] + [t for t in targetVolumes if t is not sourceVolume]
        pending = [v for v in volumes if not self.isEmbedded(v)]
        parts = [self._embedWork(v, job) for v in pending]
        known = {v.GetID(): self._embeddings[v.GetID()][1] for v in volumes if v not in pending}
        ids = [v.GetID() for v in volumes]
        lowConfidence, usePrior = self.lowConfidence, self.usePrior

        def work():
            from anatomical_embedding.inference.matching import MatchConfig, Matcher

            embs = dict(known)
            for volume, (embed, _) in zip(pending, parts):
                embs[volume.GetID()] = embed()
            matchers = {}
            for target in ids[1:]:
                job.check()
                job.message = "fitting the robust prior"
                matcher = Matcher(embs[ids[0]], embs[target], MatchConfig(low_confidence=lowConfidence))
                if usePrior:
                    _ = matcher.prior  # fitted here, in the worker, instead of on the first click
                matchers[(ids[0], target)] = matcher
            return embs, matchers

        def finish(result):
            embs, matchers = result
            for volume, (_, store) in zip(pending, parts):
                store(embs[volume.GetID()])
            self._matchers.update(matchers)
            return matchers

        job.finish = finish
        return self._submit(job, work)

    # ---- matching ---------------------------------------------------------------------------------
    def matcher(self, sourceVolume, targetVolume):
        from anatomical_embedding.inference.matching import MatchConfig, Matcher

        key = (sourceVolume.GetID(), targetVolume.GetID())
        src, dst = self.embedding(sourceVolume), self.embedding(targetVolume)
        m = self._matchers.get(key)
        if m is None or m.source is not src or m.target is not dst:
            m = Matcher(src, dst, MatchConfig(low_confidence=self.lowConfidence))
            self._matchers[key] = m
        return m

    @staticmethod
    def defaultTargetMarkups(targetVolume, scene=None):
        scene = scene or targetVolume.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{targetVolume.GetName()} matches")
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor(*MATCH_COLOR)
        node.GetDisplayNode().SetColor(*LOW_CONFIDENCE_COLOR)
        return node

    @staticmethod
    def pointScores(markupsNode, index: int) -> dict:
        """Scores stored on a matched control point (its description holds them as JSON)."""
        text = markupsNode.GetNthControlPointDescription(index)
        try:
            data = json.loads(text) if text else {}
        except json.JSONDecodeError:
            data = {}
        return data if isinstance(data, dict) else {}

    def _storeMatch(self, targetMarkups, label: str, sourceId: str, sourceNodeId: str, match, seconds: float,
                    targetVolume) -> dict:
        from anatomical_embedding.io import convert_points

        ras = convert_points(match.point_lps, "LPS", "RAS")
        low = bool(match.confidence is not None and match.confidence < self.lowConfidence)
        scores = {"source": sourceNodeId, "sourcePointID": sourceId, "target": targetVolume.GetID(),
                  "similarity": round(float(match.similarity), 5),
                  "confidence": None if match.confidence is None else round(float(match.confidence), 5),
                  "fb_distance_mm": None if match.fb_distance_mm is None else round(float(match.fb_distance_mm), 3),
                  "low_confidence": low, "method": match.method}
        # The point that belongs to this source point: same source ID, else same label, else a new one.
        index = -1
        for i in range(targetMarkups.GetNumberOfControlPoints()):
            if self.pointScores(targetMarkups, i).get("sourcePointID") == sourceId:
                index = i
                break
        if index < 0:
            index = targetMarkups.GetControlPointIndexByLabel(label)
        wasModifying = targetMarkups.StartModify()
        try:
            if index < 0:
                index = targetMarkups.AddControlPoint(vtk.vtkVector3d(*ras), label)
            else:
                targetMarkups.SetNthControlPointPosition(index, *ras)
                targetMarkups.SetNthControlPointLabel(index, label)
            targetMarkups.SetNthControlPointDescription(index, json.dumps(scores))
            # Unselected points are drawn in the list's "Color" (orange): the visible low-confidence flag.
            targetMarkups.SetNthControlPointSelected(index, not low)
            all_scores = json.loads(targetMarkups.GetAttribute(SCORES_ATTRIBUTE) or "{}")
            all_scores[targetMarkups.GetNthControlPointID(index)] = {"label": label, **scores}
            targetMarkups.SetAttribute(SCORES_ATTRIBUTE, json.dumps(all_scores))
            targetMarkups.SetAttribute(SOURCE_ATTRIBUTE, sourceNodeId)
        finally:
            targetMarkups.EndModify(wasModifying)
        return {"label": label, "index": index, "ras": ras, "query_ras": convert_points(match.query_lps, "LPS", "RAS"),
                "similarity": float(match.similarity), "confidence": float(match.confidence or 0.0),
                "low_confidence": low, "seconds": seconds, "target_markups": targetMarkups}

    def matchControlPoint(self, sourceMarkups, index: int, sourceVolume, targetVolume, targetMarkups=None) -> dict:
        """Match one control point of ``sourceMarkups`` into ``targetMarkups`` (created when None).

        Returns a dict with the target node, index, RAS position, similarity, confidence, the low-confidence
        flag and the matching time in seconds (excluding embedding, which is cached after the first call).
        """
        from anatomical_embedding.io import convert_points

        if targetMarkups is not None and targetMarkups is sourceMarkups:
            raise ValueError("the target point list must differ from the source point list")
        if sourceMarkups.GetNthControlPointPositionStatus(index) != sourceMarkups.PositionDefined:
            raise ValueError(f"control point {index} of {sourceMarkups.GetName()!r} has no position yet")
        matcher = self.matcher(sourceVolume, targetVolume)
        if targetMarkups is None:
            targetMarkups = self.defaultTargetMarkups(targetVolume)
        ras = np.zeros(3)
        sourceMarkups.GetNthControlPointPositionWorld(index, ras)
        label = sourceMarkups.GetNthControlPointLabel(index)
        t0 = time.perf_counter()
        result = matcher.match(convert_points(ras, "RAS", "LPS"), "LPS", use_prior=self.usePrior, with_raw=False,
                               names=[label])[0]
        seconds = time.perf_counter() - t0
        return self._storeMatch(targetMarkups, label, sourceMarkups.GetNthControlPointID(index),
                                sourceMarkups.GetID(), result.final, seconds, targetVolume)

    def transferAll(self, sourceMarkups, sourceVolume, targetVolumes: Sequence, targetMarkups: Optional[Sequence] = None,
                    ) -> list:
        """Match every defined point of ``sourceMarkups`` into each target; returns the target point lists."""
        from anatomical_embedding import mrml

        names, lps = mrml.markups_node_to_points(sourceMarkups)
        ids = [sourceMarkups.GetNthControlPointID(i) for i in range(sourceMarkups.GetNumberOfControlPoints())
               if sourceMarkups.GetNthControlPointPositionStatus(i) == sourceMarkups.PositionDefined]
        if not names:
            raise ValueError(f"{sourceMarkups.GetName()!r} has no placed points to transfer")
        targetMarkups = list(targetMarkups or []) + [None] * (len(targetVolumes) - len(targetMarkups or []))
        outputs = []
        for volume, out in zip(targetVolumes, targetMarkups):
            if volume is sourceVolume:
                continue
            matcher = self.matcher(sourceVolume, volume)
            out = out or self.defaultTargetMarkups(volume)
            t0 = time.perf_counter()
            results = matcher.match(lps, "LPS", use_prior=self.usePrior, with_raw=False, names=names)
            seconds = (time.perf_counter() - t0) / len(results)
            wasModifying = out.StartModify()
            for name, pid, r in zip(names, ids, results):
                self._storeMatch(out, name, pid, sourceMarkups.GetID(), r.final, seconds, volume)
            out.EndModify(wasModifying)
            outputs.append(out)
        return outputs

    @staticmethod
    def targetVolumes(sourceVolume, targetVolume, allVolumes: bool = False) -> list:
        """The target, and with ``allVolumes`` every other scalar volume (not heatmaps) in the scene."""
        targets = [targetVolume] if targetVolume is not None else []
        if allVolumes and sourceVolume is not None:
            scene = sourceVolume.GetScene()
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
                node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                if (node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(HEATMAP_ATTRIBUTE)
                        or node in targets or node is sourceVolume):
                    continue
                targets.append(node)
        return targets

    # ---- heatmap ----------------------------------------------------------------------------------
    def updateHeatmap(self, sourceVolume, targetVolume, pointRas, heatmapNode=None, opacity: float = 0.5):
        """Similarity to the source point on the target's grid, shown as coloured foreground over the target."""
        from anatomical_embedding import mrml
        from anatomical_embedding.io import convert_points

        heat = self.matcher(sourceVolume, targetVolume).heatmap(
            convert_points(np.asarray(pointRas, float), "RAS", "LPS"), reference=mrml.node_to_volume(targetVolume))
        scene = targetVolume.GetScene()
        if heatmapNode is None:
            heatmapNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{targetVolume.GetName()} similarity")
        mrml.set_node_from_volume(heatmapNode, heat)
        heatmapNode.SetAttribute(HEATMAP_ATTRIBUTE, targetVolume.GetID())
        if heatmapNode.GetDisplayNode() is None:
            heatmapNode.CreateDefaultDisplayNodes()
        display = heatmapNode.GetDisplayNode()
        colour = scene.GetFirstNodeByName("Rainbow") or scene.GetNodeByID("vtkMRMLColorTableNodeRainbow")
        if colour is not None:
            display.SetAndObserveColorNodeID(colour.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)  # cosine similarity; below 0 is as unlike as it gets
        display.SetLowerThreshold(0.0)
        display.SetUpperThreshold(1.0)
        display.SetApplyThreshold(1)
        self.showHeatmap(targetVolume, heatmapNode, opacity)
        return heatmapNode

    @staticmethod
    def showHeatmap(targetVolume, heatmapNode, opacity: float) -> None:
        """Target as background and the heatmap as foreground in every slice view."""
        scene = targetVolume.GetScene()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            composite.SetBackgroundVolumeID(targetVolume.GetID())
            composite.SetForegroundVolumeID(heatmapNode.GetID())
            composite.SetForegroundOpacity(float(opacity))

    @staticmethod
    def setHeatmapOpacity(heatmapNode, opacity: float) -> None:
        if heatmapNode is None or heatmapNode.GetScene() is None:
            return
        scene = heatmapNode.GetScene()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            if composite.GetForegroundVolumeID() == heatmapNode.GetID():
                composite.SetForegroundOpacity(float(opacity))

    # ---- results table ----------------------------------------------------------------------------
    def updateResultsTable(self, tableNode, targetMarkupsNodes: Sequence):
        """Rewrite ``tableNode`` (created when None) with one row per matched point of the given lists."""
        if tableNode is None:
            scene = next(n for n in targetMarkupsNodes if n is not None).GetScene()
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "Correspondence results")
        table = vtk.vtkTable()
        columns = {}
        for name in RESULT_COLUMNS:
            array = vtk.vtkStringArray() if name in ("label", "target", "flag") else vtk.vtkDoubleArray()
            array.SetName(name)
            table.AddColumn(array)
            columns[name] = array
        for node in targetMarkupsNodes:
            if node is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                scores = self.pointScores(node, i)
                if "similarity" not in scores:
                    continue
                ras = np.zeros(3)
                node.GetNthControlPointPositionWorld(i, ras)
                columns["label"].InsertNextValue(node.GetNthControlPointLabel(i))
                columns["target"].InsertNextValue(node.GetName())
                for axis, value in zip("RAS", ras):
                    columns[axis].InsertNextValue(float(value))
                for key in ("similarity", "confidence", "fb_distance_mm"):
                    columns[key].InsertNextValue(float("nan") if scores.get(key) is None else float(scores[key]))
                columns["flag"].InsertNextValue(LOW_CONFIDENCE_TEXT if scores.get("low_confidence") else "")
        tableNode.SetAndObserveTable(table)
        tableNode.SetLocked(True)
        return tableNode

    @staticmethod
    def resultsTableRows(tableNode) -> list:
        table = tableNode.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        rows = []
        for r in range(table.GetNumberOfRows()):
            row = {}
            for c, name in enumerate(names):
                value = table.GetValue(r, c)
                row[name] = value.ToString() if name in ("label", "target", "flag") else value.ToDouble()
            rows.append(row)
        return rows

    def jumpToResult(self, tableNode, row: int) -> Optional[np.ndarray]:
        if tableNode is None or row < 0 or row >= tableNode.GetTable().GetNumberOfRows():
            return None
        r = self.resultsTableRows(tableNode)[row]
        return self.jumpToPoint([r["R"], r["A"], r["S"]])

    @staticmethod
    def jumpToPoint(ras) -> np.ndarray:
        """Centre the slice views on a RAS point (the Markups logic's jump, as when clicking a point)."""
        ras = np.asarray(ras, dtype=float)
        try:
            markupsLogic = slicer.modules.markups.logic()
        except AttributeError:
            markupsLogic = None
        if markupsLogic is not None and hasattr(markupsLogic, "JumpSlicesToLocation"):
            markupsLogic.JumpSlicesToLocation(float(ras[0]), float(ras[1]), float(ras[2]), True)
        return ras

    # ---- click-to-correspond ----------------------------------------------------------------------
    def startClickToCorrespond(self, sourceMarkups, sourceVolume, targetVolume, targetMarkups=None,
                               onMatched: Optional[Callable[[dict], None]] = None):
        """Match each point placed or moved on ``sourceMarkups`` at once; returns the target point list."""
        if sourceMarkups is None or sourceVolume is None or targetVolume is None:
            raise ValueError("click-to-correspond needs a source point list, a source volume and a target volume")
        self.stopClickToCorrespond()
        targetMarkups = targetMarkups or self.defaultTargetMarkups(targetVolume)
        self.embedding(sourceVolume), self.embedding(targetVolume)  # no-op when the widget embedded them already
        callbacks, tags = [], []
        for event in (sourceMarkups.PointPositionDefinedEvent, sourceMarkups.PointStartInteractionEvent,
                      sourceMarkups.PointEndInteractionEvent, sourceMarkups.PointModifiedEvent):
            # One callback per event: VTK passes custom MRML events to Python without their id.
            callback = vtk.calldata_type(vtk.VTK_INT)(
                lambda caller, name, index=-1, event=event: self.onSourcePointEvent(caller, event, index))
            callbacks.append(callback)
            tags.append(sourceMarkups.AddObserver(event, callback))
        self._click = {"source": sourceMarkups, "sourceVolume": sourceVolume, "targetVolume": targetVolume,
                       "target": targetMarkups, "tags": tags, "callbacks": callbacks, "onMatched": onMatched,
                       "last": {}, "results": [], "dragging": False}
        return targetMarkups

    def stopClickToCorrespond(self) -> None:
        if self._click is not None:
            for tag in self._click["tags"]:
                self._click["source"].RemoveObserver(tag)
        self._click = None

    def clickToCorrespondActive(self) -> bool:
        return self._click is not None

    def onSourcePointEvent(self, caller, event: int, index=None) -> Optional[dict]:
        """Observer of the source list (``event`` is the MRML event id): match point ``index`` when placed or moved.

        PointModifiedEvent also fires during a drag; the match then runs once, at PointEndInteractionEvent.
        A point whose position and label did not change is not matched again.
        """
        state = self._click
        if state is None or self._busy or index is None:
            return None
        node = state["source"]
        if event == node.PointStartInteractionEvent:
            state["dragging"] = True
            return None
        if event == node.PointEndInteractionEvent:
            state["dragging"] = False
        elif event == node.PointModifiedEvent and state["dragging"]:
            return None  # matched once, at the end of the drag
        if index < 0 or index >= node.GetNumberOfControlPoints() or \
                node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            return None
        ras = np.zeros(3)
        node.GetNthControlPointPositionWorld(index, ras)
        pid = node.GetNthControlPointID(index)
        label = node.GetNthControlPointLabel(index)
        last = state["last"].get(pid)
        if last is not None and np.allclose(last[0], ras, atol=1e-6) and last[1] == label:
            return None
        self._busy = True  # writing the target list must not re-enter through our own events
        try:
            result = self.matchControlPoint(node, index, state["sourceVolume"], state["targetVolume"], state["target"])
        except ValueError as exc:  # e.g. a point outside the source image: tell, do not crash the observer
            logging.warning("Not matched: %s", exc)
            return None
        finally:
            self._busy = False
        state["last"][pid] = (ras.copy(), label)
        state["results"].append(result)
        if state["onMatched"] is not None:
            state["onMatched"](result)
        return result

    # ---- few-shot labelling -----------------------------------------------------------------------
    @staticmethod
    def _caseRole(role: str, row: int) -> str:
        return f"{role}{row}"

    def addFewShotCase(self, tableNode, volumeNode, segmentationNode):
        """Append a (volume, segmentation) case to the cases table (created when None); returns the table.

        The rows show names; the nodes themselves are node references of the table (one role per row),
        so the cases survive scene save/reload and node ID changes on import.
        """
        if volumeNode is None or segmentationNode is None:
            raise ValueError("a few-shot case needs a volume and its segmentation")
        if segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
            raise ValueError(f"segmentation {segmentationNode.GetName()!r} has no segments; label something first")
        scene = volumeNode.GetScene()
        if tableNode is None:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "Few-shot cases")
        cases = self.fewShotCases(tableNode)
        if any(v is volumeNode and s is segmentationNode for v, s in cases):
            return tableNode
        cases.append((volumeNode, segmentationNode))
        self._writeCases(tableNode, cases)
        return tableNode

    def removeFewShotCase(self, tableNode, row: int) -> None:
        cases = self.fewShotCases(tableNode)
        if 0 <= row < len(cases):
            del cases[row]
            self._writeCases(tableNode, cases)

    def _writeCases(self, tableNode, cases: list) -> None:
        old = int(tableNode.GetAttribute("AnatomicalEmbedding.caseCount") or 0)
        for row in range(old):
            tableNode.RemoveNodeReferenceIDs(self._caseRole(CASE_VOLUME_ROLE, row))
            tableNode.RemoveNodeReferenceIDs(self._caseRole(CASE_SEGMENTATION_ROLE, row))
        table = vtk.vtkTable()
        columns = []
        for name in ("volume", "segmentation", "segments"):
            array = vtk.vtkStringArray()
            array.SetName(name)
            table.AddColumn(array)
            columns.append(array)
        for row, (volume, seg) in enumerate(cases):
            tableNode.SetNodeReferenceID(self._caseRole(CASE_VOLUME_ROLE, row), volume.GetID())
            tableNode.SetNodeReferenceID(self._caseRole(CASE_SEGMENTATION_ROLE, row), seg.GetID())
            from anatomical_embedding import mrml

            columns[0].InsertNextValue(volume.GetName())
            columns[1].InsertNextValue(seg.GetName())
            columns[2].InsertNextValue(", ".join(mrml.segment_names(seg)))
        tableNode.SetAttribute("AnatomicalEmbedding.caseCount", str(len(cases)))
        tableNode.SetAndObserveTable(table)
        tableNode.SetLocked(True)

    def fewShotCases(self, tableNode) -> list:
        """(volume node, segmentation node) pairs of the cases table; rows with a deleted node are skipped."""
        if tableNode is None:
            return []
        cases = []
        for row in range(int(tableNode.GetAttribute("AnatomicalEmbedding.caseCount") or 0)):
            volume = tableNode.GetNodeReference(self._caseRole(CASE_VOLUME_ROLE, row))
            seg = tableNode.GetNodeReference(self._caseRole(CASE_SEGMENTATION_ROLE, row))
            if volume is None or seg is None:
                logging.warning("Few-shot case %d of %s lost its volume or segmentation; skipped", row,
                                tableNode.GetName())
                continue
            cases.append((volume, seg))
        return cases

    def _fewShotData(self, cases: Sequence) -> tuple:
        """Read cases on the main thread: images, label maps with global class values, names and colours."""
        from anatomical_embedding import mrml

        if not cases:
            raise ValueError("no few-shot cases: add at least one (volume, segmentation) pair")
        classes: dict = {}   # segment name -> class value (first-seen order)
        colors: dict = {}
        images, labels = [], []
        for volume, seg in cases:
            names = mrml.segment_names(seg)
            if not names:
                raise ValueError(f"segmentation {seg.GetName()!r} has no segments")
            segmentation = seg.GetSegmentation()
            for name in names:
                if name not in classes:
                    classes[name] = len(classes) + 1
                    colors[classes[name]] = list(segmentation.GetSegment(
                        segmentation.GetSegmentIdBySegmentName(name)).GetColor())
            label, _ = mrml.segmentation_node_to_labelmap(seg, volume, {classes[n]: n for n in names})
            images.append(mrml.node_to_volume(volume))
            labels.append(label)
        return images, labels, {v: n for n, v in classes.items()}, colors

    def _trainJob(self, cases: Sequence, job: BackgroundJob, config=None) -> Callable:
        from anatomical_embedding.fewshot.head import FewShotConfig, train_head

        model = self._requireModel()
        images, labels, names, colors = self._fewShotData(cases)
        config = config or FewShotConfig()

        def work():
            model.set_memo(True)
            try:
                return train_head(model, images, labels, names, config, progress=job.report, colors=colors)
            finally:
                model.set_memo(False)

        def finish(head):
            self.head = head
            return head

        job.finish = finish
        return work

    def trainFewShotHead(self, cases: Sequence, config=None, progress: Optional[Callable] = None):
        """Train the few-shot head on (volume, segmentation) cases now (blocking); segment names are the classes."""
        job = BackgroundJob("Training the few-shot head")
        if progress is not None:
            job.report = lambda fraction, message="": progress(fraction, message) is not False  # only False cancels
        work = self._trainJob(cases, job, config)
        return job.finish(work())

    def trainFewShotHeadAsync(self, cases: Sequence, config=None) -> BackgroundJob:
        job = BackgroundJob("Training the few-shot head")
        return self._submit(job, self._trainJob(cases, job, config))

    def loadHead(self, path):
        from anatomical_embedding.fewshot.head import FewShotHead

        self.head = FewShotHead.load(path)
        return self.head

    def _applyJob(self, volumeNode, outputSegmentation, job: BackgroundJob) -> Callable:
        from anatomical_embedding import mrml
        from anatomical_embedding.fewshot.head import apply_head

        model = self._requireModel()
        if self.head is None:
            raise RuntimeError("no few-shot head: train one (or load a saved .aehead) first")
        head = self.head
        image = mrml.node_to_volume(volumeNode)
        scene = volumeNode.GetScene()
        name = f"{volumeNode.GetName()} few-shot segmentation"

        def work():
            model.set_memo(True)
            try:
                return apply_head(model, head, image, progress=job.report)
            finally:
                model.set_memo(False)

        def finish(label):
            names = {int(v): n for v, n in zip(head.class_values[1:], head.class_names[1:])}
            colors = {int(v): c for v, c in zip(head.class_values[1:], head.colors[1:]) if len(c) >= 3} or None
            node = mrml.labelmap_to_segmentation_node(label, names, scene, name, colors=colors,
                                                      reference_node=volumeNode)
            if outputSegmentation is not None and outputSegmentation.GetScene() is scene:
                # Keep the user's node (and its place in the scene): copy the new segments into it.
                outputSegmentation.GetSegmentation().DeepCopy(node.GetSegmentation())
                outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                if outputSegmentation.GetDisplayNode() is None:
                    outputSegmentation.CreateDefaultDisplayNodes()
                scene.RemoveNode(node.GetDisplayNode())
                scene.RemoveNode(node)
                node = outputSegmentation
            return node

        job.finish = finish
        return work

    def applyFewShotHead(self, volumeNode, outputSegmentation=None, progress: Optional[Callable] = None):
        """Segment ``volumeNode`` with the head now (blocking): a segmentation node with named, coloured segments."""
        job = BackgroundJob(f"Segmenting {volumeNode.GetName()}")
        if progress is not None:
            job.report = lambda fraction, message="": progress(fraction, message) is not False
        work = self._applyJob(volumeNode, outputSegmentation, job)
        return job.finish(work())

    def applyFewShotHeadAsync(self, volumeNode, outputSegmentation=None) -> BackgroundJob:
        job = BackgroundJob(f"Segmenting {volumeNode.GetName()}")
        return self._submit(job, self._applyJob(volumeNode, outputSegmentation, job))

    # ---- phantom data -----------------------------------------------------------------------------
    def loadPhantomPair(self, seed: int = 0, outputDir: Optional[str] = None, scene=None,
                        spacing: Optional[float] = 2.0, size: Optional[int] = None) -> list:
        """Generate two synthetic torso scans and load each as volume, segmentation and landmarks.

        Returns one dict per subject with the "volume", "segmentation" and "landmarks" nodes.
        """
        from anatomical_embedding import io, mrml, phantoms
        from anatomical_embedding.io.labelmaps import read_labelmap

        scene = scene or slicer.mrmlScene
        if outputDir is None:
            outputDir = tempfile.mkdtemp(prefix="AnatomicalEmbeddingPhantoms-", dir=slicer.app.temporaryPath)
        # workers=1: worker processes would start new Slicer instances (sys.executable is Slicer).
        manifest = phantoms.generate_cohort(pathlib.Path(outputDir), n=2, seed=int(seed), spacing=spacing,
                                            size=size, workers=1)
        cohort = phantoms.load_cohort(manifest)
        names = {int(v): str(n) for v, n in cohort.label_names.items()}
        cases = []
        for index, subject in enumerate(cohort.subjects[:2]):
            name = f"Phantom{seed}_{'source' if index == 0 else 'target'}"
            image = io.read_image(subject.image_path)
            label, _ = read_labelmap(subject.label_path)
            cases.append(mrml.load_case(scene, image, name, label=label, label_names=names,
                                        landmarks=subject.landmarks))
            logging.info("Loaded %s from %s", name, subject.image_path)
        return cases

    def loadPhantomPairSample(self, seed: int = 0, outputDir: Optional[str] = None, scene=None,
                              spacing: Optional[float] = 2.0, size: Optional[int] = None) -> list:
        """The "Phantom pair" sample: load the pair and set it up for click-to-correspond.

        The target's true landmarks stay as a locked reference list ("... ground truth") so the user sees
        each match's error; an empty source list receives the clicks. Returns the two case dicts.
        """
        cases = self.loadPhantomPair(seed, outputDir, scene, spacing, size)
        source, target = cases
        target["landmarks"].SetName(f"{target['volume'].GetName()} ground truth")
        target["landmarks"].SetLocked(True)
        source["landmarks"].SetName(f"{source['volume'].GetName()} landmarks")
        p = self.getParameterNode()
        p.sourceVolume = source["volume"]
        p.targetVolume = target["volume"]
        p.sourceLandmarks = source["landmarks"]
        p.segmentVolume = target["volume"]
        try:
            slicer.util.setSliceViewerLayers(background=source["volume"], fit=True)
        except Exception as exc:  # noqa: BLE001 - no views (headless)
            logging.debug("No slice views to show the pair in: %s", exc)
        return cases


#
# Test (runs inside Slicer; the engine's own tests are the pytest suite under Testing/, where
# Testing/test_viewer_module.py runs the same flows on slicer-core)
#
class AnatomicalEmbeddingTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LoadPhantomPair()
        self.setUp()
        self.test_CorrespondAndFewShot()

    def _tinyPackage(self) -> Optional[str]:
        """A model package to test with: $ANATOMICAL_EMBEDDING_TEST_MODEL or the first installed model."""
        path = os.environ.get("ANATOMICAL_EMBEDDING_TEST_MODEL")
        if path and os.path.exists(path):
            return path
        models = AnatomicalEmbeddingLogic.installedModels()
        return models[0]["path"] if models else None

    def test_LoadPhantomPair(self):
        """The phantom pair arrives in the scene with the geometry, segments and landmarks of its files."""
        from anatomical_embedding import io, mrml, phantoms
        from anatomical_embedding.io.labelmaps import read_labelmap

        self.delayDisplay("Loading phantom pair")
        logic = AnatomicalEmbeddingLogic()
        self.assertEqual(logic.missingEnginePackages(), [])  # phantoms need scipy and SimpleITK only
        outputDir = tempfile.mkdtemp(prefix="AnatomicalEmbeddingTest-", dir=slicer.app.temporaryPath)
        cases = logic.loadPhantomPairSample(seed=1, outputDir=outputDir, spacing=4.0, size=64)
        self.assertEqual(len(cases), 2)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 2)
        cohort = phantoms.load_cohort(pathlib.Path(outputDir))
        for case, subject in zip(cases, cohort.subjects):
            image = io.read_image(subject.image_path)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["volume"]), image.array)
            ijkToRas = vtk.vtkMatrix4x4()
            case["volume"].GetIJKToRASMatrix(ijkToRas)
            np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijkToRas), image.ijk_to_world("RAS"), atol=1e-4)
            names = {int(v): n for v, n in cohort.label_names.items()}
            label, _ = read_labelmap(subject.label_path)
            back, _ = mrml.segmentation_node_to_labelmap(case["segmentation"], case["volume"], names)
            np.testing.assert_array_equal(back.array, label.array)

        self.delayDisplay("Widget selections follow the parameter node")
        slicer.util.selectModule("AnatomicalEmbedding")  # enter() connects the GUI to the parameter node
        widget = slicer.modules.anatomicalembedding.widgetRepresentation().self()
        parameterNode = widget.logic.getParameterNode()
        self.assertEqual(parameterNode.sourceVolume, cases[0]["volume"])
        self.assertEqual(widget.ui.sourceVolumeSelector.currentNode(), cases[0]["volume"])
        self.delayDisplay("Test passed")

    def test_CorrespondAndFewShot(self):
        """Click-to-correspond, heatmap, transfer-all and few-shot on the phantom pair (needs a model package)."""
        from anatomical_embedding import mrml
        from anatomical_embedding.fewshot.head import FewShotConfig

        package = self._tinyPackage()
        if package is None:
            self.delayDisplay("No model package (set ANATOMICAL_EMBEDDING_TEST_MODEL): correspondence test skipped")
            return
        logic = AnatomicalEmbeddingLogic(cacheDir=tempfile.mkdtemp(dir=slicer.app.temporaryPath))
        logic.loadModel(package, "ONNX Runtime", "auto")
        outputDir = tempfile.mkdtemp(prefix="AnatomicalEmbeddingTest-", dir=slicer.app.temporaryPath)
        source, target = logic.loadPhantomPairSample(seed=3, outputDir=outputDir, spacing=4.0, size=64)

        self.delayDisplay("Embedding in the background")
        job = logic.embedVolumeAsync(source["volume"])
        while not job.done():
            slicer.app.processEvents()  # the GUI stays live while the worker embeds
            time.sleep(0.05)
        logic.finishJob(job)
        self.assertTrue(logic.isEmbedded(source["volume"]))

        self.delayDisplay("Click-to-correspond")
        clicks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        matches = logic.startClickToCorrespond(clicks, source["volume"], target["volume"])
        names, truthSource = mrml.markups_node_to_points(source["landmarks"])
        ras = truthSource[0] * [-1, -1, 1]
        clicks.AddControlPoint(vtk.vtkVector3d(*ras), names[0])
        self.assertEqual(matches.GetNumberOfControlPoints(), 1)
        self.assertEqual(matches.GetNthControlPointLabel(0), names[0])
        scores = logic.pointScores(matches, 0)
        self.assertIn("similarity", scores)
        self.assertIn("confidence", scores)
        logic.stopClickToCorrespond()
        heatmap = logic.updateHeatmap(source["volume"], target["volume"], ras)
        self.assertTrue(mrml.node_to_volume(heatmap).same_geometry(mrml.node_to_volume(target["volume"])))

        self.delayDisplay("Transfer all")
        out = logic.transferAll(source["landmarks"], source["volume"], [target["volume"]])[0]
        self.assertEqual(out.GetNumberOfControlPoints(), len(names))
        table = logic.updateResultsTable(None, [out])
        self.assertEqual(table.GetTable().GetNumberOfRows(), len(names))
        logic.jumpToResult(table, 0)

        self.delayDisplay("Few-shot")
        cases = logic.addFewShotCase(None, source["volume"], source["segmentation"])
        logic.trainFewShotHead(logic.fewShotCases(cases), FewShotConfig(voxels_per_class=300, epochs=30))
        seg = logic.applyFewShotHead(target["volume"])
        self.assertEqual(mrml.segment_names(seg), mrml.segment_names(source["segmentation"]))
        self.delayDisplay("Test passed")
