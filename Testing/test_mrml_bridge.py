"""MRML bridge (anatomical_embedding.mrml) on the headless slicer-core scene.

Every geometry here is oblique with anisotropic spacing, so a missed LPS/RAS flip, a transposed
direction matrix or a swapped spacing axis shows up as a wrong number. Files are written and read
by Slicer's own storage nodes and cross-checked with the engine's readers.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from anatomical_embedding import io, mrml

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACING = np.array([0.7, 1.3, 2.1])  # along (i, j, k)
ORIGIN = np.array([12.5, -40.25, 7.0])  # LPS


def oblique_direction() -> np.ndarray:
    """A proper rotation that mixes all three axes (columns are the i, j, k directions in LPS)."""
    a, b, c = 0.3, -0.5, 0.8
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_volume(array: np.ndarray) -> io.Volume:
    return io.Volume(array, SPACING, ORIGIN, oblique_direction())


@pytest.fixture
def image() -> io.Volume:
    rng = np.random.default_rng(0)
    return oblique_volume(rng.integers(-1000, 1500, size=(6, 9, 11)).astype(np.int16))  # k, j, i


@pytest.fixture
def labels() -> tuple[io.Volume, dict[int, str]]:
    arr = np.zeros((6, 9, 11), np.uint8)
    arr[1:4, 2:6, 3:9] = 1
    arr[3:6, 0:3, 0:4] = 3
    arr[0:2, 6:9, 8:11] = 5
    # Value 4 is named but absent: it must still become an (empty) segment.
    return oblique_volume(arr), {1: "liver", 3: "spleen", 4: "left kidney", 5: "aorta"}


def ijk_to_ras(node) -> np.ndarray:
    import slicer
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def count(scene, class_name: str) -> int:
    return scene.GetNumberOfNodesByClass(class_name)


def write_with_storage_node(node, path) -> None:
    storage = node.CreateDefaultStorageNode()
    node.GetScene().AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.WriteData(node) == 1, f"Slicer could not write {path}"


def read_with_storage_node(scene, node_class: str, storage_class: str, path):
    import slicer

    node = scene.AddNewNodeByClass(node_class, "read")
    storage = getattr(slicer, storage_class)()
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1, f"Slicer could not read {path}"
    return node


# ---- volumes --------------------------------------------------------------------------------
def test_volume_node_holds_array_and_ras_geometry(mrml_app, mrml_scene, image):
    import slicer

    node = mrml.volume_to_node(image, mrml_scene, "ct")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), image.array)
    np.testing.assert_allclose(ijk_to_ras(node), image.ijk_to_world("RAS"), atol=1e-12)
    # Independent of ijk_to_world: Slicer's origin is the LPS origin with x and y negated,
    # its spacing is ours, and voxel (i, j, k) lands where our LPS index_to_world says (flipped).
    np.testing.assert_allclose(node.GetOrigin(), ORIGIN * [-1, -1, 1], atol=1e-9)
    np.testing.assert_allclose(node.GetSpacing(), SPACING, atol=1e-9)
    ijk = np.array([3.0, 5.0, 2.0])
    ras = ijk_to_ras(node) @ np.append(ijk, 1.0)
    np.testing.assert_allclose(ras[:3], image.index_to_world(ijk) * [-1, -1, 1], atol=1e-9)

    back = mrml.node_to_volume(node)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == image.array.dtype
    assert back.same_geometry(image, atol=1e-9)
    assert mrml_app.vtk_messages() == ""


def test_volume_saved_by_slicer_reads_back_in_lps(mrml_scene, image, tmp_path):
    node = mrml.volume_to_node(image, mrml_scene, "ct")
    path = tmp_path / "ct.nrrd"
    write_with_storage_node(node, path)
    read = io.read_image(path)
    np.testing.assert_array_equal(read.array, image.array)
    np.testing.assert_allclose(read.origin, image.origin, atol=1e-5)
    np.testing.assert_allclose(read.spacing, image.spacing, atol=1e-5)
    np.testing.assert_allclose(read.direction, image.direction, atol=1e-5)


def test_slicer_reads_our_nifti_like_we_do(mrml_scene, image, tmp_path):
    path = io.write_image(image, tmp_path / "ct.nii.gz")
    node = read_with_storage_node(mrml_scene, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode", path)
    ours = io.read_image(path)
    np.testing.assert_array_equal(mrml.node_to_volume(node).array, ours.array)
    # NIfTI stores the matrix in float32, so compare at that precision.
    np.testing.assert_allclose(ijk_to_ras(node), ours.ijk_to_world("RAS"), atol=1e-4)
    assert mrml.node_to_volume(node).same_geometry(image, atol=1e-4)


def test_node_to_volume_applies_parent_linear_transform(mrml_scene, image):
    import slicer

    node = mrml.volume_to_node(image, mrml_scene, "ct")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift_ras = np.eye(4)
    shift_ras[:3, 3] = [10.0, -4.0, 2.5]
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift_ras))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = mrml.node_to_volume(node)
    # A RAS shift of (10, -4, 2.5) is an LPS shift of (-10, 4, 2.5).
    np.testing.assert_allclose(moved.origin, ORIGIN + [-10.0, 4.0, 2.5], atol=1e-9)
    np.testing.assert_allclose(moved.direction, image.direction, atol=1e-9)


def test_volume_to_node_casts_int64_and_bool(mrml_scene, image):
    node = mrml.volume_to_node(image.with_array(image.array.astype(np.int64)), mrml_scene, "a")
    assert mrml.node_to_volume(node).array.dtype == np.int32
    np.testing.assert_array_equal(mrml.node_to_volume(node).array, image.array)
    mask = mrml.volume_to_node(image.with_array(image.array > 0), mrml_scene, "mask")
    np.testing.assert_array_equal(mrml.node_to_volume(mask).array, (image.array > 0).astype(np.uint8))


# ---- segmentations --------------------------------------------------------------------------
def test_labelmap_segmentation_round_trip(mrml_app, mrml_scene, labels, image):
    label, names = labels
    n_volumes, n_colors = count(mrml_scene, "vtkMRMLVolumeNode"), count(mrml_scene, "vtkMRMLColorTableNode")
    seg_node = mrml.labelmap_to_segmentation_node(label, names, mrml_scene, "organs")
    # Segment names preserved, in ascending label value, including the empty one.
    assert mrml.segment_names(seg_node) == ["liver", "spleen", "left kidney", "aorta"]
    segmentation = seg_node.GetSegmentation()
    kidney = segmentation.GetSegmentIdBySegmentName("left kidney")
    assert segmentation.GetSegment(kidney) is not None
    # The bridge cleans up its temporary label map and colour table.
    assert count(mrml_scene, "vtkMRMLVolumeNode") == n_volumes
    assert count(mrml_scene, "vtkMRMLColorTableNode") == n_colors

    # Back with the original values: voxel-identical.
    back, back_names = mrml.segmentation_node_to_labelmap(seg_node, label, names)
    np.testing.assert_array_equal(back.array, label.array)
    assert back.same_geometry(label, atol=1e-9)
    assert back_names == names
    # Default order numbers segments 1..n in segment order.
    ordered, ordered_names = mrml.segmentation_node_to_labelmap(seg_node, label)
    assert ordered_names == {1: "liver", 2: "spleen", 3: "left kidney", 4: "aorta"}
    expected = np.select([label.array == 1, label.array == 3, label.array == 5], [1, 2, 4], 0)
    np.testing.assert_array_equal(ordered.array, expected)
    # A chosen order of names.
    chosen, chosen_names = mrml.segmentation_node_to_labelmap(seg_node, label, ["aorta", "liver"])
    assert chosen_names == {1: "aorta", 2: "liver"}
    np.testing.assert_array_equal(chosen.array, np.select([label.array == 5, label.array == 1], [1, 2], 0))
    # The same through a reference volume node instead of a Volume.
    ref_node = mrml.volume_to_node(image, mrml_scene, "ct")
    via_node, _ = mrml.segmentation_node_to_labelmap(seg_node, ref_node, names)
    np.testing.assert_array_equal(via_node.array, label.array)
    # Exports leave nothing behind either (Slicer's export may create a colour table for its output).
    assert count(mrml_scene, "vtkMRMLVolumeNode") == n_volumes + 1
    assert count(mrml_scene, "vtkMRMLColorTableNode") == n_colors
    assert count(mrml_scene, "vtkMRMLVolumeDisplayNode") == 1  # the "ct" node's own display node
    assert mrml_app.vtk_messages() == ""


def test_segmentation_export_onto_a_sub_grid_uses_world_positions(mrml_scene, labels):
    label, names = labels
    seg_node = mrml.labelmap_to_segmentation_node(label, names, mrml_scene, "organs")
    sub = io.crop(label, [2, 1, 1], [7, 6, 4])  # a grid shifted in world space
    out, _ = mrml.segmentation_node_to_labelmap(seg_node, sub, names)
    assert out.same_geometry(sub, atol=1e-9)
    np.testing.assert_array_equal(out.array, sub.array)


def test_segmentation_node_colours_and_errors(mrml_scene, labels):
    label, names = labels
    colors = {1: (0.9, 0.1, 0.2), 3: (0.0, 0.5, 1.0)}
    seg_node = mrml.labelmap_to_segmentation_node(label, names, mrml_scene, "organs", colors=colors)
    segmentation = seg_node.GetSegmentation()
    np.testing.assert_allclose(segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("spleen")).GetColor(),
                               colors[3], atol=1e-6)
    with pytest.raises(ValueError, match="no name"):
        mrml.labelmap_to_segmentation_node(label, {1: "liver"}, mrml_scene, "bad")
    with pytest.raises(ValueError, match="not in segmentation"):
        mrml.segmentation_node_to_labelmap(seg_node, label, ["pancreas"])


def test_segmentation_saved_by_slicer_reads_back(mrml_scene, labels, tmp_path):
    from anatomical_embedding.io.labelmaps import read_labelmap

    label, names = labels
    seg_node = mrml.labelmap_to_segmentation_node(label, names, mrml_scene, "organs")
    path = tmp_path / "organs.seg.nrrd"
    write_with_storage_node(seg_node, path)

    again = read_with_storage_node(mrml_scene, "vtkMRMLSegmentationNode", "vtkMRMLSegmentationStorageNode", path)
    assert mrml.segment_names(again) == mrml.segment_names(seg_node)
    back, _ = mrml.segmentation_node_to_labelmap(again, label, names)
    np.testing.assert_array_equal(back.array, label.array)

    # The engine's reader sees the same segments (the empty one included); its values are the
    # label values Slicer wrote. Slicer may crop the file to the segments' extent, so compare
    # on the original grid.
    file_labels, file_names = read_labelmap(path)
    assert sorted(file_names.values()) == sorted(names.values())
    resampled = io.resample_like(file_labels, label, is_label=True)
    by_name = {n: v for v, n in file_names.items()}
    for value, name in names.items():
        if name in by_name:
            np.testing.assert_array_equal(resampled.array == by_name[name], label.array == value)


# ---- markups --------------------------------------------------------------------------------
POINTS_LPS = np.array([[10.0, -20.5, 33.25], [-4.0, 7.5, -1.0], [0.125, 0.0, 250.0]])
NAMES = ["carina", "left femoral head", "T12"]


def test_markups_round_trip_positions_are_ras(mrml_app, mrml_scene):
    import slicer

    node = mrml.points_to_markups_node(NAMES, POINTS_LPS, mrml_scene, "landmarks",
                                       descriptions=["a", "b", "confidence 0.9"])
    assert node.IsA("vtkMRMLMarkupsFiducialNode")
    np.testing.assert_allclose(slicer.util.arrayFromMarkupsControlPoints(node), POINTS_LPS * [-1, -1, 1])
    assert [node.GetNthControlPointLabel(i) for i in range(3)] == NAMES
    names, pts = mrml.markups_node_to_points(node)
    assert names == NAMES
    np.testing.assert_allclose(pts, POINTS_LPS, atol=1e-12)
    assert mrml.markups_node_descriptions(node) == ["a", "b", "confidence 0.9"]
    with pytest.raises(ValueError):
        mrml.points_to_markups_node(NAMES[:2], POINTS_LPS, mrml_scene, "bad")
    assert mrml_app.vtk_messages() == ""


def test_markups_skip_unplaced_points_and_apply_transforms(mrml_scene):
    import slicer

    node = mrml.points_to_markups_node(NAMES, POINTS_LPS, mrml_scene, "landmarks")
    node.UnsetNthControlPointPosition(1)
    names, pts = mrml.markups_node_to_points(node)
    assert names == [NAMES[0], NAMES[2]]
    np.testing.assert_allclose(pts, POINTS_LPS[[0, 2]])
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]  # RAS
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    _, world = mrml.markups_node_to_points(node)
    np.testing.assert_allclose(world, POINTS_LPS[[0, 2]] + [-1.0, -2.0, 3.0])
    _, local = mrml.markups_node_to_points(node, world=False)
    np.testing.assert_allclose(local, POINTS_LPS[[0, 2]])


def test_markups_saved_by_slicer(mrml_scene, tmp_path):
    node = mrml.points_to_markups_node(NAMES, POINTS_LPS, mrml_scene, "landmarks", descriptions=["x", "y", "z"])
    path = tmp_path / "landmarks.mrk.json"
    write_with_storage_node(node, path)
    doc = json.loads(path.read_text(encoding="utf-8"))
    markup = doc["markups"][0]
    assert markup["type"] == "Fiducial"
    flip = {"LPS": np.array([1.0, 1.0, 1.0]), "RAS": np.array([-1.0, -1.0, 1.0])}[markup["coordinateSystem"]]
    file_pts = np.array([cp["position"] for cp in markup["controlPoints"]])
    np.testing.assert_allclose(file_pts * flip, POINTS_LPS, atol=1e-9)
    assert [cp["label"] for cp in markup["controlPoints"]] == NAMES
    assert [cp["description"] for cp in markup["controlPoints"]] == ["x", "y", "z"]

    again = read_with_storage_node(mrml_scene, "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsJsonStorageNode", path)
    names, pts = mrml.markups_node_to_points(again)
    assert names == NAMES
    np.testing.assert_allclose(pts, POINTS_LPS, atol=1e-9)
    assert mrml.markups_node_descriptions(again) == ["x", "y", "z"]


# ---- a phantom case, files read by Slicer vs by the engine --------------------------------
def test_phantom_through_bridge_matches_files(mrml_scene, tmp_path):
    """Slicer's storage nodes and the engine's readers agree on a generated phantom case."""
    import slicer

    from anatomical_embedding import phantoms
    from anatomical_embedding.io.labelmaps import read_labelmap

    cohort = phantoms.load_cohort(phantoms.generate_cohort(tmp_path / "cohort", n=1, seed=3, workers=1))
    subject = cohort.subjects[0]

    image = io.read_image(subject.image_path)
    image_node = read_with_storage_node(mrml_scene, "vtkMRMLScalarVolumeNode",
                                        "vtkMRMLVolumeArchetypeStorageNode", subject.image_path)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(image_node), image.array)
    np.testing.assert_allclose(ijk_to_ras(image_node), image.ijk_to_world("RAS"), atol=1e-4)

    label, label_names = read_labelmap(subject.label_path)
    for value in np.unique(label.array)[1:]:
        assert label_names[int(value)] == cohort.label_names[int(value)]
    label_node = read_with_storage_node(mrml_scene, "vtkMRMLLabelMapVolumeNode",
                                        "vtkMRMLVolumeArchetypeStorageNode", subject.label_path)
    np.testing.assert_array_equal(mrml.node_to_volume(label_node).array, label.array)

    names = {int(v): n for v, n in cohort.label_names.items()}
    nodes = mrml.load_case(mrml_scene, image, "phantom", label=label, label_names=names,
                           landmarks=subject.landmarks)
    assert mrml.segment_names(nodes["segmentation"]) == [names[v] for v in sorted(names)]
    back, _ = mrml.segmentation_node_to_labelmap(nodes["segmentation"], nodes["volume"], names)
    np.testing.assert_array_equal(back.array, label.array)

    landmark_names = list(subject.landmarks)
    lps = np.stack([np.asarray(subject.landmarks[k], float) for k in landmark_names])
    ras = slicer.util.arrayFromMarkupsControlPoints(nodes["landmarks"])
    np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    assert [nodes["landmarks"].GetNthControlPointLabel(i) for i in range(len(lps))] == landmark_names

    # The landmark file reads the same through Slicer's markups storage node and the engine.
    from anatomical_embedding.io.markups import read_points

    from_file = read_points(subject.landmarks_path)
    markups = read_with_storage_node(mrml_scene, "vtkMRMLMarkupsFiducialNode",
                                     "vtkMRMLMarkupsJsonStorageNode", subject.landmarks_path)
    slicer_names, slicer_lps = mrml.markups_node_to_points(markups)
    assert slicer_names == from_file.names == landmark_names
    np.testing.assert_allclose(slicer_lps, from_file.points_lps, atol=1e-6)
    np.testing.assert_allclose(slicer_lps, lps, atol=1e-6)


# ---- the headless fixture itself ------------------------------------------------------------
def test_headless_scene_supports_slicer_util(mrml_app, mrml_scene):
    """What the fixture promises: slicer.util helpers, colour tables, converter rules, a fresh scene."""
    import slicer

    assert slicer.mrmlScene is mrml_scene
    assert count(mrml_scene, "vtkMRMLVolumeNode") == 0 and count(mrml_scene, "vtkMRMLSegmentationNode") == 0
    # slicer-core has no colour files (GenericAnatomyColors ...), only the built-in tables.
    default_label_colors = mrml_app.app_logic.GetColorLogic().GetDefaultLabelMapColorNodeID()
    assert mrml_scene.GetNodeByID(default_label_colors) is not None
    assert mrml_scene.GetFirstNodeByName("Grey") is not None

    arr = np.zeros((6, 9, 11), np.uint8)
    arr[1:5, 2:7, 3:9] = 1
    ijk_to_ras = oblique_volume(arr).ijk_to_world("RAS")
    volume = slicer.util.addVolumeFromArray(arr.astype(np.int16), ijk_to_ras, "util volume")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), arr)
    seg_node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "util segmentation")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = seg_node.GetSegmentation().AddEmptySegment("box")
    slicer.util.updateSegmentBinaryLabelmapFromArray(arr, seg_node, segment_id, volume)
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume), arr)
    # Binary labelmap -> closed surface needs the converter rules registered by the fixture.
    assert seg_node.CreateClosedSurfaceRepresentation()
    surface = seg_node.GetClosedSurfaceInternalRepresentation(segment_id)
    assert surface is not None and surface.GetNumberOfPoints() > 0
    assert mrml_app.vtk_messages() == ""


# ---- the Slicer modules' logic on the headless scene ---------------------------------------
@pytest.fixture
def load_slicer_module(monkeypatch, mrml_app, tmp_path):
    """Import a module's .py with bare stand-ins for the GUI-side Slicer Python that slicer-core lacks.

    Only the imports are replaced (``ScriptedLoadableModule`` base classes, the parameter node
    wrapper decorator); the Logic methods under test run unchanged on the real MRML scene. Inside
    Slicer the same methods are exercised by each module's ScriptedLoadableModuleTest.
    """
    import importlib.util
    import sys
    import types

    import slicer

    from fixtures_mrml import gui_stand_ins

    for name, stand_in in gui_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(temporaryPath=str(tmp_path)), raising=False)

    def load(module: str):
        # As in Slicer, the module's folder is on sys.path (its <module>Lib package); a Lib imported by an earlier
        # test holds that test's stand-ins, so it is imported afresh.
        monkeypatch.syspath_prepend(str(REPO_ROOT / module))
        for name in [n for n in sys.modules if n.split(".")[0] == f"{module}Lib"]:
            monkeypatch.delitem(sys.modules, name)
        path = REPO_ROOT / module / f"{module}.py"
        spec = importlib.util.spec_from_file_location(f"_headless_{module}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


def test_viewer_logic_loads_phantom_pair(load_slicer_module, mrml_scene, tmp_path):
    import slicer

    from anatomical_embedding import phantoms
    from anatomical_embedding.io.labelmaps import read_labelmap

    module = load_slicer_module("AnatomicalEmbedding")
    cases = module.AnatomicalEmbeddingLogic().loadPhantomPair(seed=2, outputDir=str(tmp_path / "pair"),
                                                               scene=mrml_scene)
    assert count(mrml_scene, "vtkMRMLScalarVolumeNode") == 2
    assert count(mrml_scene, "vtkMRMLSegmentationNode") == 2
    assert count(mrml_scene, "vtkMRMLMarkupsFiducialNode") == 2
    cohort = phantoms.load_cohort(tmp_path / "pair")
    assert len(cohort.subjects) == 2
    for case, subject in zip(cases, cohort.subjects):
        image = io.read_image(subject.image_path)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(case["volume"]), image.array)
        np.testing.assert_allclose(ijk_to_ras(case["volume"]), image.ijk_to_world("RAS"), atol=1e-4)
        label, _ = read_labelmap(subject.label_path)
        back, _ = mrml.segmentation_node_to_labelmap(case["segmentation"], case["volume"], cohort.label_names)
        np.testing.assert_array_equal(back.array, label.array)
        names, lps = mrml.markups_node_to_points(case["landmarks"])
        assert names == list(subject.landmarks)
        np.testing.assert_allclose(lps, np.stack([subject.landmarks[n] for n in names]), atol=1e-9)
    # Two different subjects, not one loaded twice.
    assert not np.array_equal(slicer.util.arrayFromVolume(cases[0]["volume"])[:1],
                              slicer.util.arrayFromVolume(cases[1]["volume"])[:1])


def test_trainer_logic_exports_a_training_case(load_slicer_module, mrml_scene, labels, image, tmp_path):
    from anatomical_embedding.data.datasets import DatasetSpec
    from anatomical_embedding.io.labelmaps import read_labelmap

    label, names = labels
    module = load_slicer_module("AnatomicalEmbeddingTrainer")
    logic = module.AnatomicalEmbeddingTrainerLogic()
    volume_node = mrml.volume_to_node(image, mrml_scene, "ct")
    seg_node = mrml.labelmap_to_segmentation_node(label, names, mrml_scene, "organs")
    paths = logic.exportCase(volume_node, seg_node, tmp_path / "train", "case_001")

    written = io.read_image(paths["image"])
    np.testing.assert_array_equal(written.array, image.array)
    assert written.same_geometry(image, atol=1e-4)
    file_label, file_names = read_labelmap(paths["label"])
    assert paths["names"] == {1: "liver", 2: "spleen", 3: "left kidney", 4: "aorta"}
    assert {v: file_names[v] for v in np.unique(file_label.array) if v} == {1: "liver", 2: "spleen", 4: "aorta"}
    np.testing.assert_array_equal(file_label.array, np.select([label.array == v for v in (1, 3, 5)], [1, 2, 4], 0))
    spec = DatasetSpec.from_path(tmp_path / "train")
    assert [(c.id, c.label is not None) for c in spec.cases] == [("case_001", True)]
    with pytest.raises(FileExistsError):
        logic.exportCase(volume_node, seg_node, tmp_path / "train", "case_001")
    with pytest.raises(ValueError, match="invalid case name"):
        logic.exportCase(volume_node, None, tmp_path / "train", "../escape")
