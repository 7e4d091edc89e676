"""Few-shot training cases: the (volume, segmentation) table node, and reading its cases for the engine."""
from __future__ import annotations

import logging
from typing import Sequence

import vtk

CASE_VOLUME_ROLE = "AnatomicalEmbeddingCaseVolume"
CASE_SEGMENTATION_ROLE = "AnatomicalEmbeddingCaseSegmentation"
CASE_COUNT_ATTRIBUTE = "AnatomicalEmbedding.caseCount"


def caseRole(role: str, row: int) -> str:
    return f"{role}{row}"


def showColumnNamesAsHeader(tableNode) -> None:
    """Column names in the table view's header, not in a first data row: otherwise qMRMLTableModel shows them as
    row 0 and a view row is the table row + 1 (a click on a row would pick the next one)."""
    if hasattr(tableNode, "SetUseColumnTitleAsColumnHeader"):
        tableNode.SetUseColumnTitleAsColumnHeader(True)
    else:  # Slicer before 5.6 names it after the column name
        tableNode.SetUseColumnNameAsColumnHeader(True)


def addFewShotCase(tableNode, volumeNode, segmentationNode):
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
    cases = fewShotCases(tableNode)
    if any(v is volumeNode and s is segmentationNode for v, s in cases):
        return tableNode
    cases.append((volumeNode, segmentationNode))
    writeCases(tableNode, cases)
    return tableNode


def removeFewShotCase(tableNode, row: int) -> None:
    cases = fewShotCases(tableNode)
    if 0 <= row < len(cases):
        del cases[row]
        writeCases(tableNode, cases)


def writeCases(tableNode, cases: list) -> None:
    from anatomical_embedding import mrml

    old = int(tableNode.GetAttribute(CASE_COUNT_ATTRIBUTE) or 0)
    for row in range(old):
        tableNode.RemoveNodeReferenceIDs(caseRole(CASE_VOLUME_ROLE, row))
        tableNode.RemoveNodeReferenceIDs(caseRole(CASE_SEGMENTATION_ROLE, row))
    table = vtk.vtkTable()
    columns = []
    for name in ("volume", "segmentation", "segments"):
        array = vtk.vtkStringArray()
        array.SetName(name)
        table.AddColumn(array)
        columns.append(array)
    for row, (volume, seg) in enumerate(cases):
        tableNode.SetNodeReferenceID(caseRole(CASE_VOLUME_ROLE, row), volume.GetID())
        tableNode.SetNodeReferenceID(caseRole(CASE_SEGMENTATION_ROLE, row), seg.GetID())
        columns[0].InsertNextValue(volume.GetName())
        columns[1].InsertNextValue(seg.GetName())
        columns[2].InsertNextValue(", ".join(mrml.segment_names(seg)))
    tableNode.SetAttribute(CASE_COUNT_ATTRIBUTE, str(len(cases)))
    tableNode.SetAndObserveTable(table)
    showColumnNamesAsHeader(tableNode)
    tableNode.SetLocked(True)


def fewShotCases(tableNode) -> list:
    """(volume node, segmentation node) pairs of the cases table; rows with a deleted node are skipped."""
    if tableNode is None:
        return []
    cases = []
    for row in range(int(tableNode.GetAttribute(CASE_COUNT_ATTRIBUTE) or 0)):
        volume = tableNode.GetNodeReference(caseRole(CASE_VOLUME_ROLE, row))
        seg = tableNode.GetNodeReference(caseRole(CASE_SEGMENTATION_ROLE, row))
        if volume is None or seg is None:
            logging.warning("Few-shot case %d of %s lost its volume or segmentation; skipped", row,
                            tableNode.GetName())
            continue
        cases.append((volume, seg))
    return cases


def fewShotData(cases: Sequence) -> tuple:
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
