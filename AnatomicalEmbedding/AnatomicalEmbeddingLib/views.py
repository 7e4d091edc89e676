"""What the viewer shows: the similarity heatmap over the target, the results table, and jumping to a point."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import slicer
import vtk

from AnatomicalEmbeddingLib.matches import pointScores

HEATMAP_ATTRIBUTE = "AnatomicalEmbedding.heatmap"
RESULT_COLUMNS = ("label", "target", "R", "A", "S", "similarity", "confidence", "fb_distance_mm", "flag")
LOW_CONFIDENCE_TEXT = "low confidence"
#: Results-table columns that hold text (the others are numbers).
_TEXT_COLUMNS = ("label", "target", "flag")


# ---- heatmap ----------------------------------------------------------------------------------------
def showHeatmapVolume(heat, targetVolume, heatmapNode=None, opacity: float = 0.5):
    """Put the engine's heatmap volume ``heat`` into ``heatmapNode`` (created when None), coloured, over the target."""
    from anatomical_embedding import mrml

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
    showHeatmap(targetVolume, heatmapNode, opacity)
    return heatmapNode


def showHeatmap(targetVolume, heatmapNode, opacity: float) -> None:
    """Target as background and the heatmap as foreground in every slice view."""
    scene = targetVolume.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(targetVolume.GetID())
        composite.SetForegroundVolumeID(heatmapNode.GetID())
        composite.SetForegroundOpacity(float(opacity))


def setHeatmapOpacity(heatmapNode, opacity: float) -> None:
    if heatmapNode is None or heatmapNode.GetScene() is None:
        return
    scene = heatmapNode.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == heatmapNode.GetID():
            composite.SetForegroundOpacity(float(opacity))


# ---- results table ----------------------------------------------------------------------------------
def updateResultsTable(tableNode, targetMarkupsNodes: Sequence):
    """Rewrite ``tableNode`` (created when None) with one row per matched point of the given lists."""
    if tableNode is None:
        scene = next(n for n in targetMarkupsNodes if n is not None).GetScene()
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "Correspondence results")
    table = vtk.vtkTable()
    columns = {}
    for name in RESULT_COLUMNS:
        array = vtk.vtkStringArray() if name in _TEXT_COLUMNS else vtk.vtkDoubleArray()
        array.SetName(name)
        table.AddColumn(array)
        columns[name] = array
    for node in targetMarkupsNodes:
        if node is None:
            continue
        for i in range(node.GetNumberOfControlPoints()):
            scores = pointScores(node, i)
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


def resultsTableRows(tableNode) -> list:
    table = tableNode.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for c, name in enumerate(names):
            value = table.GetValue(r, c)
            row[name] = value.ToString() if name in _TEXT_COLUMNS else value.ToDouble()
        rows.append(row)
    return rows


# ---- navigation -------------------------------------------------------------------------------------
def jumpToResult(tableNode, row: int) -> Optional[np.ndarray]:
    if tableNode is None or row < 0 or row >= tableNode.GetTable().GetNumberOfRows():
        return None
    r = resultsTableRows(tableNode)[row]
    return jumpToPoint([r["R"], r["A"], r["S"]])


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
