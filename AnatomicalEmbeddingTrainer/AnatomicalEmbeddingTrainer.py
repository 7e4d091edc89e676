"""AnatomicalEmbeddingTrainer: prepare training data, then start, watch, stop, resume and export training runs.

Training runs outside the Slicer process (``train.py`` in this folder, through
``anatomical_embedding.training.monitor``: one process, or torchrun for several), so Slicer never blocks.
A ``qt.QTimer`` calls ``AnatomicalEmbeddingTrainerLogic.poll()`` twice a second; it reads the lines the
process appended to ``RUN_DIR/console.log``, parses the engine's JSON progress lines, and rewrites a
``vtkMRMLTableNode`` (one row per logged step, one column per loss term) that a ``vtkMRMLPlotChartNode``
with one ``vtkMRMLPlotSeriesNode`` per term draws as loss curves. When training finishes, ``train.py
--export`` writes ``RUN_DIR/<run name>.aemodel`` and the logic registers it in
``anatomical_embedding.inference.registry`` so the AnatomicalEmbedding module lists it.

Training data: a folder of images (or the folder this module fills from the scene: each exported case is
an image in ``<folder>/images`` and, with a segmentation, a label map of the same name in
``<folder>/labels``), the layout that ``anatomical_embedding.data.datasets.DatasetSpec.from_path`` reads.
"""
import logging
import pathlib
import re
import shutil
import sys
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ["auto", "cpu", "cuda"]
TABLE_NAME = "AnatomicalEmbedding training losses"
CHART_NAME = "AnatomicalEmbedding training"
#: The method is not a parameterNodeWrapper field: the registered methods are only known at run time, while a
#: Choice needs a fixed list. It is kept as a plain parameter of the same parameter node.
METHOD_PARAMETER = "Method"
#: Parameter-node field -> engine setting, for the key hyperparameters shown in the GUI.
FINETUNE_MODES = ["embedding", "backbone", "scratch"]
TRAIN_FIELDS = {"batchSize": "batch_size", "learningRate": "lr", "epochs": "epochs", "maxSteps": "max_steps"}
POLL_INTERVAL_MS = 500


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
exported and listed by the AnatomicalEmbedding module.
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
    patchSize: str = "96,96,96"
    advancedSettings: str = ""
    exportModel: bool = True
    initFromDirectory: pathlib.Path
    finetuneMode: Annotated[str, Choice(FINETUNE_MODES)] = "embedding"


