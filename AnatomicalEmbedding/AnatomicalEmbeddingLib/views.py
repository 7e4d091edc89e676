"""What the viewer shows: the similarity heatmap over the target, the results table, and jumping to a point."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import slicer
import vtk

from AnatomicalEmbeddingLib.cases import showColumnNamesAsHeader
from AnatomicalEmbeddingLib.matches import pointScores

HEATMAP_ATTRIBUTE = "AnatomicalEmbedding.heatmap"
RESULT_COLUMNS = ("label", "target", "R", "A", "S", "similarity", "confidence", "fb_distance_mm", "flag")
LOW_CONFIDENCE_TEXT = "low confidence"
#: Results-table columns that hold text (the others are numbers).
_TEXT_COLUMNS = ("label", "target", "flag")


# ---- correspondence layout --------------------------------------------------------------------------
#: Slice views of the correspondence layout: the top row shows the source, the bottom row the target.
SOURCE_VIEWS = ("AESourceAxial", "AESourceSagittal", "AESourceCoronal")
TARGET_VIEWS = ("AETargetAxial", "AETargetSagittal", "AETargetCoronal")
_ORIENTATIONS = ("Axial", "Sagittal", "Coronal")
#: Layout ID of the correspondence layout (custom layouts use IDs above Slicer's built-in ones).
CORRESPONDENCE_LAYOUT_ID = 5019
#: Role attribute on the slice nodes of the layout ("source" or "target").
VIEW_ROLE_ATTRIBUTE = "AnatomicalEmbedding.viewRole"


def correspondenceLayoutXml() -> str:
    """Slicer layout description: two rows of three slice views (source on top, target below)."""
    def row(names, color, label):
        items = "".join(
            f'<item><view class="vtkMRMLSliceNode" singletontag="{n}">'
            f'<property name="orientation" action="default">{o}</property>'
            f'<property name="viewlabel" action="default">{label}{k + 1}</property>'
            f'<property name="viewcolor" action="default">{color}</property>'
            f'<property name="viewgroup" action="default">{0 if label == "S" else 1}</property></view></item>'
            for k, (n, o) in enumerate(zip(names, _ORIENTATIONS)))
        return f'<item><layout type="horizontal">{items}</layout></item>'
    return ('<layout type="vertical">' + row(SOURCE_VIEWS, "#4a90d9", "S")
            + row(TARGET_VIEWS, "#e0a030", "T") + "</layout>")


def _compositeByLayoutName(scene, name: str):
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if node.GetLayoutName() == name:
            return node
    return None


def _sliceByLayoutName(scene, name: str):
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
        if node.GetLayoutName() == name:
            return node
    return None


def setupCorrespondenceLayout(sourceVolume, targetVolume) -> dict:
    """Show source and target side by side: each row of slice views is bound to one volume.

    In Slicer the layout manager creates the six views (slice + composite nodes); headless (slicer-core), the
    nodes are created here the way the slice logic would. Returns {"source": [composite...], "target": [...]}.
    The target rows get no foreground until a heatmap is shown; the source rows never get one.
    """
    scene = sourceVolume.GetScene()
    layoutManager = None
    try:
        layoutManager = slicer.app.layoutManager()
    except AttributeError:  # no application (slicer-core)
        layoutManager = None
    if layoutManager is not None:
        layoutNode = layoutManager.layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(CORRESPONDENCE_LAYOUT_ID):
            layoutNode.AddLayoutDescription(CORRESPONDENCE_LAYOUT_ID, correspondenceLayoutXml())
        layoutManager.setLayout(CORRESPONDENCE_LAYOUT_ID)
    out = {"source": [], "target": []}
    for role, names, volume in (("source", SOURCE_VIEWS, sourceVolume), ("target", TARGET_VIEWS, targetVolume)):
        for name, orientation in zip(names, _ORIENTATIONS):
            sliceNode = _sliceByLayoutName(scene, name)
            if sliceNode is None:
                sliceNode = scene.CreateNodeByClass("vtkMRMLSliceNode")  # with the scene's defaults (presets)
                sliceNode.UnRegister(None)
                sliceNode.SetLayoutName(name)  # also the singleton tag, as the layout manager sets it
                sliceNode.SetName(name)
                sliceNode = scene.AddNode(sliceNode)
                if sliceNode.HasSliceOrientationPreset(orientation):  # presets exist in Slicer, not headless
                    sliceNode.SetOrientation(orientation)
            sliceNode.SetAttribute(VIEW_ROLE_ATTRIBUTE, role)
            composite = _compositeByLayoutName(scene, name)
            if composite is None:
                composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
                composite.UnRegister(None)
                composite.SetLayoutName(name)
                composite = scene.AddNode(composite)
            composite.SetBackgroundVolumeID(volume.GetID() if volume is not None else None)
            composite.SetForegroundVolumeID(None)
            composite.SetLabelVolumeID(None)
            out[role].append(composite)
    return out


def correspondenceViews(scene, role: str) -> list:
    """Composite nodes of the layout's ``role`` row ("source" or "target"); empty when the layout was never set up."""
    names = SOURCE_VIEWS if role == "source" else TARGET_VIEWS
    return [c for c in (_compositeByLayoutName(scene, n) for n in names) if c is not None]


