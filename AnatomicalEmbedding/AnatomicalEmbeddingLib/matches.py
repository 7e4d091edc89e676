"""Matched points on markups lists: the target list, each point's scores (JSON description) and its colour."""
from __future__ import annotations

import json
from typing import Optional

import numpy as np
import vtk

#: Attribute / description keys written on matched points and nodes.
SCORES_ATTRIBUTE = "AnatomicalEmbedding.matches"
SOURCE_ATTRIBUTE = "AnatomicalEmbedding.sourceMarkups"
TARGET_VOLUME_ATTRIBUTE = "AnatomicalEmbedding.targetVolume"
#: Colour of matched points. Low confidence is a score (description JSON, results-table flag, status line), never
#: the user-editable selected state; LOW_CONFIDENCE_COLOR is the list's unselected colour and the table's flag colour.
MATCH_COLOR = (0.2, 0.9, 0.3)
LOW_CONFIDENCE_COLOR = (1.0, 0.5, 0.0)


def defaultTargetMarkups(targetVolume, scene=None):
    scene = scene or targetVolume.GetScene()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{targetVolume.GetName()} matches")
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetSelectedColor(*MATCH_COLOR)
    node.GetDisplayNode().SetColor(*LOW_CONFIDENCE_COLOR)
    return node


def existingTargetMarkups(targetVolume, sourceNodeId: str):
    """The list that already holds the matches of source list ``sourceNodeId`` in ``targetVolume`` (None if none):
    transferring again updates it instead of adding another "<volume> matches" list."""
    scene = targetVolume.GetScene()
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsFiducialNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLMarkupsFiducialNode")
        if (node.GetAttribute(SOURCE_ATTRIBUTE) == sourceNodeId
                and node.GetAttribute(TARGET_VOLUME_ATTRIBUTE) == targetVolume.GetID()):
            return node
    return None


def bindTargetMarkups(targetMarkups, sourceNodeId: str, targetVolume) -> None:
    """Mark ``targetMarkups`` as the list of the matches of source list ``sourceNodeId`` in ``targetVolume``
    (what :func:`storeMatch` writes with each match): done when click mode starts, so an empty list is bound too."""
    targetMarkups.SetAttribute(SOURCE_ATTRIBUTE, sourceNodeId)
    targetMarkups.SetAttribute(TARGET_VOLUME_ATTRIBUTE, targetVolume.GetID())


def targetMarkupsFor(targetVolume, sourceNodeId: Optional[str], targetMarkups=None):
    """The list that receives the matches of source list ``sourceNodeId`` in ``targetVolume``.

    ``targetMarkups`` (the "Matched points" selector) when it is not bound, or bound to this source list and
    target; a list that holds the matches in another volume, or of another source list, is left alone (writing
    these matches into it would replace its points with positions in the wrong volume, or mix two lists' points
    that share a label). Instead: the list already bound to (source, target) (:func:`existingTargetMarkups`), or
    None, where the caller creates one (:func:`defaultTargetMarkups`). None stays None: a cleared selector asks
    for a new list.
    """
    if targetVolume is None or targetMarkups is None:
        return targetMarkups
    source = targetMarkups.GetAttribute(SOURCE_ATTRIBUTE)
    if (targetMarkups.GetAttribute(TARGET_VOLUME_ATTRIBUTE) in (None, "", targetVolume.GetID())
            and (sourceNodeId is None or source in (None, "", sourceNodeId))):
        return targetMarkups
    if sourceNodeId is None or targetVolume.GetScene() is None:
        return None
    return existingTargetMarkups(targetVolume, sourceNodeId)


def pointScores(markupsNode, index: int) -> dict:
    """Scores stored on a matched control point (its description holds them as JSON)."""
    text = markupsNode.GetNthControlPointDescription(index)
    try:
        data = json.loads(text) if text else {}
    except json.JSONDecodeError:
        data = {}
    return data if isinstance(data, dict) else {}


