"""Bridge between engine objects and Slicer MRML nodes (volumes, segmentations, markups).

Uses only classes that both Slicer and the ``slicer-core`` wheel provide (``slicer.vtkMRML*``,
``vtkSlicerSegmentationsModuleLogic``'s static import/export, ``slicer.util`` array helpers
that take a node), so the same code runs inside Slicer and in the headless test suite. It never
touches ``slicer.mrmlScene`` or ``slicer.app``: every function is given its scene.

Frames: engine objects are LPS (:class:`~anatomical_embedding.io.Volume`, point arrays); MRML
nodes are RAS. The conversion happens here and only through :func:`io.convert_points` /
:func:`io.convert_matrix`. Volume arrays are ``[k, j, i]`` on both sides, so nothing is transposed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from anatomical_embedding.io import Volume, convert_matrix, convert_points
from anatomical_embedding.io.labelmaps import default_color

SCALAR_VOLUME = "vtkMRMLScalarVolumeNode"
LABELMAP_VOLUME = "vtkMRMLLabelMapVolumeNode"


def _slicer():
    # Imported lazily: the engine must stay importable where Slicer/slicer-core is absent.
    import slicer

    return slicer


# ---- volumes --------------------------------------------------------------------------------
def _vtk_safe_array(array: np.ndarray) -> np.ndarray:
    """Cast dtypes VTK volumes cannot hold (bool, 64-bit ints, float16) to ones they can."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return a.astype(np.uint8)
    if a.dtype == np.float16:
        return a.astype(np.float32)
    if a.dtype in (np.int64, np.uint64):
        # slicer.util refuses VTK_LONG_LONG (not rendered correctly); labels and CT fit in int32.
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError("64-bit integer volume exceeds the int32 range; cast it to float64 first")
        return a.astype(np.int32)
    return a


def set_node_from_volume(node, volume: Volume) -> None:
    """Write voxels and geometry of ``volume`` into an existing volume node."""
    slicer = _slicer()
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(volume.ijk_to_world("RAS")))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(_vtk_safe_array(volume.array)))


def volume_to_node(volume: Volume, scene, name: str = "Volume", node_class: str = SCALAR_VOLUME,
                   display: bool = True):
    """Add a volume node (scalar by default, or ``vtkMRMLLabelMapVolumeNode``) holding ``volume``."""
    node = scene.AddNewNodeByClass(node_class, name)
    set_node_from_volume(node, volume)
    if display:
        node.CreateDefaultDisplayNodes()
    return node


def _ijk_to_world_ras(node) -> np.ndarray:
    """IJK-to-RAS of a volume node including a parent linear transform (non-linear ones refused)."""
    slicer = _slicer()
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"volume node {node.GetName()!r} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def node_to_volume(node) -> Volume:
    """Copy of a volume node as a :class:`Volume` (LPS); parent linear transforms are applied."""
    slicer = _slicer()
    if node is None or node.GetImageData() is None:
        raise ValueError("volume node is missing or holds no image data")
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    if array.ndim != 3:
        raise ValueError(f"volume node {node.GetName()!r} has {array.ndim}D voxels; only scalar volumes are supported")
    m = convert_matrix(_ijk_to_world_ras(node), "RAS", "LPS")
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    return Volume(array, spacing, m[:3, 3], m[:3, :3] / spacing)


def _reference_node(reference, scene, temporary: list):
    """A volume node for ``reference`` (a node is used as is; a Volume becomes a temporary node)."""
    if isinstance(reference, Volume):
        node = volume_to_node(reference.with_array(np.zeros(reference.array.shape, np.uint8)), scene,
                              "__ae_reference__", display=False)
        temporary.append(node)
        return node
    return reference


