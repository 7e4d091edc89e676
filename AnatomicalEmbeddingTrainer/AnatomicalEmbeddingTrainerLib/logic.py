"""The Trainer module's logic: settings, the training process and its live view, model and scene export (no Qt)."""
import logging
import pathlib
from typing import Optional

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from AnatomicalEmbeddingTrainerLib import export, liveview, settings


class AnatomicalEmbeddingTrainerLogic(ScriptedLoadableModuleLogic):
    """Scene export, command line, process control and the MRML live view (no Qt: tested headless)."""

    #: The module's ``@parameterNodeWrapper`` class. AnatomicalEmbeddingTrainer.py sets it: the wrapper is declared
    #: with the GUI it binds, and this file must not import the module file (that would be a cycle).
    parameterNodeClass: Optional[type] = None

    def __init__(self, registryPath=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.monitor = None
        self.registeredModel = None
        self.registryPath = registryPath  # None: anatomical_embedding.inference.registry's default location
        # The scene that shows the run's loss table and chart (None: detached, polls leave every scene alone).
        self._liveScene = None
        self._liveSceneObserver = None

    def getParameterNode(self):
        if self.parameterNodeClass is None:
            raise RuntimeError("import the AnatomicalEmbeddingTrainer module first: it declares the parameter node")
        return self.parameterNodeClass(super().getParameterNode())

    # ---- settings (AnatomicalEmbeddingTrainerLib.settings) ---------------------------------------
    availableMethods = staticmethod(settings.availableMethods)
    getMethod = staticmethod(settings.getMethod)
    setMethod = staticmethod(settings.setMethod)
    defaultHyperparameters = staticmethod(settings.defaultHyperparameters)
    exportPath = staticmethod(settings.exportPath)
    pythonExecutable = staticmethod(settings.pythonExecutable)
    torchAvailable = staticmethod(settings.torchAvailable)

    #: Requirements of a training run besides PyTorch (PyTorch comes from the PyTorch extension).
    REQUIREMENTS = pathlib.Path(__file__).resolve().parents[1] / "Resources" / "Requirements" / "training.txt"

    def missingTrainingPackages(self) -> list:
        """pip requirements of Resources/Requirements/training.txt that cannot be imported, plus "torch"."""
        from AnatomicalEmbeddingLib import dependencies

        missing = dependencies.missingRequirements(self.REQUIREMENTS)
        return missing + ([] if self.torchAvailable() else ["torch"])

    def ensureTrainingDependencies(self, askUser: bool = True, progress=None) -> bool:
        """PyTorch, MONAI, onnx ...: one prompt, installed in Slicer's Python; errors are shown, never raised.

        (The viewer module's ``AnatomicalEmbeddingLib.dependencies`` does the prompting and installing; both modules
        are installed in the same folder.)"""
        from AnatomicalEmbeddingLib import dependencies

        missing = [r for r in self.missingTrainingPackages() if r != "torch"]
        needTorch = not self.torchAvailable()
        if not missing and not needTorch:
            return True
        if not askUser:
            return False
        return dependencies.install(missing, needTorch, requester="AnatomicalEmbeddingTrainer", progress=progress) \
            and not self.missingTrainingPackages()

    def applyDefaults(self, p, method: str, trainSettings: bool = True) -> None:
        """Fill the key hyperparameters with the defaults (only the method's ones when ``trainSettings`` is off)."""
        defaults = self.defaultHyperparameters(method)
        for name, value in defaults.items():
            if trainSettings or name == "patchSize":
                setattr(p, name, value)

    def overrides(self, p, method: str) -> list:
        """``--set`` items for the key hyperparameters of the GUI (advanced settings come after them)."""
        return settings.overrides(p, method)

    def trainSettings(self, p, resume: bool = False):
        """The :class:`TrainSettings` for the parameter node's choices."""
        return settings.trainSettings(p, resume)

    def buildCommand(self, p, resume: bool = False) -> list:
        from anatomical_embedding.training.monitor import build_command

        return build_command(self.trainSettings(p, resume))[0]

    # ---- process control -------------------------------------------------------------------------
    def isRunning(self) -> bool:
        return self.monitor is not None and self.monitor.running

    def startTraining(self, p, resume: bool = False, settings=None):
        """Launch ``train.py`` (never blocks); call :meth:`poll` periodically."""
        from anatomical_embedding.training.monitor import TrainingMonitor, read_history
        from anatomical_embedding.training.runlock import check_run_folder_free

        if self.isRunning():
            raise RuntimeError(self._runningMessage())
        settings = settings or self.trainSettings(p, resume)
        # First: a folder that a live process trains (a crashed Slicer's child, a shell) reads as that, not as
        # "already holds a run"; nothing is launched or written.
        check_run_folder_free(settings.out)
        if not resume and (pathlib.Path(settings.out) / "checkpoints" / "last.pt").is_file():
            raise FileExistsError(f"{settings.out} already holds a run: resume it or choose a new run folder.")
        monitor = TrainingMonitor(settings)
        if resume:
            monitor.state = read_history(settings.out)  # keep the curves of the earlier part
        self.registeredModel = None
        monitor.start()
        self.monitor = monitor
        self.attachLiveView()  # a run the user starts is shown in the current scene
        return monitor

    @staticmethod
    def runFolderBusyMessage(runDir) -> Optional[str]:
        """The busy message when another live process trains ``runDir`` (holds its ``train.lock``), else None.

        Cheap and non-blocking (runlock tries the lock and gives it back at once), so the panel can ask on every
        update. A folder whose lock cannot even be opened (read-only) reads as free: Start and Resume say why."""
        from anatomical_embedding.training.runlock import RunFolderBusy, check_run_folder_free

        try:
            check_run_folder_free(runDir)
        except RunFolderBusy as exc:
            return str(exc)
        except OSError as exc:
            logging.debug("Could not check the lock of %s: %s", runDir, exc)
        return None

    def actionProblems(self, p, methodsAvailable: bool = True) -> dict:
        """Why each run button cannot be pressed now, None where it can: ``{"start", "stop", "resume", "export",
        "openRunFolder"}`` -> message; and ``"busy"``: the message when another process trains the run folder.
        The widget only applies it (enabled, the message as tooltip, the busy message in the status)."""
        runDir = settings.pathOrEmpty(p.runDirectory) if p is not None else ""
        running = self.isRunning()
        # Our own run holds the lock too: "running" says more than the busy message then.
        busy = self.runFolderBusyMessage(runDir) if runDir and not running else None
        notNow = self._runningMessage() or busy
        start = notNow
        if not methodsAvailable:
            start = "The training engine is not available (see the status)."
        elif p is None:
            start = "No module parameters (the scene is being closed)."
        resume = notNow
        if not runDir:
            resume = "Choose the run folder."
        elif not notNow and not settings.hasCheckpoint(runDir):
            resume = f"{runDir} has no checkpoint to resume from."
        stop = None if running else "Nothing is training."
        if self.isExporting():
            stop = "The model export ends by itself."
        return {"start": start, "stop": stop, "resume": resume, "export": self._exportProblem(runDir, busy),
                "openRunFolder": None if runDir and pathlib.Path(runDir).is_dir() else "The run folder does not exist.",
                "busy": busy}

    def _runningMessage(self) -> Optional[str]:
        if self.isExporting():
            return "A model export is running; wait for it to end."
        return "Training is running; stop it first." if self.isRunning() else None

    def _exportProblem(self, runDir: str, busy: Optional[str]) -> Optional[str]:
        """Why the run in ``runDir`` cannot be exported now (``busy``: its busy message), None if it can."""
        running = self._runningMessage()
        if not runDir or running:
            return running or "Choose the run folder."
        if not settings.hasCheckpoint(runDir):
            return f"{runDir} has no checkpoint to export."
        if settings.runMethod(runDir) == "finetune":  # as train.py refuses --export for it
            return ("A finetune run is a segmentation network, not an embedding model package: apply it with "
                    "`anatomical-embedding segment --run RUN_DIR`.")
        return busy

    def exportProblem(self, runDir) -> Optional[str]:
        """Why *Export model* cannot export ``runDir`` now, None if it can: it needs a checkpoint, a pretraining
        method, and nothing training the folder (this logic or another process)."""
        runDir = settings.pathOrEmpty(runDir)
        return self._exportProblem(runDir, self.runFolderBusyMessage(runDir) if runDir else None)

    # ---- export of a run that has a checkpoint (a stopped run, or one trained without "export when finished")
    def isExporting(self) -> bool:
        return self.isRunning() and self.monitor.settings.export_only

    def startExport(self, runDir, overwrite: bool = False):
        """Export ``runDir``'s last checkpoint to :meth:`exportPath` in a subprocess (``train.py --export-only``:
        ONNX export plus the parity check against PyTorch take seconds, so never in Slicer's process); never
        blocks: call :meth:`poll`, which registers the package when it is done, as after a finished run.

        Refuses what :meth:`exportProblem` names (RuntimeError), and an existing package unless ``overwrite``
        (FileExistsError; the widget asks first)."""
        from anatomical_embedding.training.monitor import TrainingMonitor, TrainSettings, read_history

        problem = self.exportProblem(runDir)
        if problem:
            raise RuntimeError(problem)
        package = self.exportPath(runDir)
        if package.exists() and not overwrite:
            raise FileExistsError(f"{package} exists; delete or rename it, or allow replacing it, then export again.")
        monitor = TrainingMonitor(TrainSettings(
            out=str(runDir), export=str(package), export_only=True, overwrite=overwrite,
            python=self.pythonExecutable(), script=str(settings.TRAIN_SCRIPT)))
        monitor.state = read_history(runDir)  # the live view keeps showing the run's curve
        self.registeredModel = None
        monitor.start()
        self.monitor = monitor
        return monitor

    def exportStatus(self) -> str:
        """The status line of the export in progress or just ended."""
        st, package = self.monitor.state, self.monitor.settings.export
        if st.status == "running":
            return f"Exporting {package} (ONNX, checked against PyTorch) ..."
        if st.status == "finished":
            registered = f"; model registered: {self.registeredModel['path']}" if self.registeredModel else ""
            return f"Exported {st.exported}{registered}"
        if st.status == "failed":  # the monitor's message: "export failed (exit code ...): why"
            return st.error[:1].upper() + st.error[1:]
        return "Export stopped; no package was written."

    def isStopping(self) -> bool:
        """A stop was asked for and the process has not ended yet."""
        return self.isRunning() and self.monitor.stop_requested

    def stopTraining(self, force: bool = False) -> None:
        """Ask the run to stop (it finishes the step, saves a checkpoint, exits 130). ``force`` ends it at once,
        without a checkpoint: for a process that does not get to the end of its step (a hung data loader or GPU)."""
        if not self.isRunning():
            return
        if force:
            self.monitor.kill()
            self.poll()  # the outcome ("stopped") and the table at once
        else:
            self.monitor.stop()

    def poll(self) -> list:
        """Read new progress, update the table/plot; register the package once training has finished."""
        if self.monitor is None:
            return []
        wasRunning = self.monitor.running
        events = self.monitor.poll()
        if self._liveScene is not None and (events or (wasRunning and not self.monitor.running)):
            self.updateTable(self._liveScene)
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

    # ---- live view (AnatomicalEmbeddingTrainerLib.liveview) --------------------------------------
    getTableNode = staticmethod(liveview.getTableNode)
    updateChart = staticmethod(liveview.updateChart)
    showChart = staticmethod(liveview.showChart)

    def attachLiveView(self, scene=None) -> None:
        """Show the run in ``scene`` (default: the application's): its loss table and chart, with the whole curve,
        then kept up to date by :meth:`poll` until the scene is closed (or :meth:`detachLiveView`)."""
        scene = scene or slicer.mrmlScene
        if scene is not self._liveScene:
            self.detachLiveView()
            self._liveSceneObserver = scene.AddObserver(scene.StartCloseEvent, self._onSceneStartClose)
            self._liveScene = scene
        if self.monitor is not None:
            self.updateTable(scene)

    def detachLiveView(self) -> None:
        """Stop writing the loss table and chart (the run and its state in :attr:`monitor` go on)."""
        if self._liveScene is not None and self._liveSceneObserver is not None:
            self._liveScene.RemoveObserver(self._liveSceneObserver)
        self._liveScene = self._liveSceneObserver = None

    def isLiveViewAttached(self) -> bool:
        return self._liveScene is not None

    def reattachLiveView(self, scene=None) -> bool:
        """Show a run that is still going on again after a scene close (the module panel is opened again);
        returns whether it did. A run that has ended is not brought back into a scene the user closed."""
        if self.isLiveViewAttached() or not self.isRunning():
            return False
        self.attachLiveView(scene)
        return True

    def _onSceneStartClose(self, caller, event) -> None:
        # The closed scene's nodes are removed; re-creating them at the next poll would put the table and chart
        # into the next scene (and into whatever the user saves next). Training itself continues.
        logging.info("Scene closed: the training loss table and chart are no longer updated")
        self.detachLiveView()

    def updateTable(self, scene=None, history=None):
        """Rewrite the loss table (column "step", "loss" and one per term) and the chart's series."""
        history = self.monitor.state.history if history is None else history
        return liveview.updateTable(history, scene)

    # ---- training data from the scene (AnatomicalEmbeddingTrainerLib.export) ---------------------
    isValidCaseName = staticmethod(export.isValidCaseName)
    exportCase = staticmethod(export.exportCase)
