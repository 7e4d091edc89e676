"""The viewer module's logic: model, embeddings, matching, click-to-correspond and few-shot labelling (no Qt)."""
import logging
import pathlib
import tempfile
import time
import types
from typing import Callable, Optional, Sequence

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from AnatomicalEmbeddingLib import cases as fewShotCasesTable
from AnatomicalEmbeddingLib import dependencies, matches, views
from AnatomicalEmbeddingLib.engine_model import _EngineModel
from AnatomicalEmbeddingLib.fewshot_process import FewShotProcess
from AnatomicalEmbeddingLib.jobs import BackgroundJob, JobWorker
from AnatomicalEmbeddingLib.subprocess_job import ChildProcess, ChildResult, EmbeddingProcess, cachedKey, \
    pythonExecutable
from AnatomicalEmbeddingLib.views import HEATMAP_ATTRIBUTE

#: Volumes with at most this many fine tiles get every tile warmed in the background (after the tiles around the
#: likely clicks); bigger ones only around the likely clicks. 512 tiles of 32^3 voxels are a 256^3 volume at the
#: model spacing: minutes of background work for a big network on a CPU, and within the disk cache's budget.
DEFAULT_MAX_PRECOMPUTED_TILES = 512
#: Window budget of "Fit sliding windows" (EmbedConfig.max_window_voxels): 128^3, the benchmarked setting
#: (benchmarks/results/embedding_fitted_windows.md).
FIT_WINDOW_VOXELS = 128 ** 3

#: GUI backend names (the parameter node's ``backend`` choices) -> engine backend names (``backends.open_model``).
ENGINE_BACKEND = {"ONNX Runtime": "onnxruntime", "torch": "torch"}


def engineFlagsOnly():
    """The viewer's MatchConfig: the engine flags only what a threshold cannot tell (a raw fallback, a target
    without structure); the GUI's confidence threshold is applied when a match is written (``storeMatch``), so
    changing it takes effect at the next match, without rebuilding the matchers."""
    from anatomical_embedding.inference.matching import MatchConfig

    return MatchConfig(low_confidence=0.0)


