"""AnatomicalEmbeddingTrainer: prepare training data, then start, watch, stop, resume and export training runs.

Training runs outside the Slicer process (``AnatomicalEmbeddingTrainerLib/train.py``, through
``anatomical_embedding.training.monitor``: one process, or torchrun for several), so Slicer never blocks.
A ``qt.QTimer`` calls ``AnatomicalEmbeddingTrainerLogic.poll()`` twice a second; it reads the lines the
process appended to ``RUN_DIR/console.log``, parses the engine's JSON progress lines, and rewrites a
``vtkMRMLTableNode`` (one row per logged step, one column per loss term) that a ``vtkMRMLPlotChartNode``
with one ``vtkMRMLPlotSeriesNode`` per term draws as loss curves. When training finishes, ``train.py
--export`` writes ``RUN_DIR/<run name>.aemodel`` and the logic registers it in
``anatomical_embedding.inference.registry`` so the AnatomicalEmbedding module lists it. *Export model* does the
same for a run folder with a checkpoint (``train.py --export-only``, through the same monitor and timer).

Training data: a folder of images (or the folder this module fills from the scene: each exported case is
an image in ``<folder>/images`` and, with a segmentation, a label map of the same name in
``<folder>/labels``), the layout that ``anatomical_embedding.data.datasets.DatasetSpec.from_path`` reads.

This file holds the module, its parameter node, the Widget (GUI wiring only) and the Slicer self-test; the logic,
settings and live view are in ``AnatomicalEmbeddingTrainerLib``.
"""
import logging
import pathlib
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AnatomicalEmbeddingTrainerLib.liveview import CHART_NAME, TABLE_NAME  # noqa: F401 (the module's constants)
from AnatomicalEmbeddingTrainerLib.logic import AnatomicalEmbeddingTrainerLogic
from AnatomicalEmbeddingTrainerLib.settings import METHOD_PARAMETER, pathOrEmpty  # noqa: F401

#: The parameter node's choices (literal lists: Testing/test_ui_files.py checks them against the .ui combo boxes).
DEVICES = ["auto", "cpu", "cuda"]
FINETUNE_MODES = ["embedding", "backbone", "scratch"]
POLL_INTERVAL_MS = 500
#: While another process trains the selected run folder, the panel asks its lock again this often.
BUSY_RECHECK_MS = 2000
STOPPING_TEXT = ("Stopping: finishing the current step and saving a checkpoint (press Stop again to end it at once, "
                 "without one).")


#
# AnatomicalEmbeddingTrainer
#
class AnatomicalEmbeddingTrainer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Anatomical Embedding Trainer"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["AnatomicalEmbedding developers"]
        self.parent.helpText = """
Pretrains a dense anatomical embedding (the methods the engine has: AEFM, ...) on a folder of scans, or on
scans and segmentations of the scene exported into a training folder. Training runs as a separate process
(one or several GPUs); progress, loss curves and the log update live. At the end the model package is
exported and listed by the AnatomicalEmbedding module; Export model does that for a run that was stopped or trained
without it.
<p>A run folder that another process is training is refused (Start, Resume and Export model are disabled). Closing the scene during training stops updating the
loss table and chart (training and the panel's status go on); opening this module again brings them back while the
run goes on.</p>
"""
        self.parent.acknowledgementText = """
Methods: AEFM (Zhuang et al.), Adam/Eve (Hosseinzadeh Taher et al.), AnatoMask (Li et al.),
HDSSL (Kats et al.). See the extension's README for references.
"""