def storeMatch(targetMarkups, label: str, sourceId: str, sourceNodeId: str, match, seconds: float, targetVolume,
               lowConfidence: float) -> dict:
    """Write one engine match into ``targetMarkups`` (position, label, scores, low-confidence flag)."""
    from anatomical_embedding.io import convert_points

    ras = convert_points(match.point_lps, "LPS", "RAS")
    # the engine may flag a match itself (a raw fallback, a target without structure), whatever its confidence
    low = bool(getattr(match, "low_confidence", False) or (match.confidence is not None and match.confidence < lowConfidence))
    # sourceRAS: where the source point was (world) when matched, so a restart of click mode can tell a moved one.
    scores = {"source": sourceNodeId, "sourcePointID": sourceId, "target": targetVolume.GetID(),
              "sourceRAS": [round(float(x), 4) for x in convert_points(match.query_lps, "LPS", "RAS")],
              "similarity": round(float(match.similarity), 5),
              "confidence": None if match.confidence is None else round(float(match.confidence), 5),
              "fb_distance_mm": None if match.fb_distance_mm is None else round(float(match.fb_distance_mm), 3),
              "low_confidence": low, "method": match.method}
    # The point that belongs to this source point: same source ID, else same label, else a new one.
    index = -1
    for i in range(targetMarkups.GetNumberOfControlPoints()):
        if pointScores(targetMarkups, i).get("sourcePointID") == sourceId:
            index = i
            break
    if index < 0:
        index = targetMarkups.GetControlPointIndexByLabel(label)
    wasModifying = targetMarkups.StartModify()
    try:
        # World coordinates (the list may sit under a transform): matches are read back with the World getters.
        if index < 0:
            index = targetMarkups.AddControlPointWorld(vtk.vtkVector3d(*ras), label)
        else:
            targetMarkups.SetNthControlPointPositionWorld(index, *ras)
            targetMarkups.SetNthControlPointLabel(index, label)
        targetMarkups.SetNthControlPointDescription(index, json.dumps(scores))
        all_scores = json.loads(targetMarkups.GetAttribute(SCORES_ATTRIBUTE) or "{}")
        all_scores[targetMarkups.GetNthControlPointID(index)] = {"label": label, **scores}
        targetMarkups.SetAttribute(SCORES_ATTRIBUTE, json.dumps(all_scores))
        targetMarkups.SetAttribute(SOURCE_ATTRIBUTE, sourceNodeId)
        targetMarkups.SetAttribute(TARGET_VOLUME_ATTRIBUTE, targetVolume.GetID())
    finally:
        targetMarkups.EndModify(wasModifying)
    return {"label": label, "index": index, "ras": ras, "query_ras": convert_points(match.query_lps, "LPS", "RAS"),
            "similarity": float(match.similarity), "confidence": float(match.confidence or 0.0),
            "low_confidence": low, "seconds": seconds, "target_markups": targetMarkups}


#: How far (mm, world) a source point may be from where it was matched and still count as matched (the stored
#: position is rounded to 0.1 micrometre).
MOVED_TOLERANCE_MM = 1e-3


def sourcePointsToMatch(sourceMarkups, targetMarkups, targetVolume) -> list[str]:
    """Control point IDs of the defined points of ``sourceMarkups`` whose match in ``targetVolume`` is missing from
    ``targetMarkups`` or out of date, in list order: no point of ``targetMarkups`` holds that point's match (by
    source point ID), or the source point was moved (its world position is not the ``sourceRAS`` stored with the
    match) or renamed since. A match stored without ``sourceRAS`` (written by an earlier version) counts as
    current wherever the point is."""
    current = {}
    for i in range(targetMarkups.GetNumberOfControlPoints() if targetMarkups is not None else 0):
        scores = pointScores(targetMarkups, i)
        pid = scores.get("sourcePointID")
        if pid and scores.get("source") in (None, sourceMarkups.GetID()) and \
                scores.get("target") in (None, targetVolume.GetID()):
            current[pid] = (scores.get("sourceRAS"), targetMarkups.GetNthControlPointLabel(i))
    out = []
    for i in range(sourceMarkups.GetNumberOfControlPoints()):
        if sourceMarkups.GetNthControlPointPositionStatus(i) != sourceMarkups.PositionDefined:
            continue
        pid = sourceMarkups.GetNthControlPointID(i)
        match = current.get(pid)
        if match is not None and match[1] == sourceMarkups.GetNthControlPointLabel(i):
            if match[0] is None:
                continue
            ras = np.zeros(3)
            sourceMarkups.GetNthControlPointPositionWorld(i, ras)
            if np.abs(ras - np.asarray(match[0], dtype=float)).max() <= MOVED_TOLERANCE_MM:
                continue
        out.append(pid)
    return out