def _pathOrEmpty(value) -> str:
    """A pathlib.Path field that was never set reads as "."; treat it as empty."""
    text = str(value) if value is not None else ""
    return "" if text in ("", ".") else text


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

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        try:
            methods = self.logic.availableMethods()
        except Exception as exc:  # engine missing or broken: say so instead of an empty combo box
            methods = []
            self.ui.trainingStatusLabel.text = f"Training engine not available: {exc}"
        for name in methods:
            self.ui.methodComboBox.addItem(name)
        self.ui.methodComboBox.connect("currentTextChanged(QString)", self.onMethodChanged)

        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)
        self.ui.useTrainingFolderButton.connect("clicked(bool)", self.onUseTrainingFolder)
        self.ui.resetDefaultsButton.connect("clicked(bool)", self.onResetDefaults)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.openRunFolderButton.connect("clicked(bool)", self.onOpenRunFolder)

        self.initializeParameterNode()
        self._updateButtons()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        if self.logic:
            self.logic.stopTraining()  # graceful: the run saves a checkpoint and can be resumed

    def enter(self) -> None:
        self.initializeParameterNode()

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
        elif not _pathOrEmpty(p.outputDirectory):
            problem = "Choose the training folder."
        elif not AnatomicalEmbeddingTrainerLogic.isValidCaseName(p.caseName):
            problem = "Case name may hold letters, digits, '-', '_' and '.' only."
        self.ui.exportCaseButton.enabled = problem is None
        self.ui.exportCaseButton.toolTip = problem or "Write the volume (and segmentation) into the training folder."
        self._updateButtons()

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = bool(self.logic and self.logic.isRunning())
        runDir = _pathOrEmpty(p.runDirectory) if p else ""
        self.ui.startButton.enabled = bool(p) and not running and self.ui.methodComboBox.count > 0
        self.ui.stopButton.enabled = running
        self.ui.resumeButton.enabled = bool(runDir) and not running and \
            (pathlib.Path(runDir) / "checkpoints" / "last.pt").is_file()
        self.ui.openRunFolderButton.enabled = bool(runDir) and pathlib.Path(runDir).is_dir()

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
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(v) for v in paths.values() if v)

    def onUseTrainingFolder(self) -> None:
        p = self._parameterNode
        if _pathOrEmpty(p.outputDirectory):
            p.dataDirectory = p.outputDirectory
            p.labelsDirectory = pathlib.Path(".")  # images/ + labels/ of the folder are paired by the engine

    def onStart(self) -> None:
        self._launch(resume=False)

    def onResume(self) -> None:
        self._launch(resume=True)

    def _launch(self, resume: bool) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            self.logic.startTraining(self._parameterNode, resume=resume)
            self.ui.logTextEdit.setPlainText(" ".join(self.logic.monitor.argv))
            self.logic.showChart()
            self._timer.start()
        self._updateButtons()

    def onStop(self) -> None:
        self.logic.stopTraining()
        self.ui.trainingStatusLabel.text = "Stopping: finishing the current step and saving a checkpoint..."

    def onOpenRunFolder(self) -> None:
        import qt

        runDir = _pathOrEmpty(self._parameterNode.runDirectory)
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
        self.ui.trainingStatusLabel.text = st.summary()
        self.ui.trainingProgressBar.maximum = max(1, st.total_steps)
        self.ui.trainingProgressBar.value = st.step
        self.ui.logTextEdit.setPlainText("\n".join(list(st.log_lines)[-30:]))
        if not self.logic.isRunning():
            self._timer.stop()
            if st.status == "failed":
                slicer.util.errorDisplay(st.error, windowTitle="Training failed")
            elif st.status == "finished" and self.logic.registeredModel:
                self.ui.trainingStatusLabel.text += f"; model registered: {self.logic.registeredModel['path']}"
                self._offerModelToViewer(self.logic.registeredModel["path"])
        self._updateButtons()

    @staticmethod
    def _offerModelToViewer(path: str) -> None:
        """Select the new model in the AnatomicalEmbedding module if it has none yet (the registry lists it too)."""
        try:
            import AnatomicalEmbedding

            viewerParameters = AnatomicalEmbedding.AnatomicalEmbeddingLogic().getParameterNode()
            if not _pathOrEmpty(viewerParameters.modelPath):
                viewerParameters.modelPath = pathlib.Path(path)
        except Exception as exc:  # the viewer module is optional here
            logging.info("Could not select the new model in the AnatomicalEmbedding module: %s", exc)