def _remove_nodes(scene, nodes: Sequence) -> None:
    """Remove temporary nodes with their display, storage and colour nodes we created for them."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for i in reversed(range(node.GetNumberOfDisplayNodes())):
                dn = node.GetNthDisplayNode(i)
                if dn is not None:
                    scene.RemoveNode(dn)
        if hasattr(node, "GetNumberOfStorageNodes"):
            for i in reversed(range(node.GetNumberOfStorageNodes())):
                sn = node.GetNthStorageNode(i)
                if sn is not None:
                    scene.RemoveNode(sn)
        scene.RemoveNode(node)


# ---- segmentations --------------------------------------------------------------------------
def _colour_table(scene, names: Mapping[int, str], colors: Mapping[int, Sequence[float]] | None):
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "__ae_labels__")
    table.SetTypeToUser()
    table.SetHideFromEditors(True)
    n = max(names, default=0) + 1
    table.SetNumberOfColors(n)
    table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, n):
        if value in names:
            rgb = list(colors[value])[:3] if colors and value in colors else default_color(value)
            table.SetColor(value, names[value], *[float(c) for c in rgb], 1.0)
        else:
            table.SetColor(value, f"label_{value}", 0.5, 0.5, 0.5, 1.0)
    return table


def labelmap_to_segmentation_node(label_volume: Volume, names: Mapping[int, str], scene,
                                  name: str = "Segmentation",
                                  colors: Mapping[int, Sequence[float]] | None = None,
                                  reference_node=None):
    """Add a segmentation node with one segment per label value (named by ``names``).

    Uses ``vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode`` with a temporary
    colour table, which is how Slicer names imported segments; segments come in ascending label
    value and keep the value as their label value. Named values absent from the volume become
    empty segments, so the segment list always matches ``names``. ``reference_node`` (a volume
    node) sets the segmentation's reference geometry; otherwise the label map's geometry is used.
    """
    slicer = _slicer()
    names = {int(v): str(n) for v, n in names.items() if int(v) != 0}
    array = np.asarray(label_volume.array)
    if array.size and (array.min() < 0 or not np.allclose(array, np.round(array))):
        raise ValueError("a label map must hold non-negative integer label values")
    present = sorted(int(v) for v in np.unique(array) if v != 0)
    unnamed = [v for v in present if v not in names]
    if unnamed:
        raise ValueError(f"label values {unnamed} have no name; add them to the names table")
    if len(set(names.values())) != len(names):
        raise ValueError("segment names must be unique (Slicer looks segments up by name)")
    max_value = max(names, default=0)
    dtype = np.uint8 if max_value < 256 else np.int16 if max_value < 32768 else np.int32
    temporary = []
    try:
        label_node = volume_to_node(label_volume.with_array(array.astype(dtype)), scene, "__ae_labelmap__",
                                    LABELMAP_VOLUME)
        temporary.append(label_node)
        table = _colour_table(scene, names, colors)
        temporary.append(table)
        label_node.GetDisplayNode().SetAndObserveColorNodeID(table.GetID())
        seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        seg_node.CreateDefaultDisplayNodes()
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node or label_node)
        if present and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                label_node, seg_node):
            raise RuntimeError("Slicer could not import the label map into the segmentation node")
    finally:
        _remove_nodes(scene, temporary)
    segmentation = seg_node.GetSegmentation()
    # Insert empty segments for named-but-absent values at their place in value order.
    for value in sorted(names):
        if value in present:
            continue
        later = [v for v in present if v > value]
        before = segmentation.GetSegmentIdBySegmentName(names[later[0]]) if later else ""
        rgb = list(colors[value])[:3] if colors and value in colors else default_color(value)
        seg_id = segmentation.AddEmptySegment("", names[value], [float(c) for c in rgb])
        if before:
            segmentation.SetSegmentIndex(seg_id, segmentation.GetSegmentIndex(before))
        present = sorted(present + [value])
    if colors:  # the colour table stores 8-bit colours; set the exact ones asked for
        for value, rgb in colors.items():
            seg = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(names.get(int(value), "")))
            if seg is not None:
                seg.SetColor(*[float(c) for c in list(rgb)[:3]])
    return seg_node


def segment_names(seg_node) -> list[str]:
    """Segment names in the node's segment order."""
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]


def segmentation_node_to_labelmap(seg_node, reference,
                                  segment_names_order: Sequence[str] | Mapping[int, str] | None = None,
                                  ) -> tuple[Volume, dict[int, str]]:
    """Rasterise segments onto the grid of ``reference`` (a volume node or a :class:`Volume`).

    ``segment_names_order``: ``None`` exports every segment with values 1..n in segment order; a
    sequence of names exports those segments with values 1..n in that order; a mapping
    ``{value: name}`` uses the given values (e.g. the ones the label map was imported with).
    Where segments overlap, the later one in the order wins. Returns ``(label Volume, {value: name})``.
    """
    slicer = _slicer()
    import vtk

    segmentation = seg_node.GetSegmentation()
    if segment_names_order is None:
        value_to_name = {i + 1: n for i, n in enumerate(segment_names(seg_node))}
    elif isinstance(segment_names_order, Mapping):
        value_to_name = {int(v): str(n) for v, n in sorted(segment_names_order.items(), key=lambda kv: int(kv[0]))}
        if any(v <= 0 for v in value_to_name):
            raise ValueError("label values must be positive (0 is background)")
    else:
        value_to_name = {i + 1: str(n) for i, n in enumerate(segment_names_order)}
    missing = [n for n in value_to_name.values() if not segmentation.GetSegmentIdBySegmentName(n)]
    if missing:
        raise ValueError(f"segments {missing} not in segmentation {seg_node.GetName()!r}; "
                         f"it has {segment_names(seg_node)}")
    scene = seg_node.GetScene()
    temporary = []
    try:
        ref_node = _reference_node(reference, scene, temporary)
        ids = vtk.vtkStringArray()
        for n in value_to_name.values():
            ids.InsertNextValue(segmentation.GetSegmentIdBySegmentName(n))
        out = scene.AddNewNodeByClass(LABELMAP_VOLUME, "__ae_export__")
        temporary.append(out)
        colour_ids = {scene.GetNthNodeByClass(i, "vtkMRMLColorNode").GetID()
                      for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))}
        exported_ok = not value_to_name or slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            seg_node, ids, out, ref_node)
        # The export gives its output a new colour table named after the segments; it is ours to remove.
        display = out.GetDisplayNode()
        if display is not None and display.GetColorNodeID() and display.GetColorNodeID() not in colour_ids:
            temporary.append(display.GetColorNode())
        if not exported_ok:
            raise RuntimeError(f"Slicer could not export segmentation {seg_node.GetName()!r} to a label map")
        geometry = node_to_volume(ref_node)
        if value_to_name:
            exported = node_to_volume(out)
            if not exported.same_geometry(geometry):
                raise RuntimeError("exported label map does not match the reference geometry")
            # Export numbers segments 1..n in the order given; map those to the requested values.
            lut = np.zeros(len(value_to_name) + 1, dtype=np.int32)
            lut[1:] = list(value_to_name)
            array = lut[exported.array.astype(np.int64)]
        else:
            array = np.zeros(geometry.array.shape, np.int32)
    finally:
        _remove_nodes(scene, temporary)
    dtype = np.uint8 if max(value_to_name, default=0) < 256 else np.int16
    return geometry.with_array(array.astype(dtype)), value_to_name