#
# Parameter node
#
@parameterNodeWrapper
class AnatomicalEmbeddingTrainerParameterNode:
    """Module state saved in the scene.

    trainingVolume, trainingSegmentation, outputDirectory, caseName, overwrite - export of a scene case into
        a training folder (images/ and labels/).
    dataDirectory - images folder, cohort folder (images/ + labels/) or manifest to train on.
    labelsDirectory - optional label maps named like the images ("." = none).
    runDirectory - the run folder (checkpoints, logs, exported package).
    device, gpus, numProcesses - where to train: GPUs as CUDA_VISIBLE_DEVICES ("0,1"), processes > 1 use torchrun.
    batchSize, learningRate, epochs, maxSteps, patchSize - key hyperparameters (paper defaults; epochs 0 = the
        method's default, maxSteps > 0 overrides epochs; patch size "i,j,k" for methods that have one).
    maxSeconds - time limit of a run in seconds (train.max_seconds; 0 = none): it stops with a checkpoint and
        Resume continues it.
    advancedSettings - any other setting as TOML ([train] / [method] tables), applied last.
    exportModel - export and register the model package when training finishes (pretraining only).
    initFromDirectory, finetuneMode - method "finetune": the pretraining run to start from and how
        (embedding + U-Net, pretrained backbone, or scratch U-Net); labelled data is required.
    """

    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    outputDirectory: pathlib.Path
    caseName: str = "case_001"
    overwrite: bool = False
    dataDirectory: pathlib.Path
    labelsDirectory: pathlib.Path
    runDirectory: pathlib.Path
    device: Annotated[str, Choice(DEVICES)] = "auto"
    gpus: str = ""
    numProcesses: Annotated[int, WithinRange(1, 64)] = 1
    batchSize: Annotated[int, WithinRange(1, 4096)] = 2
    learningRate: float = 1e-4
    epochs: Annotated[int, WithinRange(0, 1000000)] = 0
    maxSteps: Annotated[int, WithinRange(0, 100000000)] = 0
    maxSeconds: Annotated[float, WithinRange(0.0, 1e9)] = 0.0
    patchSize: str = "96,96,96"
    advancedSettings: str = ""
    exportModel: bool = True
    initFromDirectory: pathlib.Path
    finetuneMode: Annotated[str, Choice(FINETUNE_MODES)] = "embedding"


# The logic lives in AnatomicalEmbeddingTrainerLib; it wraps the scene's parameter node with the class declared here.
AnatomicalEmbeddingTrainerLogic.parameterNodeClass = AnatomicalEmbeddingTrainerParameterNode