#
# Logic
#
class AnatomicalEmbeddingTrainerLogic(ScriptedLoadableModuleLogic):
    """Scene export, command line, process control and the MRML live view (no Qt: tested headless)."""

    def __init__(self, registryPath=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.monitor = None
        self.registeredModel = None
        self.registryPath = registryPath  # None: anatomical_embedding.inference.registry's default location

    def getParameterNode(self):
        return AnatomicalEmbeddingTrainerParameterNode(super().getParameterNode())

    # ---- settings --------------------------------------------------------------------------------
    @staticmethod
    def availableMethods() -> list:
        """Pretraining methods, then the finetune task (segmentation from a pretrained run)."""
        from anatomical_embedding.methods import available_methods, available_tasks

        return available_methods() + available_tasks()

    @staticmethod
    def getMethod(p) -> str:
        node = getattr(p, "parameterNode", None)
        if node is not None:
            return node.GetParameter(METHOD_PARAMETER) or ""
        return getattr(p, "method", "")  # plain objects (scripts, tests)

    @staticmethod
    def setMethod(p, method: str) -> None:
        node = getattr(p, "parameterNode", None)
        if node is not None:
            node.SetParameter(METHOD_PARAMETER, method)
        else:
            p.method = method

    @staticmethod
    def defaultHyperparameters(method: str) -> dict:
        """The key hyperparameters' defaults (paper values) from the engine and the method's Config dataclass."""
        from dataclasses import fields

        from anatomical_embedding.methods import get_method
        from anatomical_embedding.training.config import TrainConfig

        train = {f.name: f.default for f in fields(TrainConfig)}
        if method == "finetune":  # the finetune command's recipe (Adam, lr 1e-4), not the pretraining defaults
            import tomllib

            from anatomical_embedding.training.finetune_config import FINETUNE_TRAIN_DEFAULTS

            for item in FINETUNE_TRAIN_DEFAULTS:
                key, value = item.split("=", 1)
                train[key.split(".", 1)[1]] = tomllib.loads(f"v = {value}")["v"]
        out = {field: train[key] for field, key in TRAIN_FIELDS.items()}
        methodDefaults = {f.name: f.default for f in fields(get_method(method).Config)}
        patch = methodDefaults.get("patch_size")
        out["patchSize"] = ",".join(str(int(v)) for v in patch) if patch is not None else ""
        return out

    def applyDefaults(self, p, method: str, trainSettings: bool = True) -> None:
        """Fill the key hyperparameters with the defaults (only the method's ones when ``trainSettings`` is off)."""
        defaults = self.defaultHyperparameters(method)
        for name, value in defaults.items():
            if trainSettings or name == "patchSize":
                setattr(p, name, value)

    def overrides(self, p, method: str) -> list:
        """``--set`` items for the key hyperparameters of the GUI (advanced settings come after them)."""
        from anatomical_embedding.methods import get_method

        items = [f"train.{key}={getattr(p, field)!r}" for field, key in TRAIN_FIELDS.items()]
        items += [f'train.device="{p.device}"', "train.progress_bar=false"]  # the GUI shows progress itself
        patch = (p.patchSize or "").strip()
        if patch and method and "patch_size" in {f.name for f in _fields(get_method(method).Config)}:
            values = [v.strip() for v in patch.replace("x", ",").split(",") if v.strip()]
            if not all(v.isdigit() for v in values):
                raise ValueError(f"patch size {patch!r}: give whole voxel counts like 96,96,96")
            items.append(f"method.patch_size=[{','.join(values)}]")
        if method == "finetune":
            items.append(f'method.mode="{p.finetuneMode}"')
            initFrom = _pathOrEmpty(p.initFromDirectory)
            if initFrom:
                items.append(f"method.init_from='{pathlib.Path(initFrom).resolve()}'")
        return items

    @staticmethod
    def exportPath(runDir) -> pathlib.Path:
        runDir = pathlib.Path(runDir)
        return runDir / f"{runDir.name}.aemodel"

    @staticmethod
    def pythonExecutable() -> str:
        # Inside Slicer the child must run Slicer's own Python (same packages): PythonSlicer, a launcher that sets
        # up its environment. Outside Slicer (tests, scripts) this interpreter.
        home = getattr(getattr(slicer, "app", None), "slicerHome", None)
        if home:
            for name in ("PythonSlicer.exe", "PythonSlicer"):
                candidate = pathlib.Path(home) / "bin" / name
                if candidate.is_file():
                    return str(candidate)
        return shutil.which("PythonSlicer") or sys.executable

    def trainSettings(self, p, resume: bool = False):
        """The :class:`TrainSettings` for the parameter node's choices."""
        from anatomical_embedding.training.monitor import TrainSettings

        method = self.getMethod(p)
        runDir = _pathOrEmpty(p.runDirectory)
        data = _pathOrEmpty(p.dataDirectory)
        if not runDir:
            raise ValueError("Choose the run (output) folder.")
        if not data:
            raise ValueError("Choose the data folder (images, or the training folder exported from the scene).")
        if not resume and not method:
            raise ValueError("Choose a method.")
        overrides = self.overrides(p, method) if not resume else [f'train.device="{p.device}"']
        return TrainSettings(
            out=runDir, data=data, labels=_pathOrEmpty(p.labelsDirectory), method=method if not resume else "",
            overrides=overrides, advanced=p.advancedSettings if not resume else "", resume=resume,
            # A finetune run is a segmenter, not an embedding package: it is applied with `segment`.
            export=str(self.exportPath(runDir)) if p.exportModel and method != "finetune" else "",
            nproc=int(p.numProcesses),
            gpus=p.gpus.strip(), python=self.pythonExecutable(),
            script=str(pathlib.Path(__file__).resolve().parent / "train.py"))

    def buildCommand(self, p, resume: bool = False) -> list:
        from anatomical_embedding.training.monitor import build_command

        return build_command(self.trainSettings(p, resume))[0]

    # ---- process control -------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.monitor is not None and self.monitor.running

    def startTraining(self, p, resume: bool = False, settings=None):
        """Launch ``train.py`` (never blocks); call :meth:`poll` periodically."""
        from anatomical_embedding.training.monitor import TrainingMonitor, read_history

        if self.isRunning():
            raise RuntimeError("Training is already running; stop it first.")
        settings = settings or self.trainSettings(p, resume)
        if not resume and (pathlib.Path(settings.out) / "checkpoints" / "last.pt").is_file():
            raise FileExistsError(f"{settings.out} already holds a run: resume it or choose a new run folder.")
        monitor = TrainingMonitor(settings)
        if resume:
            monitor.state = read_history(settings.out)  # keep the curves of the earlier part
        self.registeredModel = None
        monitor.start()
        self.monitor = monitor
        self.updateTable()
        return monitor

    def stopTraining(self) -> None:
        if self.isRunning():
            self.monitor.stop()

    def poll(self) -> list:
        """Read new progress, update the table/plot; register the package once training has finished."""
        if self.monitor is None:
            return []
        wasRunning = self.monitor.running
        events = self.monitor.poll()
        if events or (wasRunning and not self.monitor.running):
            self.updateTable()
        if wasRunning and not self.monitor.running:
            self._onFinished()
        return events

    def _onFinished(self) -> None:
        st = self.monitor.state
        if st.status == "finished" and st.exported:
            from anatomical_embedding.inference import registry as model_registry

            package = pathlib.Path(st.exported)
            if not package.is_absolute():
                package = self.monitor.run_dir / package
            self.registeredModel = model_registry.register_model(
                package, name=self.monitor.run_dir.name, run_dir=self.monitor.run_dir, path=self.registryPath)
            logging.info("Registered model %s", package)
        elif st.status == "failed":
            logging.error("%s", st.error)

    # ---- live view (MRML) ------------------------------------------------------------------------
    def getTableNode(self, scene=None):
        scene = scene or slicer.mrmlScene
        node = scene.GetFirstNodeByName(TABLE_NAME)
        if node is None or not node.IsA("vtkMRMLTableNode"):
            node = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
        return node

    def updateTable(self, scene=None, history=None):
        """Rewrite the loss table (column "step", "loss" and one per term) and the chart's series."""
        history = self.monitor.state.history if history is None else history
        tableNode = self.getTableNode(scene)
        columns = ["step", "loss"]
        for rec in history:
            columns += [k for k in rec if k not in columns and k != "epoch"]
        table = vtk.vtkTable()
        for name in columns:
            arr = vtk.vtkDoubleArray()
            arr.SetName(name)
            arr.SetNumberOfTuples(len(history))
            for row, rec in enumerate(history):
                arr.SetValue(row, float(rec.get(name, float("nan"))))  # a term logged only later: NaN before
            table.AddColumn(arr)
        tableNode.SetAndObserveTable(table)
        self.updateChart(tableNode, columns[1:], scene)
        return tableNode

    def updateChart(self, tableNode, terms: list, scene=None):
        scene = scene or slicer.mrmlScene
        chart = scene.GetFirstNodeByName(CHART_NAME)
        if chart is None or not chart.IsA("vtkMRMLPlotChartNode"):
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", CHART_NAME)
            chart.SetTitle("Training loss")
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss")
        have = {}
        for i in range(chart.GetNumberOfPlotSeriesNodes()):
            series = chart.GetNthPlotSeriesNode(i)
            if series is not None:
                have[series.GetYColumnName()] = series
        colors = [(0.1, 0.1, 0.1), (0.85, 0.2, 0.2), (0.2, 0.45, 0.85), (0.2, 0.65, 0.3), (0.8, 0.5, 0.1),
                  (0.55, 0.3, 0.7)]
        for n, term in enumerate(terms):
            series = have.get(term)
            if series is None:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{CHART_NAME} {term}")
                series.SetXColumnName("step")
                series.SetYColumnName(term)
                series.SetPlotType(series.PlotTypeScatter)  # scatter with lines: x values are steps
                series.SetMarkerStyle(series.MarkerStyleNone)
                series.SetColor(*colors[n % len(colors)])
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            series.SetAndObserveTableNodeID(tableNode.GetID())
        return chart

    def showChart(self) -> None:
        """Show the loss chart in the layout (Slicer application only)."""
        chart = slicer.mrmlScene.GetFirstNodeByName(CHART_NAME)
        if chart is None:
            chart = self.updateChart(self.getTableNode(), ["loss"])
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    # ---- training data from the scene -----------------------------------------------------------
    @staticmethod
    def isValidCaseName(name: str) -> bool:
        return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""))

    def exportCase(self, volumeNode, segmentationNode, outputDirectory, caseName: str,
                   overwrite: bool = False) -> dict:
        """Write ``images/<case>.nii.gz`` and, with a segmentation, ``labels/<case>.nii.gz`` (+ names).

        The label map is rasterised on the volume's grid, segments numbered 1..n in segment order.
        Returns ``{"image": path, "label": path or None, "names": {value: name}}``.
        """
        from anatomical_embedding import io, mrml
        from anatomical_embedding.io.labelmaps import write_labelmap

        if volumeNode is None:
            raise ValueError("no volume selected")
        if not self.isValidCaseName(caseName):
            raise ValueError(f"invalid case name {caseName!r}: use letters, digits, '-', '_' and '.'")
        folder = pathlib.Path(outputDirectory)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        image = mrml.node_to_volume(volumeNode)
        imagePath = io.write_image(image, folder / "images" / f"{caseName}.nii.gz", overwrite=overwrite)
        labelPath, names = None, {}
        if segmentationNode is not None:
            (folder / "labels").mkdir(parents=True, exist_ok=True)
            label, names = mrml.segmentation_node_to_labelmap(segmentationNode, image)
            labelPath = write_labelmap(label, names, folder / "labels" / f"{caseName}.nii.gz", overwrite=overwrite)
        logging.info("Exported %s to %s", caseName, folder)
        return {"image": imagePath, "label": labelPath, "names": names}


