"""Point-list I/O: Slicer markups JSON, legacy .fcsv and CSV, in LPS and RAS, with per-point extras."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from anatomical_embedding.io import PointList, Volume, read_points, write_points
from scipy.spatial.transform import Rotation

EXTRAS = [
    {"description": "clicked by reader 1", "similarity": 0.9375, "confidence": 0.81, "low_confidence": False},
    {"similarity": -0.125, "low_confidence": True, "rank": 3},
    {},
    {"description": 'comma, "quote" and unicode: µm'},
]


def oblique_volume() -> Volume:
    direction = Rotation.from_euler("xyz", [14, -21, 37], degrees=True).as_matrix()
    return Volume(np.zeros((9, 11, 13), np.float32), [0.7, 1.3, 2.9], [-101.25, 33.5, 12.0], direction)


def sample_points(vol: Volume) -> tuple[PointList, np.ndarray]:
    ijk = np.array([[0, 0, 0], [3.5, 7.25, 1.0], [12, 10, 8], [6.0, 0.5, 4.75]])
    names = ["origin", "half voxel", "far corner", "mid"]
    return PointList(names, vol.index_to_world(ijk), EXTRAS), ijk


@pytest.mark.parametrize("ending", [".mrk.json", ".fcsv", ".csv"])
@pytest.mark.parametrize("frame", ["LPS", "RAS"])
def test_round_trip_keeps_points_names_and_extras(tmp_path, ending, frame):
    vol = oblique_volume()
    pl, ijk = sample_points(vol)
    path = write_points(tmp_path / f"points{ending}", pl, frame=frame)
    back = read_points(path)
    assert back.names == pl.names
    np.testing.assert_allclose(back.points_lps, pl.points_lps, atol=1e-9)
    np.testing.assert_allclose(vol.world_to_index(back.points_lps), ijk, atol=1e-9)
    assert back.extra == EXTRAS


@pytest.mark.parametrize("frame", ["LPS", "RAS"])
def test_files_store_coordinates_in_the_requested_frame(tmp_path, frame):
    vol = oblique_volume()
    pl, ijk = sample_points(vol)
    expected = vol.index_to_world(ijk, frame)  # the Volume's own frame handling is the reference

    doc = json.loads(write_points(tmp_path / "p.mrk.json", pl, frame=frame).read_text(encoding="utf-8"))
    markup = doc["markups"][0]
    assert markup["coordinateSystem"] == frame and markup["type"] == "Fiducial"
    cps = markup["controlPoints"]
    np.testing.assert_allclose([cp["position"] for cp in cps], expected, atol=1e-9)
    assert all(cp["positionStatus"] == "defined" for cp in cps)
    assert json.loads(cps[1]["description"])["similarity"] == -0.125
    assert cps[2]["description"] == ""  # no extras: plain (empty) description for Slicer users

    text = write_points(tmp_path / "p.fcsv", pl, frame=frame).read_text(encoding="utf-8")
    assert f"# CoordinateSystem = {frame}" in text
    rows = list(csv.reader(line for line in text.splitlines() if not line.startswith("#")))
    np.testing.assert_allclose([[float(v) for v in r[1:4]] for r in rows], expected, atol=1e-9)
    assert [r[11] for r in rows] == pl.names

    rows = list(csv.reader(write_points(tmp_path / "p.csv", pl, frame=frame).read_text(encoding="utf-8").splitlines()))
    assert rows[0][:4] == ["label", *("lps" if frame == "LPS" else "ras")]
    np.testing.assert_allclose([[float(v) for v in r[1:4]] for r in rows[1:]], expected, atol=1e-9)


def test_reads_hand_written_slicer_ras_markups(tmp_path):
    # As Slicer 5 writes a point list whose scene coordinates are RAS (20.5, -31.25, 7).
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
        "Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "RAS",
                "coordinateUnits": "mm",
                "locked": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": 3,
                "controlPoints": [
                    {
                        "id": "1",
                        "label": "F-1",
                        "description": "tip of the liver",
                        "associatedNodeID": "",
                        "position": [20.5, -31.25, 7.0],
                        "orientation": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                        "selected": True,
                        "locked": False,
                        "visibility": True,
                        "positionStatus": "defined",
                    },
                    {
                        "id": "2",
                        "label": "F-2",
                        "description": "",
                        "associatedNodeID": "",
                        "position": [0.0, 0.0, 0.0],
                        "positionStatus": "missing",
                    },
                    {"id": "3", "label": "F-3", "position": [-1.0, 2.0, -3.0], "positionStatus": "defined"},
                ],
                "measurements": [],
                "display": {"visibility": True},
            }
        ],
    }
    path = tmp_path / "slicer.mrk.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    pl = read_points(path)
    assert pl.names == ["F-1", "F-3"]  # the "missing" point has no position
    np.testing.assert_allclose(pl.points_lps, [[-20.5, 31.25, 7.0], [1.0, -2.0, -3.0]])
    np.testing.assert_allclose(pl.points("RAS"), [[20.5, -31.25, 7.0], [-1.0, 2.0, -3.0]])
    assert pl.extra == [{"description": "tip of the liver"}, {}]


def test_reads_legacy_fcsv_frames(tmp_path):
    body = (
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        "vtkMRMLMarkupsFiducialNode_0,1.5,-2,3,0,0,0,1,1,1,0,A,,vtkMRMLScalarVolumeNode1\n"
    )
    for header, sign in (
        ("# CoordinateSystem = 0\n", -1),
        ("# CoordinateSystem = RAS\n", -1),
        ("# CoordinateSystem = 1\n", 1),
        ("# CoordinateSystem = LPS\n", 1),
        ("", -1),
    ):
        path = tmp_path / "f.fcsv"
        path.write_text("# Markups fiducial file version = 4.10\n" + header + body, encoding="utf-8")
        pl = read_points(path)
        assert pl.names == ["A"]
        np.testing.assert_allclose(pl.points_lps, [[sign * 1.5, sign * -2.0, 3.0]])


def test_csv_must_name_its_frame(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("label,x,y,z\nA,1,2,3\n", encoding="utf-8")
    with pytest.raises(ValueError, match="does not name the frame"):
        read_points(path)
    path.write_text("# CoordinateSystem = RAS\nlabel,x,y,z\nA,1,2,3\n", encoding="utf-8")
    np.testing.assert_allclose(read_points(path).points_lps, [[-1, -2, 3]])
    path.write_text("label,r,a,s,score\nA,1,2,3,0.5\nB,4,5,6,\n", encoding="utf-8")
    pl = read_points(path)
    np.testing.assert_allclose(pl.points_lps, [[-1, -2, 3], [-4, -5, 6]])
    assert pl.extra == [{"score": 0.5}, {}]


def test_write_refuses_to_overwrite_and_rejects_unknown_endings(tmp_path):
    pl = PointList(["a"], [[1.0, 2.0, 3.0]])
    path = write_points(tmp_path / "a.mrk.json", pl)
    with pytest.raises(FileExistsError):
        write_points(path, pl)
    write_points(path, PointList(["b"], [[4.0, 5.0, 6.0]]), overwrite=True)
    assert read_points(path).names == ["b"]
    with pytest.raises(ValueError, match="file ending"):
        write_points(tmp_path / "a.txt", pl)
    with pytest.raises(FileNotFoundError):
        read_points(tmp_path / "missing.fcsv")
    with pytest.raises(ValueError):
        PointList(["a", "b"], [[1.0, 2.0, 3.0]])


def test_slicer_reads_our_markups_file(tmp_path, mrml_scene):
    """Slicer's own JSON storage node loads what we write, at the right RAS positions."""
    vol = oblique_volume()
    pl, _ = sample_points(vol)
    path = write_points(tmp_path / "ours.mrk.json", pl, frame="LPS")
    node = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsJsonStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    assert node.GetNumberOfControlPoints() == len(pl)
    ras = np.array([node.GetNthControlPointPosition(n) for n in range(len(pl))])
    np.testing.assert_allclose(ras, pl.points("RAS"), atol=1e-6)
    assert [node.GetNthControlPointLabel(n) for n in range(len(pl))] == pl.names
    assert json.loads(node.GetNthControlPointDescription(0))["similarity"] == EXTRAS[0]["similarity"]