#
# Widget
#
class AnatomicalEmbeddingTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._toolTips = {}
        self._busyShown = None
        self._busyTimer = None  # asks the run folder's lock again while another process holds it

    def setup(self) -> None:
        import qt

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomicalEmbeddingTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatomicalEmbeddingTrainerLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPoll)
        self._busyTimer = qt.QTimer()
        self._busyTimer.setSingleShot(True)
        self._busyTimer.setInterval(BUSY_RECHECK_MS)
        self._busyTimer.connect("timeout()", self._updateButtons)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        try:
            methods = self.logic.availableMethods()
        except Exception as exc:  # engine missing or broken: say so instead of an empty combo box
            methods = []
            self.ui.trainingStatusLabel.text = f"Training engine not available: {exc}"
        for name in methods:
            self.ui.methodComboBox.addItem(name)
        # Without PyTorch the panel still opens (method defaults are read torch-free) and offers the install.
        self._missing = self.logic.missingTrainingPackages()
        if self._missing:
            self.ui.trainingStatusLabel.text = ("Training needs Python packages that are not installed: "
                                                + ", ".join(self._missing)
                                                + ". Start installs them (you will be asked first).")
        self.ui.methodComboBox.connect("currentTextChanged(QString)", self.onMethodChanged)

        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)
        self.ui.useTrainingFolderButton.connect("clicked(bool)", self.onUseTrainingFolder)
        self.ui.resetDefaultsButton.connect("clicked(bool)", self.onResetDefaults)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)
        self.ui.openRunFolderButton.connect("clicked(bool)", self.onOpenRunFolder)
        # The .ui's tooltips, shown while a button can be pressed (otherwise: why it cannot).
        self._toolTips = {action: button.toolTip for button, action in self._runButtons()}

        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        if self._busyTimer:
            self._busyTimer.stop()
        if self.logic:
            self.logic.stopTraining()  # graceful: the run saves a checkpoint and can be resumed
            self.logic.detachLiveView()

    def enter(self) -> None:
        self.initializeParameterNode()
        # A scene close detached the live view of a run that goes on (the logic observes the close): opening the
        # panel again shows it again, with the whole curve.
        if self.logic.reattachLiveView():
            self.logic.showChart()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanExport)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.trainingVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.trainingVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[AnatomicalEmbeddingTrainerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanExport)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected to the fields.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanExport)
            method = self.logic.getMethod(self._parameterNode)
            if method:
                self.ui.methodComboBox.setCurrentText(method)
            elif self.ui.methodComboBox.count:
                self.onMethodChanged(self.ui.methodComboBox.currentText)
            self._checkCanExport()

    def _checkCanExport(self, caller=None, event=None) -> None:
        p = self._parameterNode
        problem = None
        if not p or not p.trainingVolume:
            problem = "Select a volume to export."
        elif not pathOrEmpty(p.outputDirectory):
            problem = "Choose the training folder."
        elif not AnatomicalEmbeddingTrainerLogic.isValidCaseName(p.caseName):
            problem = "Case name may hold letters, digits, '-', '_' and '.' only."
        self.ui.exportCaseButton.enabled = problem is None
        self.ui.exportCaseButton.toolTip = problem or "Write the volume (and segmentation) into the training folder."
        self._updateButtons()

    def _runButtons(self) -> tuple:
        """(button, its action in the logic's actionProblems)."""
        return ((self.ui.startButton, "start"), (self.ui.stopButton, "stop"), (self.ui.resumeButton, "resume"),
                (self.ui.exportModelButton, "export"), (self.ui.openRunFolderButton, "openRunFolder"))

    def _updateButtons(self) -> None:
        if not self.logic:
            return
        problems = self.logic.actionProblems(self._parameterNode, self.ui.methodComboBox.count > 0)
        for button, action in self._runButtons():
            button.enabled = problems[action] is None
            button.toolTip = problems[action] or self._toolTips.get(action, "")
        # Another process trains the run folder (a shell, a crashed Slicer's child): said in the status too, and
        # taken back when it has ended.
        busy = problems["busy"]
        if busy and busy != self._busyShown:
            self.ui.trainingStatusLabel.text = busy
        elif not busy and self._busyShown and self.ui.trainingStatusLabel.text == self._busyShown:
            self.ui.trainingStatusLabel.text = ""
        self._busyShown = busy
        if busy and self._busyTimer is not None:  # the buttons come back soon after that process ends
            self._busyTimer.start()

    def onMethodChanged(self, method: str) -> None:
        if not self._parameterNode or not method:
            return
        previous = self.logic.getMethod(self._parameterNode)
        self.logic.setMethod(self._parameterNode, method)
        if previous != method:
            self.logic.applyDefaults(self._parameterNode, method, trainSettings=False)

    def onResetDefaults(self) -> None:
        self.logic.applyDefaults(self._parameterNode, self.ui.methodComboBox.currentText)

    def onExportCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not export the case.", waitCursor=True):
            paths = self.logic.exportCase(p.trainingVolume, p.trainingSegmentation, p.outputDirectory,
                                          p.caseName, overwrite=p.overwrite)
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(paths[k]) for k in ("image", "label") if paths[k])

    def onUseTrainingFolder(self) -> None:
        p = self._parameterNode
        if pathOrEmpty(p.outputDirectory):
            p.dataDirectory = p.outputDirectory
            p.labelsDirectory = pathlib.Path(".")  # images/ + labels/ of the folder are paired by the engine

    def onStart(self) -> None:
        self._launch(resume=False)

    def onResume(self) -> None:
        self._launch(resume=True)

    def _launch(self, resume: bool) -> None:
        if not self.logic.ensureTrainingDependencies(
                askUser=True, progress=lambda text: setattr(self.ui.trainingStatusLabel, "text", text)):
            self.ui.trainingStatusLabel.text = "Training needs PyTorch and the packages listed above."
            return
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            self.logic.startTraining(self._parameterNode, resume=resume)
            self.ui.logTextEdit.setPlainText(" ".join(self.logic.monitor.argv))
            self.logic.showChart()
            self._timer.start()
        self._updateButtons()

    def onStop(self) -> None:
        # A second press ends a run that does not get to the end of its step (no checkpoint then).
        force = self.logic.isStopping()
        self.logic.stopTraining(force=force)
        if force:
            self.onPoll()
        else:
            self.ui.trainingStatusLabel.text = STOPPING_TEXT

    def onExportModel(self) -> None:
        """Export the run folder's last checkpoint in a separate process; the timer follows it like a run."""
        runDir = pathOrEmpty(self._parameterNode.runDirectory)
        package = self.logic.exportPath(runDir)
        overwrite = package.exists()
        if overwrite and not slicer.util.confirmYesNoDisplay(
                f"{package} exists. Replace it with an export of the run's last checkpoint?",
                windowTitle="Export model"):
            self.ui.trainingStatusLabel.text = f"Not exported: {package} was kept."
            return
        if not self.logic.ensureTrainingDependencies(
                askUser=True, progress=lambda text: setattr(self.ui.trainingStatusLabel, "text", text)):
            self.ui.trainingStatusLabel.text = "Exporting needs PyTorch and the packages listed above."
            return
        with slicer.util.tryWithErrorDisplay("Could not export the model.", waitCursor=True):
            self.logic.startExport(runDir, overwrite=overwrite)
            self.ui.trainingStatusLabel.text = self.logic.exportStatus()
            self._timer.start()
        self._updateButtons()

    def onOpenRunFolder(self) -> None:
        import qt

        runDir = pathOrEmpty(self._parameterNode.runDirectory)
        if runDir:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(runDir))

    def onPoll(self) -> None:
        try:
            self.logic.poll()
        except Exception as exc:  # never let a timer callback raise repeatedly
            logging.exception("Polling the training process failed")
            self._timer.stop()
            self.ui.trainingStatusLabel.text = f"Polling failed: {exc}"
            return
        st = self.logic.monitor.state
        exporting = self.logic.monitor.settings.export_only
        if exporting:
            self.ui.trainingStatusLabel.text = self.logic.exportStatus()
        else:
            self.ui.trainingStatusLabel.text = (STOPPING_TEXT + " " if self.logic.isStopping() else "") + st.summary()
            self.ui.trainingProgressBar.maximum = max(1, st.total_steps)
            self.ui.trainingProgressBar.value = st.step
        self.ui.logTextEdit.setPlainText("\n".join(list(st.log_lines)[-30:]))
        if not self.logic.isRunning():
            self._timer.stop()
            if st.status == "failed":
                slicer.util.errorDisplay(st.error, windowTitle="Export failed" if exporting else "Training failed")
            elif st.status == "finished" and self.logic.registeredModel:
                if not exporting:  # (the export's status line names it already)
                    self.ui.trainingStatusLabel.text += f"; model registered: {self.logic.registeredModel['path']}"
                self._offerModelToViewer(self.logic.registeredModel["path"])
        self._updateButtons()

    @staticmethod
    def _offerModelToViewer(path: str) -> None:
        """Select the new model in the AnatomicalEmbedding module if it has none yet (the registry lists it too)."""
        try:
            import AnatomicalEmbedding

            viewerParameters = AnatomicalEmbedding.AnatomicalEmbeddingLogic().getParameterNode()
            if not pathOrEmpty(viewerParameters.modelPath):
                viewerParameters.modelPath = pathlib.Path(path)
        except Exception as exc:  # the viewer module is optional here
            logging.info("Could not select the new model in the AnatomicalEmbedding module: %s", exc)