# ---- markups --------------------------------------------------------------------------------
def points_to_markups_node(names: Sequence[str], points_lps: np.ndarray, scene, name: str = "Landmarks",
                           descriptions: Sequence[str] | None = None, locked: bool = False):
    """Add a point list (``vtkMRMLMarkupsFiducialNode``) with labelled control points (RAS in the node)."""
    slicer = _slicer()
    import vtk

    points = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if len(names) != len(points):
        raise ValueError(f"{len(names)} names for {len(points)} points")
    if descriptions is not None and len(descriptions) != len(points):
        raise ValueError(f"{len(descriptions)} descriptions for {len(points)} points")
    ras = convert_points(points, "LPS", "RAS")
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    wasModifying = node.StartModify()
    try:
        for i, (label, p) in enumerate(zip(names, ras)):
            index = node.AddControlPoint(vtk.vtkVector3d(*p), str(label))
            if descriptions is not None:
                node.SetNthControlPointDescription(index, str(descriptions[i]))
        node.SetLocked(bool(locked))
    finally:
        node.EndModify(wasModifying)
    node.CreateDefaultDisplayNodes()
    return node


def markups_node_to_points(node, world: bool = True) -> tuple[list[str], np.ndarray]:
    """Control point labels and positions (N, 3) in LPS.

    ``world=True`` applies parent transforms (what the user sees); undefined (unplaced) points
    are skipped because they have no position.
    """
    slicer = _slicer()
    names, rows = [], []
    ras_all = slicer.util.arrayFromMarkupsControlPoints(node, world=world)
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != node.PositionDefined:
            continue
        names.append(node.GetNthControlPointLabel(i))
        rows.append(ras_all[i])
    ras = np.asarray(rows, dtype=np.float64).reshape(-1, 3)
    return names, convert_points(ras, "RAS", "LPS")


def markups_node_descriptions(node) -> list[str]:
    """Control point descriptions, in the order of :func:`markups_node_to_points` (defined points)."""
    return [node.GetNthControlPointDescription(i) for i in range(node.GetNumberOfControlPoints())
            if node.GetNthControlPointPositionStatus(i) == node.PositionDefined]


# ---- a whole case ---------------------------------------------------------------------------
def load_case(scene, image: Volume, name: str, label: Volume | None = None,
              label_names: Mapping[int, str] | None = None,
              landmarks: Mapping[str, np.ndarray] | None = None) -> dict[str, object]:
    """Add an image with optional segmentation and landmarks; returns ``{"volume", "segmentation", "landmarks"}``."""
    volume_node = volume_to_node(image, scene, name)
    nodes: dict[str, object] = {"volume": volume_node, "segmentation": None, "landmarks": None}
    if label is not None:
        if label_names is None:
            label_names = {int(v): f"label_{int(v)}" for v in np.unique(label.array) if v != 0}
        nodes["segmentation"] = labelmap_to_segmentation_node(label, label_names, scene, f"{name} segmentation",
                                                              reference_node=volume_node)
    if landmarks:
        keys = list(landmarks)
        nodes["landmarks"] = points_to_markups_node(keys, np.stack([np.asarray(landmarks[k], float) for k in keys]),
                                                    scene, f"{name} landmarks")
    return nodes


def slicer_python(slicer_home: str | None) -> str:
    """The interpreter for a child process: Slicer's PythonSlicer (a launcher that sets up Slicer's environment,
    so the child sees the same packages) when running inside Slicer (``slicer_home`` set), else this one."""
    import pathlib
    import shutil
    import sys

    if slicer_home:
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            candidate = pathlib.Path(slicer_home) / "bin" / name
            if candidate.is_file():
                return str(candidate)
        return shutil.which("PythonSlicer") or sys.executable
    return sys.executable
