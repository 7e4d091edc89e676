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

This file holds the module, its parameter node, the Widget (GUI wiring only) and the Slicer self-test; the logic,
background jobs and views are in ``AnatomicalEmbeddingLib``. Everything except the Widget runs on slicer-core (no Qt):
see ``Testing/test_viewer_module.py``.
"""
import logging
import os
import pathlib
import tempfile
import time
from typing import Annotated, Callable, Optional

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
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AnatomicalEmbeddingLib.jobs import BackgroundJob, JobQueue
from AnatomicalEmbeddingLib.logic import AnatomicalEmbeddingLogic
from AnatomicalEmbeddingLib.matches import LOW_CONFIDENCE_COLOR, MATCH_COLOR  # noqa: F401 (the module's constants)
from AnatomicalEmbeddingLib.views import LOW_CONFIDENCE_TEXT, RESULT_COLUMNS  # noqa: F401

#: The parameter node's choices (literal lists: Testing/test_ui_files.py checks them against the .ui combo boxes);
#: the logic maps each backend to the engine's name (AnatomicalEmbeddingLib.logic.ENGINE_BACKEND).
BACKENDS = ["ONNX Runtime", "torch"]
DEVICES = ["auto", "cpu", "cuda"]


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
Pick a model, a source and a target scan; points placed (or dragged) on the source, in the top row of views,
are matched in the target, shown in the bottom row (click-to-correspond), with a similarity heatmap and a
confidence for every match. Each target volume and source list has its own "Matched points" list: picking
another target or source list selects its list (or a new one) and leaves the previous one as it is. Changing a
selector while jobs run restarts click-to-correspond when they are done; a (re)start also matches the source
points that have no current match in the "Matched points" list. A job started while another runs waits behind
it (Cancel cancels the one shown). Turning click-to-correspond off ends place mode and restores where the
point lists are drawn. Few-shot labelling trains a small segmentation head from a few segmented cases. Try it
on the "Phantom pair" sample data.
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
#: Placeholder URI of the generated sample (never downloaded: the custom downloader generates the pair locally).
PHANTOM_PAIR_URI = "https://github.com/AnatomicalEmbedding/generated/phantom-pair"


def registerSampleData() -> bool:
    """Register "Phantom pair" with the SampleData module; False when SampleData is absent."""
    try:
        import SampleData
    except ImportError:
        logging.info("SampleData module not available; the phantom pair is still in the module's Phantom data panel")
        return False
    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")

    def generate(source=None):
        # SampleData calls customDownloader(source) instead of downloading: generate and load the pair (no network).
        logic = AnatomicalEmbeddingLogic()
        return logic.loadPhantomPairSample()

    try:
        # Slicer's SampleDataSource needs uris, fileNames, nodeNames ... of equal length (None fails len()); as in
        # Slicer's own custom-downloader test source, one placeholder URI and file name: the custom downloader
        # replaces the download, so the URI is never fetched.
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="AnatomicalEmbedding", sampleName="PhantomPair",
            thumbnailFileName=os.path.join(iconsPath, "AnatomicalEmbedding.png"),
            uris=PHANTOM_PAIR_URI, fileNames="PhantomPair.nrrd", nodeNames="PhantomPair", loadFiles=False,
            customDownloader=generate)
        return True
    except Exception as exc:  # noqa: BLE001 - an older SampleData API must not break module loading
        logging.error("Could not register the phantom pair with SampleData: %s", exc)
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
    fitWindows - embed in sliding windows fitted to each image (EmbedConfig.max_window_voxels; opt-in, faster for
        large models, changes the maps).
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
    fitWindows: bool = False


# The logic lives in AnatomicalEmbeddingLib; it wraps the scene's parameter node with the class declared here.
AnatomicalEmbeddingLogic.parameterNodeClass = AnatomicalEmbeddingParameterNode


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
        #: The background jobs started here, in order, each with its after-step: one runs at a time (the worker
        #: runs them in submission order) and each is finished and applied in turn, none replaces another.
        self._jobs = JobQueue()
        #: The job that prepares the pair for click mode's start (its failure or Cancel turns click mode off).
        self._clickStartJob = None
        self._timer = None

    @property
    def _job(self) -> Optional[BackgroundJob]:
        """The job the progress bar shows (the queue's first), or None."""
        return self._jobs.current()

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomicalEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatomicalEmbeddingLogic()
        self.logic.matchInBackground = True  # a click only reads its point on the GUI thread
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
        # As at scene close: every job (queued, running, done but not applied, click matches, warming) is
        # cancelled, so nothing is written later and no child process outlives the module.
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.stopClickToCorrespond()
            self.logic.abandonJobs()
        self._jobs.clear()
        self._clickStartJob = None
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
        self.logic.abandonJobs()  # a job's finish step must not write into the next scene
        self._jobs.clear()
        self._clickStartJob = None
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
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
        self.logic.setFitWindows(p.fitWindows)
        self.logic.setHeatmapOpacity(p.heatmapVolume, p.heatmapOpacity if p.showHeatmap else 0.0)
        self.ui.modelCardLabel.setText(self.logic.modelCardText())
        # The matched list follows the target volume (the previous target's list is left as it is). In Slicer
        # this assignment calls this slot again, which then does the rest; below is a no-op afterwards.
        matched = self.logic.matchedPointsFor(p.sourceLandmarks, p.targetVolume, p.targetLandmarks)
        if matched is not p.targetLandmarks:
            p.targetLandmarks = matched
        self._syncClickMode()

    def _syncClickMode(self) -> None:
        """Start, restart or stop click mode as the parameter node says. A (re)start while jobs run or wait waits
        for all of them (onPollJob calls this again after each): its clicks would queue behind them anyway."""
        p = self._parameterNode
        active = self.logic.clickToCorrespondNodes()
        if active is not None and p.clickToCorrespond and (
                active != (p.sourceLandmarks, p.sourceVolume, p.targetVolume)
                or p.targetLandmarks is not self.logic.clickToCorrespondTarget()):
            # A selector changed while clicking (the matched-points list too: matches would still go to the
            # old one): restart on the new nodes; a cleared "Matched points" gets a new list, as at the start.
            self.logic.stopClickToCorrespond()
            active = None
        if p.clickToCorrespond and active is None:
            if not len(self._jobs):
                self._startClickMode()
            elif self._clickStartJob not in self._jobs:  # (its own preparation starts it when done)
                logging.info("click-to-correspond resumes when %d job(s) are done", len(self._jobs))
                self.ui.statusLabel.setText(self._jobs.statusText(self._clickModeWaitText()))
        elif not p.clickToCorrespond and active is not None:
            self.logic.stopClickToCorrespond()

    def _clickModeWaitText(self) -> str:
        return ("click-to-correspond resumes when this is done" if not self._jobs.waiting()
                else "click-to-correspond resumes when they are done")

    def _clickModeWaits(self) -> bool:
        """Click mode is on but stopped until the queued jobs are done (turned on, or a selector changed, while
        they ran; or its own preparation is done and others wait behind it)."""
        p = self._parameterNode
        return (p is not None and len(self._jobs) > 0 and self._clickStartJob not in self._jobs
                and p.clickToCorrespond and not self.logic.clickToCorrespondActive())

    # ---- model ----
    def refreshInstalledModels(self) -> None:
        self.ui.installedModelsComboBox.clear()
        self.ui.installedModelsComboBox.addItem("(choose an installed model)", "")
        for entry in self.logic.installedModels():
            self.ui.installedModelsComboBox.addItem(f"{entry['name']} ({entry.get('method', '')})", entry["path"])

    def onImportPublished(self) -> None:
        """Dialog: published checkpoint -> model package, registered and selected here."""
        # importing runs the published network: PyTorch, MONAI and onnx, one prompt, errors shown
        if not self.logic.ensureImportDependencies(askUser=True, progress=self.ui.statusLabel.setText):
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
        if not self.logic.ensureDependencies(p.backend, askUser=True, progress=self.ui.statusLabel.setText):
            return False
        with slicer.util.tryWithErrorDisplay("Could not load the model.", waitCursor=True):
            if str(p.modelPath) in ("", "."):  # none chosen: the shipped default for the source's modality
                self.logic.loadDefaultModel(p.sourceVolume, p.backend, p.device)
            else:
                self.logic.loadModel(p.modelPath, p.backend, p.device)
            self.ui.modelCardLabel.setText(self.logic.modelCardText())
            return True
        return False

    def _ensureModel(self) -> bool:
        return self.logic.model is not None or self.onLoadModel()

    # ---- background jobs ----
    def _runJob(self, job: BackgroundJob, afterJob: Optional[Callable[[], None]] = None) -> None:
        """Show ``job``'s progress and call ``afterJob`` once it is finished. A job started while others run waits
        behind them (the worker runs them in the same order): each is finished and applied in turn."""
        if not len(self._jobs):
            self.ui.progressBar.setValue(0)
        self._jobs.add(job, afterJob)
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.setEnabled(True)
        if self._jobs.waiting():
            self.ui.statusLabel.setText(self._jobs.statusText())
        self._timer.start()

    def onPollJob(self) -> None:
        self.logic.pollClickJobs()  # click matches run in the worker; their results are written here
        warming = self.logic.warmingJob()
        if self._job is None and (self.logic.clickJobsPending() or warming is not None):
            self.logic.yieldToWorker()
        if warming is not None:  # quiet: the main window's status bar, no progress bar or Cancel
            slicer.util.showStatusMessage(warming.message, 1000)
        job = self._job
        if job is None:
            # A click whose volumes were not prepared (embeddings dropped) waits for this background job.
            preparing = self.logic.clickPreparationJob()
            self.ui.progressBar.setVisible(preparing is not None)
            self.ui.cancelButton.setEnabled(preparing is not None)
            if preparing is not None:
                self.ui.progressBar.setValue(int(100 * preparing.progress))
                self.ui.statusLabel.setText(f"Preparing the volumes for the click: {preparing.message}")
                return
            if not (self.logic.clickToCorrespondActive() or self.logic.clickJobsPending() or warming is not None):
                self._timer.stop()
            return
        self.ui.progressBar.setValue(int(100 * job.progress))
        self.ui.statusLabel.setText(self._jobs.statusText(self._clickModeWaitText() if self._clickModeWaits()
                                                          else ""))
        finished = self._jobs.takeFinished()  # one job per tick, in submission order
        if finished is None:
            self.logic.yieldToWorker()  # PythonQt holds the interpreter lock while idle: let the worker run
            return
        job, after = finished
        if not len(self._jobs):  # (the next tick stops the timer unless click mode or tile warming needs it)
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setEnabled(False)
        clickStart = job is self._clickStartJob
        if clickStart:
            self._clickStartJob = None
        try:
            self.logic.finishJob(job)
        except Exception as exc:  # noqa: BLE001 - InterruptedError (Cancel) or a failure shown to the user
            if isinstance(exc, InterruptedError):
                self.ui.statusLabel.setText("Cancelled.")
            else:
                logging.exception("background job failed")
                slicer.util.errorDisplay(f"{job.description} failed: {exc}")
            if clickStart and self._parameterNode:
                self._parameterNode.clickToCorrespond = False  # click mode's own start was cancelled or failed
            elif self._parameterNode:
                self._syncClickMode()  # another job: click mode stays on, restarted if it waited for this one
            return
        self.ui.statusLabel.setText(f"{job.description}: done in {job.seconds:.1f} s")
        if after is not None:
            after()
        if self._parameterNode:
            self._syncClickMode()  # a (re)start that waited for the jobs, once none is left

    def onCancel(self) -> None:
        """Cancel the job the progress bar shows; the jobs waiting behind it still run, each cancellable in turn
        (each was asked for on its own: Cancel never drops a result the user did not see being cancelled)."""
        if self._jobs.cancelCurrent() is None:
            job = self.logic.clickPreparationJob()
            if job is not None:
                job.cancel()

    def _embedThen(self, after: Callable[[], None], targets: Optional[list] = None,
                   bothWays: bool = False) -> Optional[BackgroundJob]:
        """Embed the source and targets and fit their priors (one background job), then call ``after``; returns
        that job, or None when ``after`` ran at once (prepared already) or nothing could start."""
        p = self._parameterNode
        targets = targets or [p.targetVolume]
        if not self._ensureModel() or p.sourceVolume is None or None in targets:
            slicer.util.warningDisplay("Choose a model, a source volume and a target volume first.")
            p.clickToCorrespond = False
            return None
        if self.logic.isPrepared(p.sourceVolume, targets, bothWays):
            after()
            return None
        job = self.logic.prepareCorrespondenceAsync(p.sourceVolume, targets, bothWays, p.sourceLandmarks)
        self._runJob(job, after)
        return job

    def onEmbed(self) -> None:
        self._embedThen(lambda: self.ui.statusLabel.setText("Source and target are embedded."))

    # ---- correspond ----
    def _startClickMode(self) -> None:
        def start():
            if len(self._jobs):  # jobs queued behind its preparation: _syncClickMode starts it once they are done
                return
            p = self._parameterNode
            if p.sourceLandmarks is None:
                p.sourceLandmarks = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Source points")
            with slicer.util.tryWithErrorDisplay("Could not start click-to-correspond.", waitCursor=False):
                # Persistent place mode into the source list, undone when click mode stops. Slicer places
                # points only where the list is drawn: the source row (top), not the target row (bottom).
                p.targetLandmarks = self.logic.startClickToCorrespond(
                    p.sourceLandmarks, p.sourceVolume, p.targetVolume, p.targetLandmarks,
                    onMatched=self._onMatched, onError=self._onMatchError, placeMode=True)
                self._timer.start()  # polls the click matches
                self.ui.statusLabel.setText("Click in the source views (top row): each point is matched in the "
                                            "target (bottom row). Drag a source point to match it again.")
                return
            p.clickToCorrespond = False

        # The pair is being prepared (or None: started, or refused): click mode starts when that job is done.
        self._clickStartJob = self._embedThen(start)

    def _onMatchError(self, message: str) -> None:
        self.ui.statusLabel.setText(message)
        slicer.util.warningDisplay(message, windowTitle="Anatomical Embedding")

    def _onMatched(self, result: dict) -> None:
        p = self._parameterNode
        # On the embedding's coarse grid: milliseconds, whatever the target's size. Never an embedding here:
        # when they were dropped since this match, the next click prepares them in the background.
        if p.showHeatmap and self.logic.isEmbedded(p.sourceVolume) and self.logic.isEmbedded(p.targetVolume):
            p.heatmapVolume = self.logic.updateHeatmap(p.sourceVolume, p.targetVolume, result["query_ras"],
                                                       p.heatmapVolume, p.heatmapOpacity)
        # The list the match went to: a (re)start matches the source points without a match before
        # p.targetLandmarks is set to its list.
        p.resultsTable = self.logic.updateResultsTable(p.resultsTable, [result["target_markups"]])
        flag = f" ({LOW_CONFIDENCE_TEXT})" if result["low_confidence"] else ""
        self.ui.statusLabel.setText(f"{result['label']}: similarity {result['similarity']:.2f}, confidence "
                                    f"{result['confidence']:.2f}{flag}, {1000 * result['seconds']:.0f} ms")

    def onTransferAll(self) -> None:
        p = self._parameterNode
        targets = self.logic.targetVolumes(p.sourceVolume, p.targetVolume, p.transferToAllVolumes)

        def transfer():  # in the worker thread (progress, Cancel); the lists are written when it is done
            with slicer.util.tryWithErrorDisplay("Transfer failed.", waitCursor=False):
                job = self.logic.transferAllAsync(p.sourceLandmarks, p.sourceVolume, targets,
                                                  [p.targetLandmarks] + [None] * (len(targets) - 1))

                def done():
                    p.targetLandmarks = job.output[0]
                    p.resultsTable = self.logic.updateResultsTable(p.resultsTable, job.output)
                self._runJob(job, done)

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
        if str(p.headPath) in ("", ".") or self.logic.head is None:
            return
        # Called after training, so the head in memory is new: an existing file is someone's, ask first.
        if p.headPath.exists() and not slicer.util.confirmYesNoDisplay(
                f"{p.headPath} exists. Replace it with the head just trained?", windowTitle="Anatomical Embedding"):
            self.ui.statusLabel.setText("Head trained (kept in memory; the file was not replaced).")
            return
        with slicer.util.tryWithErrorDisplay("Could not save the head.", waitCursor=False):
            self.logic.saveHead(p.headPath, overwrite=True)

    def onApplyHead(self) -> None:
        p = self._parameterNode
        if not self._ensureModel() or p.segmentVolume is None:
            slicer.util.warningDisplay("Choose a model and the volume to segment.")
            return
        with slicer.util.tryWithErrorDisplay("Could not apply the head.", waitCursor=False):
            self.logic.headForApplying(p.headPath)  # a newly chosen head file wins over the head in memory
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
            logic.yieldToWorker()  # the widget's poll timer does the same (no longer hidden by a long sleep)
        logic.finishJob(job)
        self.assertTrue(logic.isEmbedded(source["volume"]))
        # "Fit sliding windows": another embedding configuration, so the embedding in memory is no longer used.
        logic.setFitWindows(True)
        self.assertFalse(logic.isEmbedded(source["volume"]))
        logic.setFitWindows(False)

        self.delayDisplay("Preparing the pair in the background (inside Slicer: embedding and prior in a child)")
        job = logic.prepareCorrespondenceAsync(source["volume"], [target["volume"]], True, source["landmarks"])
        while not job.done():
            slicer.app.processEvents()
            logic.yieldToWorker()
        logic.finishJob(job)
        self.assertTrue(logic.isPrepared(source["volume"], [target["volume"]], bothWays=True))

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
        # Correspondence layout: source row shows the source only; target row the target with the heatmap.
        from AnatomicalEmbeddingLib import views
        heatmap = logic.updateHeatmap(source["volume"], target["volume"], ras)
        for composite in views.correspondenceViews(slicer.mrmlScene, "source"):
            self.assertEqual(composite.GetBackgroundVolumeID(), source["volume"].GetID())
            self.assertIsNone(composite.GetForegroundVolumeID())
        for composite in views.correspondenceViews(slicer.mrmlScene, "target"):
            self.assertEqual(composite.GetBackgroundVolumeID(), target["volume"].GetID())
            self.assertEqual(composite.GetForegroundVolumeID(), heatmap.GetID())
        self.assertTrue(heatmap.GetHideFromEditors())  # never offered as a source or target
        # The next click is read as a source point (one more match, same target list).
        clicks.AddControlPoint(vtk.vtkVector3d(*ras), "second")
        self.assertEqual(matches.GetNumberOfControlPoints(), 2)
        # A restart matches the points placed while click mode was off, and only those.
        logic.stopClickToCorrespond()
        clicks.AddControlPoint(vtk.vtkVector3d(*ras), "while off")
        restarted = logic.startClickToCorrespond(clicks, source["volume"], target["volume"], matches)
        self.assertIs(restarted, matches)
        labels = [matches.GetNthControlPointLabel(i) for i in range(matches.GetNumberOfControlPoints())]
        self.assertEqual(labels, [names[0], "second", "while off"])
        logic.stopClickToCorrespond()
        # Stopping undoes the row restriction of both lists (it is saved with the scene).
        self.assertEqual(clicks.GetDisplayNode().GetViewNodeIDs(), ())
        self.assertEqual(matches.GetDisplayNode().GetViewNodeIDs(), ())

        self.delayDisplay("Transfer all")
        out = logic.transferAll(source["landmarks"], source["volume"], [target["volume"]])[0]
        self.assertEqual(out.GetNumberOfControlPoints(), len(names))
        table = logic.updateResultsTable(None, [out])
        self.assertEqual(table.GetTable().GetNumberOfRows(), len(names))
        logic.jumpToResult(table, 0)

        self.delayDisplay("Few-shot (inside Slicer: training and applying in a child process)")
        cases = logic.addFewShotCase(None, source["volume"], source["segmentation"])
        job = logic.trainFewShotHeadAsync(logic.fewShotCases(cases), FewShotConfig(voxels_per_class=300, epochs=30))
        while not job.done():
            slicer.app.processEvents()
            logic.yieldToWorker()
        head = logic.finishJob(job)
        self.assertIs(logic.head, head)
        job = logic.applyFewShotHeadAsync(target["volume"])
        while not job.done():
            slicer.app.processEvents()
            logic.yieldToWorker()
        seg = logic.finishJob(job)
        self.assertEqual(mrml.segment_names(seg), mrml.segment_names(source["segmentation"]))
        self.delayDisplay("Test passed")