class AnatomicalEmbeddingLogic(ScriptedLoadableModuleLogic):
    """Scene-level operations; all conversions go through ``anatomical_embedding.mrml``.

    Runs on slicer-core: nothing here needs Qt. Blocking calls (``embedVolume``, ``trainFewShotHead``,
    ``applyFewShotHead``) are for scripts and tests; the ``...Async`` variants return a
    :class:`BackgroundJob` that the widget polls with a QTimer and completes with :meth:`finishJob`.
    """

    #: The module's ``@parameterNodeWrapper`` class. AnatomicalEmbedding.py sets it: the wrapper is declared with
    #: the GUI it binds, and this file must not import the module file (that would be a cycle).
    parameterNodeClass: Optional[type] = None

    def __init__(self, cacheDir: Optional[str] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.cacheDir = cacheDir
        self.model: Optional[_EngineModel] = None
        self.modelPath: Optional[pathlib.Path] = None
        self.head = None
        #: The file the head in memory was loaded from or saved to (None: a head not on disk yet).
        self.headFile: Optional[pathlib.Path] = None
        self.lowConfidence = 0.5
        #: Use the robust prior (fitted once per volume pair) to keep matches anatomically plausible.
        self.usePrior = True
        #: Sliding-window and fine-tile settings (engine defaults; part of the cache key).
        self.embedConfig = self._defaultEmbedConfig()
        #: After an embedding job, a low-priority warming job computes the fine tiles around the source points and
        #: their predicted matches, then every tile of volumes with at most this many (None: every volume). Tiles go
        #: one by one within the memory budget and to the disk cache; any other job preempts the warming.
        self.maxPrecomputedTiles: Optional[int] = DEFAULT_MAX_PRECOMPUTED_TILES
        #: Compute embeddings, and the robust priors of prepared pairs, in a child process
        #: (:mod:`AnatomicalEmbeddingLib.subprocess_job`): it progresses while Slicer's Qt loop holds the
        #: interpreter lock, which starves the worker thread. On inside Slicer; scripts and tests embed and fit in
        #: the worker thread unless they set it.
        self.embedInSubprocess = hasattr(getattr(slicer, "app", None), "slicerHome")
        #: Train and apply few-shot heads in a child process too (:mod:`AnatomicalEmbeddingLib.fewshot_process`),
        #: for the same reason: the ``...Async`` jobs only (the blocking calls stay in this process). On inside
        #: Slicer, like ``embedInSubprocess``.
        self.fewShotInSubprocess = self.embedInSubprocess
        self._cache = None
        self._embeddings: dict = {}   # volume node ID -> (geometry/content stamp, VolumeEmbedding)
        self._matchers: dict = {}     # (source ID, target ID) -> Matcher
        self._jobs = JobWorker("AnatomicalEmbedding")
        self._click: Optional[dict] = None
        self._busy = False
        #: Click-to-correspond matches in the worker thread (the widget sets it; scripts and tests may keep the
        #: blocking default). The GUI thread then only reads the point, and later writes the result.
        self.matchInBackground = False
        self._clickJobs: list = []
        #: Submits the warming job again (after a user job preempted it; tiles already warmed are skipped).
        self._warmResume: Optional[Callable[[], BackgroundJob]] = None

    def getParameterNode(self):
        if self.parameterNodeClass is None:
            raise RuntimeError("import the AnatomicalEmbedding module first: it declares the parameter node")
        return self.parameterNodeClass(super().getParameterNode())

    @staticmethod
    def _defaultEmbedConfig():
        from anatomical_embedding.inference.embedding import EmbedConfig

        # A dense fine map per volume, from the coarse map's own sliding-window pass: the robust prior's refinement
        # reads it anyway, and clicks then compute no fine tile. Volumes whose map exceeds its budget (a wide
        # imported model) use fine tiles of 32 voxels (engine default 16) with the same 16-voxel context:
        # precomputing a whole volume then runs ~3x fewer voxels through the network (32^3 of every 64^3 window).
        return EmbedConfig.dense(fine_tile=32)

    # ---- dependencies -----------------------------------------------------------------------------
    _importable = staticmethod(dependencies.importable)
    cudaAvailable = staticmethod(dependencies.cudaAvailable)

    def requiredPackages(self, backend: str = "ONNX Runtime") -> list:
        """(import name, pip requirement) the chosen backend needs; torch is handled separately."""
        return dependencies.requiredPackages(backend, self.cudaAvailable)

    def missingPackages(self, backend: str = "ONNX Runtime") -> list:
        return [requirement for module, requirement in self.requiredPackages(backend) if not self._importable(module)]

    def missingEnginePackages(self) -> list:
        """pip requirements of engine packages that cannot be imported in this Python."""
        return [requirement for module, requirement in dependencies.ENGINE_PACKAGES if not self._importable(module)]

    def ensureDependencies(self, backend: str = "ONNX Runtime", askUser: bool = True, extra: str = "",
                           progress: Optional[Callable[[str], None]] = None) -> bool:
        """Check the Python packages; install missing ones only after the user confirms (never silently).

        Returns True when everything is importable. ``askUser=False`` only checks (a script or test that
        must not install). torch comes from the PyTorch extension (``PyTorchUtils``) when it is installed.
        ``extra`` names a requirements file under ``Resources/Requirements`` (e.g. "import-published": MONAI and
        onnx for Import published model). One prompt covers all; failures are shown in the GUI, never raised.
        """
        missing = self.missingPackages(backend)
        if extra:
            missing += [r for module, r in dependencies.readRequirements(dependencies.RESOURCES / f"{extra}.txt")
                        if not self._importable(module) and r not in missing]
        needTorch = backend == "torch" and not self._importable("torch")
        if not missing and not needTorch:
            return True
        if not askUser:
            logging.warning("Missing Python packages: %s", ", ".join(missing + (["torch"] if needTorch else [])))
            return False
        if not dependencies.install(missing, needTorch, progress=progress):
            return False
        return not self.missingPackages(backend) and (backend != "torch" or self._importable("torch"))

    def ensureImportDependencies(self, askUser: bool = True, progress=None) -> bool:
        """Import published model: PyTorch, MONAI and onnx (one prompt)."""
        return self.ensureDependencies("torch", askUser, extra="import-published", progress=progress)

    # keep the earlier name working (scripts written against the first version)
    def ensureEngineDependencies(self, askUser: bool = True) -> bool:
        return self.ensureDependencies("ONNX Runtime", askUser)

    # ---- model ------------------------------------------------------------------------------------
    @staticmethod
    def installedModels() -> list:
        from anatomical_embedding.inference import registry as model_registry

        try:
            return model_registry.available_models()  # the shipped defaults first, then the registered ones
        except ValueError as exc:
            logging.warning("%s", exc)
            return []

    def loadModel(self, path, backend: str = "ONNX Runtime", device: str = "auto"):
        """Open a package (ONNX Runtime) or a run directory (torch); embeddings of another model are dropped."""
        from anatomical_embedding.inference.backends import open_model

        if path is None or str(path) in ("", "."):
            raise ValueError("no model chosen: pick a .aemodel package (or a run directory for torch)")
        if backend not in ENGINE_BACKEND:
            raise ValueError(f"unknown backend {backend!r}; choose one of {list(ENGINE_BACKEND)}")
        model = open_model(path, backend=ENGINE_BACKEND[backend], device=device)
        if self.model is None or self.model.model_hash != model.model_hash:
            self.cancelWarming()
            self._embeddings.clear()
            self._matchers.clear()
        self.model = _EngineModel(model)
        self.modelPath = pathlib.Path(path)
        logging.info("Loaded %r (%s on %s)", model, model.backend, getattr(model, "device", "cpu"))
        return self.model

    def loadDefaultModel(self, volumeNode, backend: str = "ONNX Runtime", device: str = "auto"):
        """The shipped default model for the volume's modality (CT when it holds air in HU, else MR)."""
        from anatomical_embedding.inference.defaults import resolve_model

        if volumeNode is None:
            raise ValueError("no model chosen and no source volume to pick the default model for")
        return self.loadModel(resolve_model(None, slicer.util.arrayFromVolume(volumeNode)), backend, device)

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

    def _worker(self):
        """The worker thread's executor (one worker: jobs run in order, the network never twice at once)."""
        return self._jobs.executor()

    def _submit(self, job: BackgroundJob, fn: Callable) -> BackgroundJob:
        """Queue a user job: it preempts tile warming, which resumes behind it (so warming never delays it)."""
        preempted = self._jobs.preemptBackground()
        self._jobs.submit(job, fn)
        if preempted is not None and self._warmResume is not None:
            self._warmResume()
        return job

    def yieldToWorker(self, seconds: Optional[float] = None) -> None:
        """Poll timer slot: give the worker thread the interpreter lock for a moment (see JobWorker)."""
        self._jobs.yieldToWorker(seconds)

    def finishJob(self, job: BackgroundJob):
        """Main thread: collect a finished job (re-raises its error or InterruptedError) and apply its result."""
        return self._jobs.finish(job)

    def setFitWindows(self, on: bool) -> None:
        """Embed in sliding windows fitted to each image (``EmbedConfig.max_window_voxels`` = ``FIT_WINDOW_VOXELS``)
        or in cubes (the default). A change drops the embeddings and matchers in memory (another configuration
        makes other maps; the disk cache keeps both)."""
        import dataclasses

        config = dataclasses.replace(self.embedConfig, max_window_voxels=FIT_WINDOW_VOXELS if on else 0)
        if config != self.embedConfig:
            self.forgetScene()
            self.embedConfig = config

    def abandonJobs(self) -> None:
        """The scene is closing: cancel every queued, running or unapplied job, tile warming included, and drop
        the click matches not yet written. Their results belong to the closed scene; applied later they would
        add the old patient's segmentation or lists to the next one (:meth:`finishJob` refuses them)."""
        self.cancelWarming()
        self._jobs.cancelAll()
        self._clickJobs.clear()

    def forgetScene(self) -> None:
        """Drop in-memory embeddings and matchers (scene closed); the disk cache stays."""
        self.cancelWarming()
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

    def isPrepared(self, sourceVolume, targetVolumes: Sequence, bothWays: bool = False) -> bool:
        """True when every volume is embedded and each (source, target) matcher exists (clicks are then fast)."""
        return all(self.isEmbedded(v) for v in [sourceVolume, *targetVolumes]) and all(
            (sourceVolume.GetID(), t.GetID()) in self._matchers
            and (not bothWays or (t.GetID(), sourceVolume.GetID()) in self._matchers)
            for t in targetVolumes if t is not sourceVolume)

    def isEmbedded(self, volumeNode) -> bool:
        entry = self._embeddings.get(volumeNode.GetID()) if volumeNode is not None else None
        # A job started before the embedding settings changed may store an embedding made with the old ones.
        return entry is not None and entry[0] == self._stamp(volumeNode) and entry[1].config == self.embedConfig

    def embedding(self, volumeNode):
        """The embedding of a volume node, computed (blocking) when needed."""
        if not self.isEmbedded(volumeNode):
            self.embedVolume(volumeNode)
        return self._embeddings[volumeNode.GetID()][1]

    def _childSettings(self) -> Optional[dict]:
        """Main thread: the keyword arguments a child process (:class:`ChildProcess`) needs to run this model with
        this cache (model file, backend, device, cache, Python, temporary folder); None when no model file is
        known."""
        if self.modelPath is None:
            return None
        model = self._requireModel()
        # Read slicer.app here, on the main thread: the worker builds the child.
        return {"modelPath": self.modelPath, "backend": model.backend,
                "device": getattr(model.model, "device", "cpu"), "cache": self.cache,
                "python": pythonExecutable(), "tempDir": getattr(getattr(slicer, "app", None), "temporaryPath", None)}

    def _childFactory(self) -> Optional[Callable[..., EmbeddingProcess]]:
        """Main thread: ``make(volumes, names, priors)`` building the child process that embeds (and fits priors)
        with this model and cache (:mod:`AnatomicalEmbeddingLib.subprocess_job`); None when ``embedInSubprocess``
        is off or no model file is known."""
        settings = self._childSettings() if self.embedInSubprocess else None
        if settings is None:
            return None
        config = self.embedConfig

        def make(volumes: list, names: list, priors: list) -> EmbeddingProcess:
            return EmbeddingProcess(volumes, config=config, priors=priors, names=names, **settings)

        return make

    @staticmethod
    def _runChild(job: BackgroundJob, child: ChildProcess):
        """Worker: run ``child`` for ``job`` (its Cancel stops the child at once) and return its result."""
        job.process = child
        job.check()  # cancelled before job.process was set: cancel() could not stop this child
        return child.run(lambda fraction, message: job.report(fraction, message))  # job.report as it is then

    @staticmethod
    def _childStage(job: BackgroundJob, make: Callable[..., EmbeddingProcess], volumes: list, names: list,
                    priors: list, model, cache, config, digests: Optional[list] = None) -> Optional[ChildResult]:
        """Worker: run the child for ``volumes`` and the ``priors`` pairs; without priors, only for the volumes
        whose embedding is not in the disk cache yet, and no child at all when every one is (a cache read here is
        cheaper than starting one). Returns what it computed (keys in the order of the volumes it got), or None.
        ``digests``: the volumes' ``image_hash`` when the caller has them."""
        if not priors:
            digests = digests or [None] * len(volumes)
            missing = [n for n, (v, d) in enumerate(zip(volumes, digests)) if cachedKey(v, model, cache, config, d)
                       is None]
            if not missing:
                return None
            volumes, names = [volumes[n] for n in missing], [names[n] for n in missing]
        return AnatomicalEmbeddingLogic._runChild(job, make(volumes, names, priors))

    def _embedWork(self, volumeNode, job: BackgroundJob, volume=None, allowChild: bool = True) -> tuple:
        """Read the node (main thread); return (worker function, store function) for one volume.

        The worker embeds the coarse map and, with ``embedConfig.dense_fine`` (the default), the dense fine map,
        so clicks compute nothing afterwards; otherwise fine tiles come from the warming job started after it
        (:meth:`warmTilesAsync`) or on demand around a click (all of it is cached on disk). With
        ``embedInSubprocess`` a child process computes what the cache lacks and the worker reads it from there
        (``allowChild=False``: never, the caller's child has computed it). ``volume``: the node's engine Volume
        when the caller has read it already.
        """
        from anatomical_embedding import mrml
        from anatomical_embedding.inference.embedding import embedding_window_count, embed_volume, image_hash

        model = self._requireModel()
        volume = mrml.node_to_volume(volumeNode) if volume is None else volume
        nodeId, stamp, name = volumeNode.GetID(), self._stamp(volumeNode), volumeNode.GetName()
        config, cache = self.embedConfig, self.cache
        nWindows = embedding_window_count(model, volume, config)  # expected network runs (progress bar)
        count = [0]
        make = self._childFactory() if allowChild else None

        def hook():
            job.check()
            count[0] += 1
            job.report(min(0.99, count[0] / max(nWindows, 1)), f"embedding {name}: window {count[0]}/{nWindows}")

        def work():
            key = None
            digest = image_hash(volume)  # once: the cache check and the embedding share it
            if make is not None:  # it writes the coarse map to the cache, read below (no network run here)
                result = self._childStage(job, make, [volume], [name], [], model, cache, config, [digest])
                key = result.keys[0] if result is not None else None
            model.set_hook(hook)
            try:
                emb = embed_volume(model, volume, cache, config, image_digest=digest)
            finally:
                model.set_hook(None)
            job.check()  # a Cancel during the last window (the whole pass, for a small volume) still cancels
            if key is not None and emb.key != key:
                logging.warning("embedding %s: the separate process wrote cache entry %s, this process read %s "
                                "(the coarse map was computed again here)", name, key[:12], emb.key[:12])
            return emb

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
        """Embed a volume node in the worker thread; poll ``job.done()`` and call :meth:`finishJob`, which starts
        warming its fine tiles (:meth:`warmTilesAsync`)."""
        job = BackgroundJob(f"Embedding {volumeNode.GetName()}")
        work, store = self._embedWork(volumeNode, job)

        def finish(emb):
            store(emb)
            self.warmTilesAsync(volumeNode, [])
            return emb

        job.finish = finish
        return self._submit(job, work)

    def prepareCorrespondenceAsync(self, sourceVolume, targetVolumes: Sequence, bothWays: bool = False,
                                   sourceMarkups=None) -> BackgroundJob:
        """One background job that embeds what is missing (coarse maps) and fits the robust prior of each pair.

        After :meth:`finishJob`, clicks between these volumes run no prior fit and no coarse embedding; the
        finish step starts warming the fine tiles a click will need, around ``sourceMarkups``'s points first
        (:meth:`warmTilesAsync`). ``bothWays`` also prepares target -> source (:meth:`matchBackControlPoint`).
        With ``embedInSubprocess`` one child process embeds what the cache lacks and fits the priors
        (numpy/scipy work that a starved worker thread would barely progress); the worker then reads the
        embeddings from the cache and gives each Matcher the child's prior (or its refusal).
        """
        from anatomical_embedding import mrml

        job = BackgroundJob("Preparing correspondence")
        volumes = [sourceVolume] + [t for t in targetVolumes if t is not sourceVolume]
        pending = [v for v in volumes if not self.isEmbedded(v)]
        make = self._childFactory()
        usePrior = self.usePrior
        # The child needs every volume of a pair whose prior it fits, else only the volumes not embedded here.
        childNodes = (volumes if usePrior else pending) if make is not None else []
        data = {v.GetID(): mrml.node_to_volume(v) for v in childNodes}
        parts = [self._embedWork(v, job, volume=data.get(v.GetID()), allowChild=False) for v in pending]
        known = {v.GetID(): self._embeddings[v.GetID()][1] for v in volumes if v not in pending}
        ids = [v.GetID() for v in volumes]
        pairs = [p for t in range(1, len(ids)) for p in ([(0, t), (t, 0)] if bothWays else [(0, t)])]
        childPlan = None
        if make is not None:
            childPairs = pairs if usePrior else []
            childPlan = (make, [data[v.GetID()] for v in childNodes], [v.GetName() for v in childNodes], childPairs,
                         self._requireModel(), self.cache, self.embedConfig)

        def work():
            from anatomical_embedding.inference.matching import Matcher

            result = self._childStage(job, *childPlan) if childPlan is not None else None
            embs = dict(known)
            for volume, (embed, _) in zip(pending, parts):
                embs[volume.GetID()] = embed()  # a cache read when the child computed it
            fitted = self._childPriors(result, childPlan, embs, ids) if usePrior else {}
            matchers = {}
            for i, j in pairs:
                job.check()
                given = fitted.get((i, j))
                if usePrior and given is None:
                    job.message = "fitting the robust prior"
                matcher = Matcher(embs[ids[i]], embs[ids[j]], engineFlagsOnly(), **(given or {}))
                if usePrior:
                    _ = matcher.prior  # fitted here (no child), in the worker, instead of on the first click
                matchers[(ids[i], ids[j])] = matcher
            return embs, matchers

        def finish(result):
            embs, matchers = result
            for volume, (_, store) in zip(pending, parts):
                store(embs[volume.GetID()])
            self._matchers.update(matchers)
            self.warmTilesAsync(sourceVolume, volumes[1:], sourceMarkups)
            return matchers

        job.finish = finish
        return self._submit(job, work)

    @staticmethod
    def _childPriors(result: Optional[ChildResult], childPlan, embs: dict, ids: list) -> dict:
        """(i, j) -> Matcher keyword arguments (the child's prior or its refusal) for the pairs the child fitted on
        the very embeddings read here (same cache keys); other pairs are fitted in the worker."""
        if result is None or childPlan is None or not childPlan[3]:
            return {}
        same = [n < len(result.keys) and result.keys[n] == embs[ids[n]].key for n in range(len(ids))]
        if not all(same):
            logging.warning("the separate process embedded other cache entries than this process read; fitting the "
                            "robust priors here")
            return {}
        return {pair: {"fitted_prior": prior, "prior_refusal": result.refusals.get(pair)}
                for pair, prior in result.priors.items()}

    # ---- warming fine tiles -----------------------------------------------------------------------
    def warmTilesAsync(self, sourceVolume, targetVolumes: Sequence = (), sourceMarkups=None) -> BackgroundJob:
        """Start the low-priority job that computes fine tiles before the clicks need them; returns it.

        Order: for each prepared (source, target) pair, the tiles around each point of ``sourceMarkups`` and
        around its predicted match (:meth:`Matcher.likely_tiles`, the same regions a click searches); then every
        tile of each volume with at most ``maxPrecomputedTiles`` of them. It replaces an earlier warming job, any
        other job preempts it (it resumes behind that job), and a click during it stays exact: tiles are locked
        one by one, and a tile is the same whoever computes it. Progress goes to ``job.message`` only (quiet).
        """
        from anatomical_embedding import mrml

        volumes = [sourceVolume] + [t for t in targetVolumes if t is not sourceVolume]
        embs = [self._embeddings[v.GetID()][1] for v in volumes if self.isEmbedded(v)]
        matchers = [self._matchers[key] for key in ((sourceVolume.GetID(), t.GetID()) for t in volumes[1:])
                    if key in self._matchers]
        points = np.zeros((0, 3))
        if sourceMarkups is not None and sourceMarkups.GetNumberOfControlPoints():
            points = mrml.markups_node_to_points(sourceMarkups)[1]
        plan = (embs, matchers, points, self.usePrior, self.maxPrecomputedTiles)

        def start() -> BackgroundJob:
            job = BackgroundJob("Warming fine tiles")
            self._jobs.submit(job, self._warmWork(job, *plan), background=True)
            job.future.add_done_callback(lambda future: self._logWarmOutcome(job))
            return job

        self._warmResume = start
        return start()

    @staticmethod
    def _warmWork(job: BackgroundJob, embs: list, matchers: list, points: np.ndarray, usePrior: bool,
                  maxTiles: Optional[int]) -> Callable[[], int]:
        """The warming job's worker function: likely tiles first, then whole volumes within ``maxTiles``."""

        def chunks() -> list:
            out = [c for m in matchers for c in (m.likely_tiles(points, use_prior=usePrior) if len(points) else [])]
            for emb in embs:
                tiles = emb.all_tiles()
                if maxTiles is None or len(tiles) <= maxTiles:
                    out.append((emb, tiles))
            return out

        def work() -> int:
            plan = chunks()
            computed = 0
            for n, (emb, tiles) in enumerate(plan):
                job.report(n / max(len(plan), 1), f"warming fine tiles: {computed} computed")
                computed += emb.warm_tiles(tiles, check=job.check)
            job.report(1.0, f"fine tiles warm: {computed} computed")
            return computed

        return work

    @staticmethod
    def _logWarmOutcome(job: BackgroundJob) -> None:
        """Worker thread, when the warming job ends: nobody collects it, so its errors are logged here."""
        error = job.future.exception()
        if error is None:
            logging.info("%s: %s in %.1f s", job.description, job.message, job.seconds)
        elif isinstance(error, InterruptedError):
            logging.debug("%s: preempted after %.1f s", job.description, job.seconds)
        else:
            logging.warning("%s failed (clicks compute their tiles on demand): %s", job.description, error)

    def warmingJob(self) -> Optional[BackgroundJob]:
        """The warming job while it is queued or running, else None."""
        return self._jobs.backgroundJob()

    def cancelWarming(self) -> None:
        """Stop warming for good (scene closed, another model): it will not resume."""
        self._warmResume = None
        self._jobs.preemptBackground()

    # ---- matching ---------------------------------------------------------------------------------
    def matcher(self, sourceVolume, targetVolume):
        from anatomical_embedding.inference.matching import Matcher

        key = (sourceVolume.GetID(), targetVolume.GetID())
        src, dst = self.embedding(sourceVolume), self.embedding(targetVolume)
        m = self._matchers.get(key)
        if m is None or m.source is not src or m.target is not dst:
            m = Matcher(src, dst, engineFlagsOnly())
            self._matchers[key] = m
        return m

    defaultTargetMarkups = staticmethod(matches.defaultTargetMarkups)
    pointScores = staticmethod(matches.pointScores)

    @staticmethod
    def matchedPointsFor(sourceMarkups, targetVolume, targetMarkups):
        """The "Matched points" list for ``sourceMarkups`` and ``targetVolume``: ``targetMarkups`` unless it holds
        the matches in another volume or of another source list, else the list bound to this (source, target) pair,
        or None (a new list is made when one is needed). The widget calls it on every parameter change, so the list
        follows the target volume and the source list, and the previous pair's list stays as it is (see
        :func:`matches.targetMarkupsFor`)."""
        sourceId = sourceMarkups.GetID() if sourceMarkups is not None else None
        out = matches.targetMarkupsFor(targetVolume, sourceId, targetMarkups)
        if out is not targetMarkups:
            logging.info("Matched points: %r holds the matches of another pair; %s for %r",
                         targetMarkups.GetName(), f"using {out.GetName()!r}" if out is not None else "a new list",
                         targetVolume.GetName())
        return out

    def _storeMatch(self, targetMarkups, label: str, sourceId: str, sourceNodeId: str, match, seconds: float,
                    targetVolume) -> dict:
        return matches.storeMatch(targetMarkups, label, sourceId, sourceNodeId, match, seconds, targetVolume,
                                  self.lowConfidence)

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

    def _transferJob(self, sourceMarkups, sourceVolume, targetVolumes: Sequence, targetMarkups, job) -> Callable:
        """Read the lists on the main thread; return the worker function (matching only: numpy, and the network
        for fine tiles not yet computed); ``job.finish`` writes the matches into the lists on the main thread."""
        from anatomical_embedding import mrml

        names, lps = mrml.markups_node_to_points(sourceMarkups)
        ids = [sourceMarkups.GetNthControlPointID(i) for i in range(sourceMarkups.GetNumberOfControlPoints())
               if sourceMarkups.GetNthControlPointPositionStatus(i) == sourceMarkups.PositionDefined]
        if not names:
            raise ValueError(f"{sourceMarkups.GetName()!r} has no placed points to transfer")
        targetMarkups = list(targetMarkups or []) + [None] * (len(targetVolumes) - len(targetMarkups or []))
        # A list given for one volume that holds another volume's or another source list's matches is left alone
        # (as in click mode).
        targetMarkups = [matches.targetMarkupsFor(volume, sourceMarkups.GetID(), out)
                         for volume, out in zip(targetVolumes, targetMarkups)]
        pairs = [(volume, out, self.matcher(sourceVolume, volume))
                 for volume, out in zip(targetVolumes, targetMarkups) if volume is not sourceVolume]
        usePrior, sourceId = self.usePrior, sourceMarkups.GetID()

        def work():
            results = []
            for n, (volume, _, matcher) in enumerate(pairs):
                job.check()
                job.report(n / max(len(pairs), 1), f"transferring {len(names)} points into {n + 1}/{len(pairs)}")
                t0 = time.perf_counter()
                matched = matcher.match(lps, "LPS", use_prior=usePrior, with_raw=False, names=names)
                results.append((matched, (time.perf_counter() - t0) / max(len(matched), 1)))
            return results

        def finish(results):
            outputs = []
            for (volume, out, _), (matched, seconds) in zip(pairs, results):
                out = out or matches.existingTargetMarkups(volume, sourceId) or self.defaultTargetMarkups(volume)
                wasModifying = out.StartModify()
                for name, pid, r in zip(names, ids, matched):
                    self._storeMatch(out, name, pid, sourceId, r.final, seconds, volume)
                out.EndModify(wasModifying)
                outputs.append(out)
            return outputs

        job.finish = finish
        return work

    def transferAll(self, sourceMarkups, sourceVolume, targetVolumes: Sequence, targetMarkups: Optional[Sequence] = None,
                    ) -> list:
        """Match every defined point of ``sourceMarkups`` into each target now (blocking); returns the lists."""
        job = BackgroundJob("Transfer all")
        work = self._transferJob(sourceMarkups, sourceVolume, targetVolumes, targetMarkups, job)
        return job.finish(work())

    def transferAllAsync(self, sourceMarkups, sourceVolume, targetVolumes: Sequence,
                         targetMarkups: Optional[Sequence] = None) -> BackgroundJob:
        """Transfer all in the worker thread (progress, cancel); :meth:`finishJob` writes the target lists."""
        job = BackgroundJob("Transfer all")
        return self._submit(job, self._transferJob(sourceMarkups, sourceVolume, targetVolumes, targetMarkups, job))

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
    def heatmapVolume(self, sourceVolume, targetVolume, pointRas):
        """Similarity to the source point on the target embedding's own coarse grid (an engine ``Volume``).

        No resampling to the target's voxel grid: Slicer reslices the foreground layer for display. The cost is
        one dot product per coarse cell (milliseconds), independent of the target's voxel count.
        """
        return views.coarseSimilarity(self.matcher(sourceVolume, targetVolume), pointRas)

    def updateHeatmap(self, sourceVolume, targetVolume, pointRas, heatmapNode=None, opacity: float = 0.5):
        """Similarity heatmap on its coarse grid, shown as foreground over the target in the target views only."""
        return views.showHeatmapVolume(self.heatmapVolume(sourceVolume, targetVolume, pointRas), targetVolume,
                                       heatmapNode, opacity)

    showHeatmap = staticmethod(views.showHeatmap)
    setupCorrespondenceLayout = staticmethod(views.setupCorrespondenceLayout)
    setHeatmapOpacity = staticmethod(views.setHeatmapOpacity)

    # ---- results table ----------------------------------------------------------------------------
    updateResultsTable = staticmethod(views.updateResultsTable)
    resultsTableRows = staticmethod(views.resultsTableRows)
    jumpToResult = staticmethod(views.jumpToResult)
    jumpToPoint = staticmethod(views.jumpToPoint)

    # ---- click-to-correspond ----------------------------------------------------------------------
    def startClickToCorrespond(self, sourceMarkups, sourceVolume, targetVolume, targetMarkups=None,
                               onMatched: Optional[Callable[[dict], None]] = None,
                               onError: Optional[Callable[[str], None]] = None, layout: bool = True,
                               placeMode: bool = False, matchExisting: bool = True):
        """Match each point placed or moved on ``sourceMarkups`` at once; returns the target point list.

        With ``matchExisting`` (the default) a (re)start first matches, like clicks, every point of
        ``sourceMarkups`` whose match is missing from the target list or out of date (placed, moved or renamed
        while click mode was off, or matched into another list: :func:`matches.sourcePointsToMatch`); their
        errors are reported once, together, through ``onError``.

        ``targetMarkups`` receives the matches unless it holds the matches in another volume or of another source
        list (:func:`matches.targetMarkupsFor`); None, or such a list, gives a new list. The list returned is bound to
        (``sourceMarkups``, ``targetVolume``) by node attributes (:meth:`matchedPointsFor` finds it again).

        With ``layout`` the correspondence layout is set up: source views on top, target views below, each row
        bound to its volume; the source list is drawn in the source row and the matches in the target row.
        ``placeMode`` starts persistent Markups place mode into ``sourceMarkups`` (the widget). Both are
        undone by :meth:`stopClickToCorrespond`. ``onError`` receives the message of a click that could not be
        matched (e.g. outside the image); the widget shows it.

        Slicer places a point only in views where the active list is displayable, and the source list is drawn
        in the source row only, so clicks in the target row place nothing. A source point whose associated
        node is the target volume (set by a script) is matched back, as :meth:`matchBackControlPoint` does.

        With ``matchInBackground`` nothing is embedded here: a click on a pair that is not prepared (or no
        longer is: another model, "Fit sliding windows", a moved volume) queues the background preparation.
        """
        if sourceMarkups is None or sourceVolume is None or targetVolume is None:
            raise ValueError("click-to-correspond needs a source point list, a source volume and a target volume")
        if sourceVolume is targetVolume:
            raise ValueError("choose different source and target volumes")
        self.stopClickToCorrespond()
        # A list that holds another pair's matches is not written into (a new list is, or the one already
        # bound to this pair); bound now, so that it is found again when the user switches back to this target.
        targetMarkups = (matches.targetMarkupsFor(targetVolume, sourceMarkups.GetID(), targetMarkups)
                         or self.defaultTargetMarkups(targetVolume))
        matches.bindTargetMarkups(targetMarkups, sourceMarkups.GetID(), targetVolume)
        if not self.matchInBackground:  # blocking mode (scripts): embed now rather than on the first click
            self.embedding(sourceVolume), self.embedding(targetVolume)
        # What click mode changes in the scene, undone when it stops.
        restore: dict = {"views": [], "placeMode": None}
        if layout:
            scene = sourceVolume.GetScene()
            views.setupCorrespondenceLayout(sourceVolume, targetVolume)
            restore["views"] = [views.restrictMarkupsToViews(sourceMarkups, scene, "source"),
                                views.restrictMarkupsToViews(targetMarkups, scene, "target")]
        if placeMode:
            restore["placeMode"] = views.startPlaceMode(sourceMarkups)
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
                       "onError": onError, "last": {}, "results": [], "errors": [], "dragging": False,
                       "dragStart": None, "prepare": None, "restore": restore, "starting": False,
                       "startJobs": set(), "startErrors": []}
        if matchExisting:
            self._matchOutdatedPoints(self._click)
        return targetMarkups

    def _matchOutdatedPoints(self, state: dict) -> None:
        """At a (re)start: match the source points without a current match in the target list, each as a click
        is (in the worker with ``matchInBackground``); the others count as matched where they are now, so that
        only a later move or rename matches them again."""
        node = state["source"]
        outdated = matches.sourcePointsToMatch(node, state["target"], state["targetVolume"])
        state["last"] = {pid: seen for pid, seen in self._pointPositions(node).items() if pid not in outdated}
        if outdated:
            logging.info("click-to-correspond: matching %d point(s) of %r without a current match in %r",
                         len(outdated), node.GetName(), state["target"].GetName())
        state["starting"] = True  # errors are collected (see _clickError), not reported one by one
        try:
            for pid in outdated:
                job = self._matchClickedPoint(node, node.GetNthControlPointIndexByID(pid), state)
                if isinstance(job, BackgroundJob):
                    state["startJobs"].add(job)
        finally:
            state["starting"] = False
        self._reportStartErrors(state)

    @staticmethod
    def _clickError(state: dict, message: str, atStart: bool) -> None:
        """A point that could not be matched: logged, and reported through ``onError`` (a point matched at the
        start of click mode: collected, and reported with the others once they are all done)."""
        logging.warning("%s", message)
        state["errors"].append(message)
        if atStart:
            state["startErrors"].append(message)
        elif state.get("onError") is not None:
            state["onError"](message)

    @staticmethod
    def _reportStartErrors(state: dict) -> None:
        """Once every match queued at the start is applied: one message for all of their errors (one per point
        would be a burst of message boxes when, e.g., the preparation they waited for was cancelled)."""
        if state["startJobs"] or not state["startErrors"]:
            return
        errors, state["startErrors"] = state["startErrors"], []
        message = (errors[0] if len(errors) == 1
                   else f"{len(errors)} source points not matched: " + "; ".join(errors))
        if state.get("onError") is not None:
            state["onError"](message)

    def clickToCorrespondNodes(self) -> Optional[tuple]:
        """(source list, source volume, target volume) of the active click mode, or None."""
        if self._click is None:
            return None
        return self._click["source"], self._click["sourceVolume"], self._click["targetVolume"]

    def clickToCorrespondTarget(self):
        """The point list the active click mode writes its matches into, or None."""
        return self._click["target"] if self._click is not None else None

    def stopClickToCorrespond(self) -> None:
        """Stop matching; the point lists are drawn in the views they were before and place mode ends."""
        if self._click is not None:
            for tag in self._click["tags"]:
                self._click["source"].RemoveObserver(tag)
            restore = self._click["restore"]
            for saved in restore["views"]:
                views.restoreMarkupsViews(saved)
            views.stopPlaceMode(restore["placeMode"])
        self._click = None

    def clickToCorrespondActive(self) -> bool:
        return self._click is not None

    def onSourcePointEvent(self, caller, event: int, index=None):
        """Observer of the source list (``event`` is the MRML event id): match point ``index`` when placed or moved.

        PointModifiedEvent also fires during a drag; the match then runs once, at PointEndInteractionEvent,
        for every point the interaction moved (Slicer 5 sends the interaction events without the point's
        index). A point whose position and label did not change is not matched again. Returns the result dict
        (blocking) or the job (``matchInBackground``) of the last point matched, or None.
        """
        state = self._click
        if state is None or self._busy:
            return None
        node = state["source"]
        if event == node.PointStartInteractionEvent:
            state["dragging"] = True
            state["dragStart"] = self._pointPositions(node)
            return None
        if event == node.PointEndInteractionEvent:
            state["dragging"] = False
            start, state["dragStart"] = state["dragStart"] or {}, None
            out = None
            for moved in self._movedPoints(node, start, state["last"]):
                out = self._matchClickedPoint(node, moved, state) or out
            return out
        if index is None or (event == node.PointModifiedEvent and state["dragging"]):
            return None  # a drag is matched once, at its end
        return self._matchClickedPoint(node, index, state)

    @staticmethod
    def _pointPositions(node) -> dict:
        """Control point ID -> (world RAS, label) of the defined points."""
        out = {}
        for i in range(node.GetNumberOfControlPoints()):
            if node.GetNthControlPointPositionStatus(i) == node.PositionDefined:
                ras = np.zeros(3)
                node.GetNthControlPointPositionWorld(i, ras)
                out[node.GetNthControlPointID(i)] = (ras, node.GetNthControlPointLabel(i))
        return out

    @staticmethod
    def _unchanged(reference: Optional[tuple], ras: np.ndarray, label: str) -> bool:
        """Whether a point is where, and named as, ``reference`` = (world RAS, label) records it."""
        return reference is not None and np.allclose(reference[0], ras, atol=1e-6) and reference[1] == label

    @classmethod
    def _movedPoints(cls, node, start: dict, last: dict) -> list:
        """Indices of the points that moved or were renamed since their last match, or since the start of the
        interaction when never matched (a point neither matched nor seen at the start is left to its own
        events)."""
        moved = []
        for pid, (ras, label) in cls._pointPositions(node).items():
            reference = last.get(pid) or start.get(pid)
            if reference is not None and not cls._unchanged(reference, ras, label):
                moved.append(node.GetNthControlPointIndexByID(pid))
        return moved

    def _matchClickedPoint(self, node, index: int, state: dict):
        """Match point ``index`` of the source list (placed or moved); see :meth:`onSourcePointEvent`."""
        if index < 0 or index >= node.GetNumberOfControlPoints() or \
                node.GetNthControlPointPositionStatus(index) != node.PositionDefined:
            return None
        ras = np.zeros(3)
        node.GetNthControlPointPositionWorld(index, ras)
        pid = node.GetNthControlPointID(index)
        label = node.GetNthControlPointLabel(index)
        if self._unchanged(state["last"].get(pid), ras, label):
            return None
        inTarget = node.GetNthControlPointAssociatedNodeID(index) == state["targetVolume"].GetID()
        self._busy = True  # writing the point lists must not re-enter through our own events
        try:
            if inTarget and self.matchInBackground:
                state["last"][pid] = (ras.copy(), label)
                return self._submitClickMatchBack(node, index, state)
            if inTarget:
                result = self.matchBackControlPoint(node, index, state["sourceVolume"], state["targetVolume"],
                                                    state["target"])
                node.GetNthControlPointPositionWorld(index, ras)
            elif self.matchInBackground:
                state["last"][pid] = (ras.copy(), label)
                return self._submitClickMatch(node, index, state)
            else:
                result = self.matchControlPoint(node, index, state["sourceVolume"], state["targetVolume"],
                                                state["target"])
        except ValueError as exc:  # e.g. a point outside the image: tell the user, do not crash the observer
            state["last"][pid] = (ras.copy(), label)  # one report per placement (several events fire for it)
            self._clickError(state, f"{label} not matched: {exc}", state.get("starting", False))
            return None
        finally:
            self._busy = False
        state["last"][pid] = (ras.copy(), label)
        state["results"].append(result)
        if state["onMatched"] is not None:
            state["onMatched"](result)
        return result

    def _submitClickMatch(self, node, index: int, state: dict) -> BackgroundJob:
        """The match of one click as a background job: read the point now (main thread), match in the worker,
        write the target point and call ``onMatched`` in :meth:`pollClickJobs` (main thread, in click order)."""
        from anatomical_embedding.io import convert_points

        ras = np.zeros(3)
        node.GetNthControlPointPositionWorld(index, ras)
        label, pid = node.GetNthControlPointLabel(index), node.GetNthControlPointID(index)
        sourceVolume, targetVolume, targetMarkups = state["sourceVolume"], state["targetVolume"], state["target"]
        matcher, usePrior = self._clickMatcher(state, sourceVolume, targetVolume), self.usePrior
        lps = convert_points(ras, "RAS", "LPS")

        def work():
            t0 = time.perf_counter()
            match = matcher().match(lps, "LPS", use_prior=usePrior, with_raw=False, names=[label])[0]
            return match, time.perf_counter() - t0

        def finish(output):
            match, seconds = output
            return self._storeMatch(targetMarkups, label, pid, node.GetID(), match.final, seconds, targetVolume)

        return self._queueClickJob(label, work, finish, state)

    def _clickMatcher(self, state: dict, sourceVolume, targetVolume) -> Callable:
        """Main thread: a function that returns the (source, target) matcher in the worker.

        A click never embeds on the GUI thread: when the pair is not prepared (its embeddings or matcher were
        dropped: another model, "Fit sliding windows", a moved volume), the same background job as at the
        start of click mode (:meth:`prepareCorrespondenceAsync`: embedding and prior fit; progress and Cancel
        in the widget, see :meth:`clickPreparationJob`) is queued once, ahead of the click, and the click's
        match takes the matcher from its result. :meth:`pollClickJobs` stores its embeddings before it writes
        any match.
        """
        from anatomical_embedding.inference.matching import Matcher

        prepare = state["prepare"]
        if prepare is None and self.isPrepared(state["sourceVolume"], [state["targetVolume"]]):
            matcher = self.matcher(sourceVolume, targetVolume)  # both embedded: builds no more than a Matcher
            return lambda: matcher
        if prepare is None:
            logging.info("click-to-correspond: %s and %s are not prepared (embeddings dropped); preparing "
                         "them in the background first", state["sourceVolume"].GetName(),
                         state["targetVolume"].GetName())
            prepare = self.prepareCorrespondenceAsync(state["sourceVolume"], [state["targetVolume"]],
                                                      sourceMarkups=state["source"])
            state["prepare"] = prepare
            self._clickJobs.append((prepare, state))  # the poll applies it before the clicks queued behind it
        key = (sourceVolume.GetID(), targetVolume.GetID())

        def get():  # worker: one worker thread, so the preparation has run by now
            try:
                embs, matchers = prepare.future.result()
            except InterruptedError as exc:
                raise InterruptedError("preparing the volumes was cancelled") from exc
            except Exception as exc:  # noqa: BLE001 - reported as this click's error
                raise ValueError(f"the volumes could not be prepared: {exc}") from exc
            matcher = matchers.get(key)  # the reverse pair (a match back) was not prepared: built here
            return matcher if matcher is not None else Matcher(embs[key[0]], embs[key[1]], engineFlagsOnly())

        return get

    def clickPreparationJob(self) -> Optional[BackgroundJob]:
        """The preparation a click queued (see :meth:`_clickMatcher`) until the poll applies it, else None."""
        return next((job for job, state in self._clickJobs if job is state.get("prepare")), None)

    def _queueClickJob(self, label: str, work: Callable, finish: Callable, state: dict) -> BackgroundJob:
        """Submit one click's match; :meth:`pollClickJobs` applies ``finish`` on the main thread, in click order."""
        job = BackgroundJob(f"Matching {label}")
        job.finish = finish
        self._clickJobs.append((job, state))
        return self._submit(job, work)

    def clickJobsPending(self) -> bool:
        return bool(self._clickJobs)

    def pollClickJobs(self) -> int:
        """Main thread (the widget's poll timer): apply finished click matches in click order; returns how many."""
        applied = 0
        while self._clickJobs and self._clickJobs[0][0].done():
            job, state = self._clickJobs.pop(0)
            if job is state.get("prepare"):
                state["prepare"] = None
                try:
                    self.finishJob(job)  # stores the embeddings and matchers (and starts warming)
                except Exception as exc:  # noqa: BLE001 - each click queued behind it reports it as its error
                    logging.warning("%s failed: %s", job.description, exc)
                continue
            atStart = job in state["startJobs"]  # queued when click mode (re)started
            state["startJobs"].discard(job)
            try:
                self._busy = True
                try:
                    result = self.finishJob(job)
                finally:
                    self._busy = False
            except (ValueError, InterruptedError) as exc:
                self._clickError(state, f"{job.description[len('Matching '):]} not matched: {exc}", atStart)
            else:
                state["results"].append(result)
                applied += 1
                if state["onMatched"] is not None:
                    state["onMatched"](result)
            if atStart:
                self._reportStartErrors(state)
        return applied

    def matchBackControlPoint(self, sourceMarkups, index: int, sourceVolume, targetVolume, targetMarkups) -> dict:
        """A point of ``sourceMarkups`` placed on the target: match it into the source.

        A script's API: in Slicer the source list is not placeable in the target row of click mode (see
        :meth:`startClickToCorrespond`).

        The clicked position becomes the target list's point (with the reverse match's scores) and the source
        point moves to the matched source position. Returns the result dict of :meth:`matchControlPoint`, whose
        ``query_ras`` is the new source position (the heatmap query).
        """
        label, pid, work = self._matchBackWork(sourceMarkups, index, sourceVolume, targetVolume)
        result, seconds = work()
        return self._applyMatchBack(sourceMarkups, pid, label, result, seconds, sourceVolume, targetVolume,
                                    targetMarkups)

    def _matchBackWork(self, sourceMarkups, index: int, sourceVolume, targetVolume,
                       back: Optional[Callable] = None) -> tuple:
        """Read the clicked point (main thread); return ``(label, id, work)``, ``work`` the reverse match (no MRML,
        so it may run in the worker thread). ``back``: returns the (target, source) matcher (default: now)."""
        from anatomical_embedding.io import convert_points

        ras = np.zeros(3)
        sourceMarkups.GetNthControlPointPositionWorld(index, ras)
        label = sourceMarkups.GetNthControlPointLabel(index)
        pid = sourceMarkups.GetNthControlPointID(index)
        if back is None:
            matcher = self.matcher(targetVolume, sourceVolume)
            back = lambda: matcher  # noqa: E731
        usePrior = self.usePrior
        lps = convert_points(ras, "RAS", "LPS")

        def work():
            t0 = time.perf_counter()
            result = back().match(lps, "LPS", use_prior=usePrior, with_raw=False, names=[label])[0].final
            return result, time.perf_counter() - t0

        return label, pid, work

    def _applyMatchBack(self, sourceMarkups, pid: str, label: str, result, seconds: float, sourceVolume,
                        targetVolume, targetMarkups) -> dict:
        """Main thread: move the source point to its match and write the clicked position into the target list."""
        from anatomical_embedding.io import convert_points

        index = sourceMarkups.GetNthControlPointIndexByID(pid)
        if index < 0:
            raise ValueError("the point was deleted before its match arrived")
        sourceRas = convert_points(result.point_lps, "LPS", "RAS")
        sourceMarkups.SetNthControlPointPositionWorld(index, *sourceRas)
        sourceMarkups.SetNthControlPointAssociatedNodeID(index, sourceVolume.GetID())
        # The target point is where the user clicked; the scores are those of the reverse match.
        clicked = types.SimpleNamespace(similarity=result.similarity, confidence=result.confidence,
                                        fb_distance_mm=result.fb_distance_mm, method=result.method,
                                        point_lps=result.query_lps, query_lps=result.point_lps)
        out = self._storeMatch(targetMarkups, label, pid, sourceMarkups.GetID(), clicked, seconds, targetVolume)
        out["direction"] = "target to source"
        return out

    def _submitClickMatchBack(self, node, index: int, state: dict) -> BackgroundJob:
        """A point placed on the target as a background job, like :meth:`_submitClickMatch`: the reverse match
        runs in the worker; :meth:`pollClickJobs` moves the source point and writes the target point (main
        thread)."""
        back = self._clickMatcher(state, state["targetVolume"], state["sourceVolume"])
        label, pid, work = self._matchBackWork(node, index, state["sourceVolume"], state["targetVolume"],
                                               back)

        def finish(output):
            result, seconds = output
            out = self._applyMatchBack(node, pid, label, result, seconds, state["sourceVolume"],
                                       state["targetVolume"], state["target"])
            moved = np.zeros(3)  # the moved source point is not a new source click
            node.GetNthControlPointPositionWorld(node.GetNthControlPointIndexByID(pid), moved)
            state["last"][pid] = (moved, label)
            return out

        return self._queueClickJob(label, work, finish, state)

    # ---- few-shot labelling -----------------------------------------------------------------------
    # The cases live in a table node (see AnatomicalEmbeddingLib.cases); these keep the logic's API.
    addFewShotCase = staticmethod(fewShotCasesTable.addFewShotCase)
    removeFewShotCase = staticmethod(fewShotCasesTable.removeFewShotCase)
    fewShotCases = staticmethod(fewShotCasesTable.fewShotCases)

    def _fewShotChild(self, inChild: bool) -> Optional[dict]:
        """Main thread: the child's settings (:meth:`_childSettings`) when few-shot work runs in a child, else
        None (``inChild`` off: a blocking call; or ``fewShotInSubprocess`` off)."""
        return self._childSettings() if inChild and self.fewShotInSubprocess else None

    def _trainJob(self, cases: Sequence, job: BackgroundJob, config=None, inChild: bool = False) -> Callable:
        """Read the cases (main thread); return the worker function that trains the head, here or in a child
        process (``inChild`` and ``fewShotInSubprocess``: the same head, handed back as a file)."""
        from anatomical_embedding.fewshot.head import FewShotConfig, train_head

        model = self._requireModel()
        images, labels, names, colors = fewShotCasesTable.fewShotData(cases)
        config = config or FewShotConfig()
        settings = self._fewShotChild(inChild)

        def work():
            if settings is not None:  # the voxel samples are kept in the disk cache instead of the memo below
                return self._runChild(job, FewShotProcess.training(images, labels, names, colors, config,
                                                                   **settings))
            model.set_memo(True)
            try:
                return train_head(model, images, labels, names, config, progress=job.report, colors=colors)
            finally:
                model.set_memo(False)

        def finish(head):
            self.head, self.headFile = head, None
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
        """Train in the background (progress, Cancel): in a child process with ``fewShotInSubprocess`` (inside
        Slicer), else in the worker thread; :meth:`finishJob` makes the head the one in memory."""
        job = BackgroundJob("Training the few-shot head")
        return self._submit(job, self._trainJob(cases, job, config, inChild=True))

    def loadHead(self, path):
        from anatomical_embedding.fewshot.head import FewShotHead

        self.head, self.headFile = FewShotHead.load(path), pathlib.Path(path).resolve()
        return self.head

    def saveHead(self, path, overwrite: bool = False) -> pathlib.Path:
        """Write the head in memory to ``path`` (FileExistsError for an existing file unless ``overwrite``)."""
        if self.head is None:
            raise ValueError("no few-shot head to save: train one first")
        self.headFile = pathlib.Path(self.head.save(path, overwrite=overwrite)).resolve()
        return self.headFile

    def headForApplying(self, path) -> object:
        """The head to apply: the file ``path`` when one is chosen and it is not the head in memory, else the head
        in memory (ValueError when there is neither)."""
        chosen = None if path is None or str(path) in ("", ".") else pathlib.Path(path)
        if chosen is not None and chosen.is_file() and chosen.resolve() != self.headFile:
            return self.loadHead(chosen)
        if self.head is None:
            raise ValueError("no few-shot head: train one, or choose a saved head file")
        return self.head

    def _applyJob(self, volumeNode, outputSegmentation, job: BackgroundJob, inChild: bool = False) -> Callable:
        """Read the volume (main thread); return the worker function that segments it, here or in a child process
        (as :meth:`_trainJob`); ``job.finish`` writes the segmentation node on the main thread."""
        from anatomical_embedding import mrml
        from anatomical_embedding.fewshot.head import apply_head

        model = self._requireModel()
        if self.head is None:
            raise RuntimeError("no few-shot head: train one (or load a saved .aehead) first")
        head = self.head
        image = mrml.node_to_volume(volumeNode)
        scene = volumeNode.GetScene()
        name = f"{volumeNode.GetName()} few-shot segmentation"
        settings = self._fewShotChild(inChild)

        def work():
            if settings is not None:
                return self._runChild(job, FewShotProcess.applying(image, head, **settings))
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
        """Segment in the background (progress, Cancel), in a child process like :meth:`trainFewShotHeadAsync`;
        :meth:`finishJob` writes the segmentation node."""
        job = BackgroundJob(f"Segmenting {volumeNode.GetName()}")
        return self._submit(job, self._applyJob(volumeNode, outputSegmentation, job, inChild=True))

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

