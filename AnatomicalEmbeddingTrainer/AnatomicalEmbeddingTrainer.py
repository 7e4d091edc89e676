"""AnatomicalEmbeddingTrainer: prepare training data in Slicer (training itself runs in the engine).

Training runs outside the Slicer process (one or many GPUs, torchrun), on a folder of image files.
This first version of the module builds that folder from the scene: each exported case is an
image in ``<folder>/images`` and, when a segmentation is given, a label map of the same name in
``<folder>/labels`` (with its segment names in a ``.labels.json`` sidecar), the layout that
``anatomical_embedding.data.DatasetSpec.from_path`` reads. Conversions go through
``anatomical_embedding.mrml``.
"""
import logging
import pathlib
import re
from typing import Optional

import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


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
Builds a training folder from scans (and optional segmentations) in the scene, in the layout the
AnatomicalEmbedding engine trains on: <i>images/</i> and <i>labels/</i> with matching file names.
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

    trainingVolume - scan to add to the training folder.
    trainingSegmentation - optional segmentation of that scan (its segments become label values 1..n).
    outputDirectory - the training folder.
    caseName - file name (without extension) of the exported case.
    overwrite - replace a case of the same name.
    """

    trainingVolume: vtkMRMLScalarVolumeNode
    trainingSegmentation: vtkMRMLSegmentationNode
    outputDirectory: pathlib.Path
    caseName: str = "case_001"
    overwrite: bool = False


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

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnatomicalEmbeddingTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = AnatomicalEmbeddingTrainerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

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
            self._checkCanExport()

    def _checkCanExport(self, caller=None, event=None) -> None:
        p = self._parameterNode
        problem = None
        if not p or not p.trainingVolume:
            problem = "Select a volume to export."
        elif not str(p.outputDirectory) or str(p.outputDirectory) == ".":
            problem = "Choose the training folder."
        elif not AnatomicalEmbeddingTrainerLogic.isValidCaseName(p.caseName):
            problem = "Case name may hold letters, digits, '-', '_' and '.' only."
        self.ui.exportCaseButton.enabled = problem is None
        self.ui.exportCaseButton.toolTip = problem or "Write the volume (and segmentation) into the training folder."

    def onExportCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not export the case.", waitCursor=True):
            paths = self.logic.exportCase(p.trainingVolume, p.trainingSegmentation, p.outputDirectory,
                                          p.caseName, overwrite=p.overwrite)
            self.ui.statusLabel.text = "Wrote " + ", ".join(str(v) for v in paths.values() if v)


#
# Logic
#
class AnatomicalEmbeddingTrainerLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return AnatomicalEmbeddingTrainerParameterNode(super().getParameterNode())

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


#
# Test (runs inside Slicer; the engine's own tests are the pytest suite under Testing/)
#
class AnatomicalEmbeddingTrainerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ExportCase()

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