#
# Test (runs inside Slicer; the engine's own tests are the pytest suite under Testing/)
#
class AnatomicalEmbeddingTrainerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DefaultsReadWithoutTorch()
        self.setUp()
        self.test_ExportCase()
        self.setUp()
        self.test_TrainFromScene()
        self.setUp()
        self.test_StopAndResume()
        self.setUp()
        self.test_ExportModel()

    def test_DefaultsReadWithoutTorch(self):
        """The panel's torch-free defaults (read from the engine's source) equal the imported dataclasses'."""
        from AnatomicalEmbeddingTrainerLib import settings

        if not settings.torchAvailable():
            self.delayDisplay("PyTorch absent: the panel uses the source-read defaults (nothing to compare)")
            return
        for method in settings.availableMethods():
            imported = settings.methodConfigDefaults(method)
            parsed = settings.dataclassDefaultsFromSource(*settings.methodTarget(method))
            self.assertEqual({k: imported[k] for k in parsed}, parsed, method)
        self.delayDisplay("Test passed")

    def test_ExportCase(self):
        """A scene volume and segmentation land in the training folder with the same voxels, geometry and names."""
        import tempfile

        import numpy as np

        from anatomical_embedding import io, mrml
        from anatomical_embedding.io.labelmaps import read_labelmap

        self.delayDisplay("Exporting a case")
        rng = np.random.default_rng(0)
        direction = np.array([[0.0, -1.0, 0.0], [0.8, 0.0, -0.6], [0.6, 0.0, 0.8]])
        image = io.Volume(rng.integers(-100, 100, (8, 10, 12)).astype(np.int16), [0.8, 1.1, 2.5], [5, -3, 40], direction)
        labels = np.zeros(image.array.shape, np.uint8)
        labels[2:5, 3:7, 4:10] = 1
        labels[5:8, 0:3, 0:5] = 2
        volumeNode = mrml.volume_to_node(image, slicer.mrmlScene, "scan")
        segmentationNode = mrml.labelmap_to_segmentation_node(image.with_array(labels), {1: "liver", 2: "spleen"},
                                                              slicer.mrmlScene, "organs")

        folder = pathlib.Path(tempfile.mkdtemp(prefix="AnatomicalEmbeddingTrainerTest-", dir=slicer.app.temporaryPath))
        logic = AnatomicalEmbeddingTrainerLogic()
        paths = logic.exportCase(volumeNode, segmentationNode, folder, "case_001")

        written = io.read_image(paths["image"])
        np.testing.assert_array_equal(written.array, image.array)
        self.assertTrue(written.same_geometry(image, atol=1e-4))
        label, names = read_labelmap(paths["label"])
        np.testing.assert_array_equal(label.array, labels)
        self.assertEqual(names, {1: "liver", 2: "spleen"})
        self.assertEqual(paths["image"].name, paths["label"].name)  # the engine pairs images and labels by name
        with self.assertRaises(FileExistsError):
            logic.exportCase(volumeNode, segmentationNode, folder, "case_001")
        # Any file of the case refuses the export before anything is written (a new image beside an old label).
        paths["image"].unlink()
        with self.assertRaises(FileExistsError):
            logic.exportCase(volumeNode, None, folder, "case_001")
        self.assertFalse(paths["image"].exists())
        self.delayDisplay("Test passed")

    def test_TrainFromScene(self):
        """Phantoms exported from the scene train for a few steps in a subprocess; progress reaches the table,
        the chart has a series per loss term, and the exported package is registered."""
        import tempfile

        from AnatomicalEmbeddingTrainerLib import settings

        if not settings.torchAvailable():  # training needs PyTorch, which the module installs only when asked
            self.delayDisplay("PyTorch absent: training from the scene is not tested (install it from the module)")
            return
        from anatomical_embedding import io, mrml, phantoms
        from anatomical_embedding.inference import registry as model_registry

        self.delayDisplay("Training a tiny AEFM on phantoms from the scene")
        root = pathlib.Path(tempfile.mkdtemp(prefix="AnatomicalEmbeddingTrainerTest-", dir=slicer.app.temporaryPath))
        # workers=1: a process pool would start sys.executable, which is Slicer's launcher here.
        cohort = phantoms.load_cohort(phantoms.generate_cohort(root / "cohort", 3, seed=1, spacing=8.0, size=40,
                                                               workers=1))
        logic = AnatomicalEmbeddingTrainerLogic(registryPath=root / "models.json")
        for n, subject in enumerate(cohort.subjects):
            node = mrml.volume_to_node(io.read_image(subject.image_path), slicer.mrmlScene, subject.id)
            logic.exportCase(node, None, root / "training", f"case_{n:03d}")
        p = self._tinyAefmRun(logic, root / "training", root / "run", maxSteps=4, export=True)
        logic.startTraining(p)
        self._pollToEnd(logic, 300)
        state = logic.monitor.state
        self.assertEqual(state.status, "finished", state.error)
        table = logic.getTableNode()
        self.assertEqual(table.GetNumberOfRows(), 2)  # steps 2 and 4
        self.assertEqual(table.GetTable().GetValue(1, 0).ToDouble(), 4.0)
        chart = slicer.mrmlScene.GetFirstNodeByName(CHART_NAME)
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), table.GetNumberOfColumns() - 1)
        models = model_registry.list_models(root / "models.json")
        self.assertEqual([m["path"] for m in models], [str(logic.exportPath(root / "run").resolve())])
        self.delayDisplay("Test passed")

    @staticmethod
    def _tinyAefmRun(logic, data, run, maxSteps: int, export: bool, train: str = "num_workers = 0\n"):
        """The parameter node of a tiny AEFM run on CPU (``train``: more [train] settings)."""
        p = logic.getParameterNode()
        logic.setMethod(p, "aefm")
        p.dataDirectory, p.runDirectory = data, run
        p.device, p.batchSize, p.maxSteps, p.patchSize, p.exportModel = "cpu", 2, maxSteps, "32,32,32", export
        p.advancedSettings = ("[train]\nlog_every = 2\ntensorboard = false\n" + train
                              + "[method]\nwidths = [8, 16, 32, 64]\nfeature_dim = 8\nspacing = [8.0, 8.0, 8.0]\n"
                              "n_pos = 50\nn_neg = 512\nepochs_region = 0\n")
        return p

    def test_StopAndResume(self):
        """Stop once progress arrives, with a DataLoader worker process (the engine's default has two): a checkpoint,
        status "stopped" (not a crashed worker); a second start on the run folder meanwhile is refused; Resume
        continues to the end with one curve, and a scene closed during it gets no table or chart back."""
        if not self._torchOrSay("stop and resume are not tested"):
            return
        self.delayDisplay("Stopping and resuming a tiny AEFM run")
        root, logic = self._cohortAndLogic(seed=2)
        p = self._tinyAefmRun(logic, root / "cohort", root / "run", maxSteps=40, export=False,
                              train="num_workers = 1\nckpt_every = 1000\n")
        logic.startTraining(p)
        try:
            self._pollUntilDone(logic, 300, untilProgress=True)
            # The training process holds the run folder: a second start (another Slicer, a shell) is refused.
            from anatomical_embedding.training.runlock import RunFolderBusy

            with self.assertRaises(RunFolderBusy):
                AnatomicalEmbeddingTrainerLogic(registryPath=root / "models.json").startTraining(p, resume=True)
            logic.stopTraining()
            self._pollUntilDone(logic, 120)
        finally:
            logic.monitor.close()
        state = logic.monitor.state
        self.assertEqual(state.status, "stopped", state.error)
        self.assertTrue((root / "run" / "checkpoints" / "last.pt").is_file())
        stoppedAt = state.step

        p.maxSeconds = 0.0
        logic.startTraining(p, resume=True)
        try:
            slicer.mrmlScene.Clear(0)  # File > Close Scene while it trains
            self._pollUntilDone(logic, 600)
        finally:
            logic.monitor.close()
        state = logic.monitor.state
        self.assertEqual(state.status, "finished", state.error)
        self.assertEqual(state.start_step, stoppedAt)
        steps = [h["step"] for h in state.history]
        self.assertEqual(steps, sorted(set(steps)))
        # The polls after the close put no table or chart into the new scene; an ended run is not brought back.
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName(TABLE_NAME))
        self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName(CHART_NAME))
        self.assertFalse(logic.reattachLiveView())
        logic.attachLiveView()  # what Start/Resume do: the whole curve, both parts of the run
        self.assertEqual(logic.getTableNode().GetNumberOfRows(), len(steps))
        self.delayDisplay("Test passed")

    def test_ExportModel(self):
        """What the Export model button does for a run trained without "export when finished": the button is enabled,
        the export runs in a separate process, its package verifies and is registered, and a second export refuses
        to replace it (the widget asks first)."""
        if not self._torchOrSay("exporting a run is not tested"):
            return
        from anatomical_embedding.inference import registry as model_registry
        from anatomical_embedding.inference.backends import read_package

        self.delayDisplay("Exporting a tiny AEFM run trained without export")
        root, logic = self._cohortAndLogic(seed=3)
        p = self._tinyAefmRun(logic, root / "cohort", root / "run", maxSteps=2, export=False)
        logic.startTraining(p)
        self._pollToEnd(logic, 300)
        self.assertEqual(logic.monitor.state.status, "finished", logic.monitor.state.error)
        package = logic.exportPath(root / "run")
        self.assertFalse(package.exists())
        self.assertIsNone(logic.actionProblems(p)["export"])  # the button is enabled

        logic.startExport(root / "run")
        self._pollToEnd(logic, 300)
        state = logic.monitor.state
        self.assertEqual(state.status, "finished", state.error)
        self.assertEqual(read_package(package)[0]["method"], "aefm")  # verifies its hashes and sidecar
        models = model_registry.list_models(root / "models.json")
        self.assertEqual([m["path"] for m in models], [str(package.resolve())])
        with self.assertRaises(FileExistsError):
            logic.startExport(root / "run")
        self.delayDisplay("Test passed")

    def _torchOrSay(self, what: str) -> bool:
        """PyTorch is importable; otherwise say what is not tested (the module offers to install it)."""
        from AnatomicalEmbeddingTrainerLib import settings

        if settings.torchAvailable():
            return True
        self.delayDisplay(f"PyTorch absent: {what} (install it from the module)")
        return False

    @staticmethod
    def _cohortAndLogic(seed: int):
        """(a new temporary folder holding a 3-case phantom cohort in cohort/, a logic with its own registry)."""
        import tempfile

        from anatomical_embedding import phantoms

        root = pathlib.Path(tempfile.mkdtemp(prefix="AnatomicalEmbeddingTrainerTest-", dir=slicer.app.temporaryPath))
        phantoms.generate_cohort(root / "cohort", 3, seed=seed, spacing=8.0, size=40, workers=1)
        return root, AnatomicalEmbeddingTrainerLogic(registryPath=root / "models.json")

    @classmethod
    def _pollToEnd(cls, logic, timeoutSeconds: float) -> None:
        """Poll until the process ends, then close the monitor whatever happened (a run past the deadline must not
        outlive the test)."""
        try:
            cls._pollUntilDone(logic, timeoutSeconds)
        finally:
            logic.monitor.close()

    @staticmethod
    def _pollUntilDone(logic, timeoutSeconds: float, untilProgress: bool = False) -> None:
        """What the widget's timer does: poll while the run goes on (or until its first progress line)."""
        import time

        deadline = time.time() + timeoutSeconds
        while logic.isRunning() and time.time() < deadline:
            if untilProgress and logic.monitor.state.history:
                return
            slicer.app.processEvents()
            logic.poll()
            time.sleep(0.2)
        logic.poll()