def _fields(cls):
    from dataclasses import fields

    return fields(cls)


#
# Test (runs inside Slicer; the engine's own tests are the pytest suite under Testing/)
#
class AnatomicalEmbeddingTrainerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExportCase()
        self.setUp()
        self.test_TrainFromScene()

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
        self.delayDisplay("Test passed")

    def test_TrainFromScene(self):
        """Phantoms exported from the scene train for a few steps in a subprocess; progress reaches the table,
        the chart has a series per loss term, and the exported package is registered."""
        import tempfile
        import time

        from anatomical_embedding import io, model_registry, mrml, phantoms

        self.delayDisplay("Training a tiny AEFM on phantoms from the scene")
        root = pathlib.Path(tempfile.mkdtemp(prefix="AnatomicalEmbeddingTrainerTest-", dir=slicer.app.temporaryPath))
        cohort = phantoms.load_cohort(phantoms.generate_cohort(root / "cohort", 3, seed=1, spacing=8.0, size=40))
        logic = AnatomicalEmbeddingTrainerLogic(registryPath=root / "models.json")
        for n, subject in enumerate(cohort.subjects):
            node = mrml.volume_to_node(io.read_image(subject.image_path), slicer.mrmlScene, subject.id)
            logic.exportCase(node, None, root / "training", f"case_{n:03d}")
        p = logic.getParameterNode()
        logic.setMethod(p, "aefm")
        p.dataDirectory = root / "training"
        p.runDirectory = root / "run"
        p.device, p.batchSize, p.maxSteps, p.patchSize, p.exportModel = "cpu", 2, 4, "32,32,32", True
        p.advancedSettings = ("[train]\nlog_every = 2\nnum_workers = 0\ntensorboard = false\n"
                              "[method]\nwidths = [8, 16, 32, 64]\nfeature_dim = 8\nspacing = [8.0, 8.0, 8.0]\n"
                              "n_pos = 50\nn_neg = 512\nepochs_region = 0\n")
        logic.startTraining(p)
        deadline = time.time() + 300
        while logic.isRunning() and time.time() < deadline:
            slicer.app.processEvents()
            logic.poll()
            time.sleep(0.2)
        logic.poll()
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
