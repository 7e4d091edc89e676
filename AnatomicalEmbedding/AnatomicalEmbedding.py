"""AnatomicalEmbedding: the viewer module (correspondence and few-shot segmentation in Slicer).

The engine (``anatomical_embedding``, next to this file) does the work; this module only moves
data between the scene and the engine through ``anatomical_embedding.mrml``. This first version
holds the model and correspondence selections and loads a synthetic phantom pair into the scene;
matching and few-shot segmentation are added to the logic (and only then to the panel) later.
"""
import importlib
import logging
import pathlib
import tempfile
from typing import Annotated, Optional

import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode
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
DEVICES = ["cpu", "cuda"]


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
Pick a model, a source and a target scan; landmarks placed on the source are matched in the target.
Use <i>Load phantom pair</i> to try the module on two synthetic torso scans with organ segmentations
and landmarks.
"""
        self.parent.acknowledgementText = """
Methods: AEFM (Zhuang et al.), Adam/Eve (Hosseinzadeh Taher et al.), AnatoMask (Li et al.),
HDSSL (Kats et al.). See the extension's README for references.
"""


#
# Parameter node
#
@parameterNodeWrapper
class AnatomicalEmbeddingParameterNode:
    """Module state saved in the scene.

    modelPath - exported model (.onnx) or checkpoint (.pt) to compute embeddings with.
    backend, device - how to run it (ONNX Runtime needs no PyTorch).
    sourceVolume, targetVolume - the scans to match between.
    sourceLandmarks, targetLandmarks - points clicked on the source; matches go to the target list.
    phantomSeed - random seed of the synthetic phantom pair.
    """

    modelPath: pathlib.Path
    backend: Annotated[str, Choice(BACKENDS)] = "ONNX Runtime"
    device: Annotated[str, Choice(DEVICES)] = "cpu"
    sourceVolume: vtkMRMLScalarVolumeNode
    targetVolume: vtkMRMLScalarVolumeNode
    sourceLandmarks: vtkMRMLMarkupsFiducialNode
    targetLandmarks: vtkMRMLMarkupsFiducialNode
    phantomSeed: Annotated[int, WithinRange(0, 1000000)] = 0


#
# Widget
#
class AnatomicalEmbeddingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomicalEmbedding.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatomicalEmbeddingLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadPhantomPairButton.connect("clicked(bool)", self.onLoadPhantomPair)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: Optional[AnatomicalEmbeddingParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are connected to the fields.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def onLoadPhantomPair(self) -> None:
        if not self.logic.ensureEngineDependencies(askUser=True):
            return
        with slicer.util.tryWithErrorDisplay("Could not load the phantom pair.", waitCursor=True):
            source, target = self.logic.loadPhantomPair(seed=self._parameterNode.phantomSeed)
            self._parameterNode.sourceVolume = source["volume"]
            self._parameterNode.targetVolume = target["volume"]
            self._parameterNode.sourceLandmarks = source["landmarks"]
            # The target's true landmarks stay in the scene as reference; matched points will go to a
            # separate list, so targetLandmarks is left for the user (or the matching step) to choose.
            slicer.util.setSliceViewerLayers(background=source["volume"], fit=True)


#
# Logic
#
class AnatomicalEmbeddingLogic(ScriptedLoadableModuleLogic):
    """Scene-level operations; all conversions go through ``anatomical_embedding.mrml``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AnatomicalEmbeddingParameterNode(super().getParameterNode())

    @staticmethod
    def missingEnginePackages() -> list:
        """pip requirements of engine packages that cannot be imported in this Python."""
        missing = []
        for module, requirement in ENGINE_PACKAGES:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(requirement)
        return missing

    def ensureEngineDependencies(self, askUser: bool = True) -> bool:
        """Install missing engine packages with pip (after asking, unless askUser is False)."""
        missing = self.missingEnginePackages()
        if not missing:
            return True
        if askUser and not slicer.util.confirmOkCancelDisplay(
                "AnatomicalEmbedding needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
            return False
        slicer.util.pip_install(missing)
        return not self.missingEnginePackages()

    def loadPhantomPair(self, seed: int = 0, outputDir: Optional[str] = None, scene=None) -> list:
        """Generate two synthetic torso scans and load each as volume, segmentation and landmarks.

        Returns one dict per subject with the "volume", "segmentation" and "landmarks" nodes.
        """
        from anatomical_embedding import io, mrml, phantoms
        from anatomical_embedding.io.labelmaps import read_labelmap

        scene = scene or slicer.mrmlScene
        if outputDir is None:
            outputDir = tempfile.mkdtemp(prefix="AnatomicalEmbeddingPhantoms-", dir=slicer.app.temporaryPath)
        # workers=1: worker processes would start new Slicer instances (sys.executable is Slicer).
        manifest = phantoms.generate_cohort(pathlib.Path(outputDir), n=2, seed=int(seed), workers=1)
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


#
# Test (runs inside Slicer; the engine's own tests are the pytest suite under Testing/)
#
class AnatomicalEmbeddingTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LoadPhantomPair()

    def test_LoadPhantomPair(self):
        """The phantom pair arrives in the scene with the geometry, segments and landmarks of its files."""
        import numpy as np

        from anatomical_embedding import io, mrml, phantoms
        from anatomical_embedding.io.labelmaps import read_labelmap

        self.delayDisplay("Loading phantom pair")
        logic = AnatomicalEmbeddingLogic()
        self.assertTrue(logic.ensureEngineDependencies(askUser=False))
        outputDir = tempfile.mkdtemp(prefix="AnatomicalEmbeddingTest-", dir=slicer.app.temporaryPath)
        cases = logic.loadPhantomPair(seed=1, outputDir=outputDir)
        self.assertEqual(len(cases), 2)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), 2)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 2)

        cohort = phantoms.load_cohort(pathlib.Path(outputDir))
        self.assertEqual(len(cohort.subjects), 2)
        for case, subject in zip(cases, cohort.subjects):
            image = io.read_image(subject.image_path)
            np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["volume"]), image.array)
            ijkToRas = vtk.vtkMatrix4x4()
            case["volume"].GetIJKToRASMatrix(ijkToRas)
            np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijkToRas), image.ijk_to_world("RAS"), atol=1e-4)
            names = {int(v): n for v, n in cohort.label_names.items()}
            self.assertEqual(mrml.segment_names(case["segmentation"]), [names[v] for v in sorted(names)])
            label, _ = read_labelmap(subject.label_path)
            back, _ = mrml.segmentation_node_to_labelmap(case["segmentation"], case["volume"], names)
            np.testing.assert_array_equal(back.array, label.array)
            landmarkNames = list(subject.landmarks)
            lps = np.stack([np.asarray(subject.landmarks[k], float) for k in landmarkNames])
            np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(case["landmarks"]),
                                       io.convert_points(lps, "LPS", "RAS"), atol=1e-6)

        self.delayDisplay("Widget selections follow the parameter node")
        slicer.util.selectModule("AnatomicalEmbedding")  # enter() connects the GUI to the parameter node
        widget = slicer.modules.anatomicalembedding.widgetRepresentation().self()
        parameterNode = widget.logic.getParameterNode()
        parameterNode.sourceVolume = cases[0]["volume"]
        self.assertEqual(widget.ui.sourceVolumeSelector.currentNode(), cases[0]["volume"])
        self.delayDisplay("Test passed")