def correspondenceSliceNodeIDs(scene, role: str) -> list:
    names = SOURCE_VIEWS if role == "source" else TARGET_VIEWS
    return [s.GetID() for s in (_sliceByLayoutName(scene, n) for n in names) if s is not None]


def restrictMarkupsToViews(markupsNode, scene, role: str) -> Optional[tuple]:
    """Draw a point list only in the ``role`` row (source points on the source, matches on the target).

    Returns ``(display node, its previous view node IDs)`` for :func:`restoreMarkupsViews` (the restriction is
    saved with the scene, so click mode undoes it when it stops), or None when nothing was changed.
    """
    ids = correspondenceSliceNodeIDs(scene, role)
    if markupsNode is None or not ids:
        return None
    if markupsNode.GetDisplayNode() is None:
        markupsNode.CreateDefaultDisplayNodes()
    display = markupsNode.GetDisplayNode()
    previous = tuple(display.GetViewNodeIDs())  # empty: every view
    # 3D views keep showing the points (only the slice rows are split between source and target).
    threeD = [scene.GetNthNodeByClass(i, "vtkMRMLViewNode").GetID()
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLViewNode"))]
    display.SetViewNodeIDs(ids + threeD)
    return display, previous


def restoreMarkupsViews(saved: Optional[tuple]) -> None:
    """Undo :func:`restrictMarkupsToViews` (a display node removed from the scene meanwhile is skipped)."""
    if saved is None:
        return
    display, previous = saved
    if display.GetScene() is not None:
        display.SetViewNodeIDs(list(previous))


def startPlaceMode(markupsNode) -> Optional[tuple]:
    """Persistent Markups place mode into ``markupsNode`` (the Markups logic's calls, as the toolbar makes).

    Returns ``(interaction node, its previous place-mode persistence)`` for :func:`stopPlaceMode`, or None
    when the scene has no interaction node.
    """
    markupsLogic = slicer.modules.markups.logic()
    interaction = markupsNode.GetScene().GetNodeByID("vtkMRMLInteractionNodeSingleton")
    if interaction is None:
        return None
    persistence = interaction.GetPlaceModePersistence()
    markupsLogic.SetActiveList(markupsNode)
    markupsLogic.StartPlaceMode(True)
    return interaction, persistence


def stopPlaceMode(saved: Optional[tuple]) -> None:
    """Leave the place mode of :func:`startPlaceMode`: back to view transform, persistence as it was (else
    every later click would keep adding points to the list)."""
    if saved is None:
        return
    interaction, persistence = saved
    interaction.SetPlaceModePersistence(persistence)
    if interaction.GetCurrentInteractionMode() == interaction.Place:
        interaction.SetCurrentInteractionMode(interaction.ViewTransform)


# ---- heatmap ----------------------------------------------------------------------------------------
#: The heatmap grid: the coarse grid upsampled this many times (1: the coarse cells themselves, with Slicer's
#: display interpolation on). Its cost is that of the coarse map, independent of the target's voxel count.
HEATMAP_UPSAMPLE = 1


def coarseSimilarity(matcher, pointRas, upsample: int = HEATMAP_UPSAMPLE):
    """Cosine similarity of the source point's coarse vector to the target's coarse map, as an engine Volume on
    the coarse grid (world geometry of the target's embedding). Raises ValueError outside the source."""
    from anatomical_embedding.inference.embedding import upsample_linear
    from anatomical_embedding.io import convert_points

    lps = convert_points(np.asarray(pointRas, float), "RAS", "LPS")
    source, target = matcher.source, matcher.target
    q = np.atleast_2d(source.world_to_index(lps))
    if not source.inside(q)[0]:
        raise ValueError(f"heatmap query {np.round(pointRas, 2).tolist()} RAS is outside the source image")
    qc = source.sample_coarse(q)[0]
    u = max(1, int(upsample))
    sim = upsample_linear(np.einsum("c,ckji->kji", qc, target.coarse), u) / target.upsampled_norms(u)
    sim = np.where(target.upsampled_valid_mask(u), sim, -1.0)
    return target.coarse_volume(sim, u)


def showHeatmapVolume(heat, targetVolume, heatmapNode=None, opacity: float = 0.5):
    """Put the engine's heatmap volume ``heat`` into ``heatmapNode`` (created when None), coloured, over the target.

    ``heat`` stays on its own (coarse) grid: Slicer reslices the foreground layer for display, so there is no
    resampling to the target grid. The node is hidden from node selectors (never offered as a source or target).
    """
    from anatomical_embedding import mrml

    scene = targetVolume.GetScene()
    if heatmapNode is not None and heatmapNode.GetAttribute(HEATMAP_ATTRIBUTE) is None:
        # Never overwrite a volume this module did not make (a scan chosen by mistake in an older version's
        # heatmap selector, kept in a saved scene): its voxels would be replaced by the similarity map.
        logging.warning("%s is not a heatmap of this module; the heatmap goes to a new volume", heatmapNode.GetName())
        heatmapNode = None
    if heatmapNode is None:
        heatmapNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{targetVolume.GetName()} similarity")
    mrml.set_node_from_volume(heatmapNode, heat)
    heatmapNode.SetAttribute(HEATMAP_ATTRIBUTE, targetVolume.GetID())
    heatmapNode.SetHideFromEditors(True)
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
    display.SetInterpolate(1)
    showHeatmap(targetVolume, heatmapNode, opacity)
    return heatmapNode


def showHeatmap(targetVolume, heatmapNode, opacity: float) -> None:
    """The heatmap as foreground over the target, in the target's views only.

    Views of the correspondence layout's target row always get it; any other view gets it only when it
    already shows the target as background. Views showing the source (or anything else) are left alone, so a
    click in a source view is always a click on source anatomy.
    """
    scene = targetVolume.GetScene()
    sourceRow = {c.GetID() for c in correspondenceViews(scene, "source")}
    targetRow = {c.GetID() for c in correspondenceViews(scene, "target")}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetID() in sourceRow:
            continue
        if composite.GetID() in targetRow:
            composite.SetBackgroundVolumeID(targetVolume.GetID())
        elif composite.GetBackgroundVolumeID() != targetVolume.GetID():
            continue
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
    """Rewrite ``tableNode`` (created when None) with one row per matched point of the given lists; None when
    there is no table and no list to make one for."""
    if tableNode is None:
        scene = next((n.GetScene() for n in targetMarkupsNodes if n is not None), None)
        if scene is None:  # no list (e.g. the "Matched points" selector was cleared): no table to make
            return None
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
    showColumnNamesAsHeader(tableNode)
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
