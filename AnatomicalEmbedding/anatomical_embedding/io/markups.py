"""Point lists (landmarks, matched points) in the three formats users meet in Slicer.

* ``.mrk.json`` -- Slicer markups JSON (schema markups-schema-v1.0.3), one ``Fiducial`` markup.
  ``coordinateSystem`` may be ``"LPS"`` (what we write by default, and Slicer's own default) or
  ``"RAS"``. Per-point extra fields (similarity, confidence, flags...) are stored in the control
  point's ``description`` as a JSON object ``{"description": <text>, "similarity": 0.93, ...}``:
  Slicer keeps and shows the description verbatim, so the values survive a load/save in Slicer,
  whereas unknown keys in a control point are dropped when Slicer re-saves the file. A plain
  (non-JSON) description is read as ``{"description": text}``.
* ``.fcsv`` -- legacy Slicer fiducial CSV with ``# CoordinateSystem = LPS|RAS`` (old files write
  0 = RAS, 1 = LPS; without the line the file is RAS, as in Slicer < 4.11); extras go into
  ``desc`` exactly as above.
* ``.csv`` -- plain table. The header names the frame through its coordinate columns:
  ``label,l,p,s`` (LPS) or ``label,r,a,s`` (RAS), followed by optional extra columns
  (``description`` and any per-point field). Extra cells are written as text (non-strings as
  JSON) and read back with ``json.loads`` where that works, so numbers and booleans keep their
  type; an empty cell means "field absent". ``label,x,y,z`` is accepted when a comment line
  ``# CoordinateSystem = LPS|RAS`` precedes the header.

In memory points are always LPS (the engine's world frame); conversion happens only here, through
:func:`convert_points`.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from anatomical_embedding.io.geometry import Frame, convert_points
from anatomical_embedding.io.images import atomic_write

log = logging.getLogger(__name__)

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/Resources/Schema/"
    "markups-schema-v1.0.3.json#"
)
FCSV_COLUMNS = [
    "id",
    "x",
    "y",
    "z",
    "ow",
    "ox",
    "oy",
    "oz",
    "vis",
    "sel",
    "lock",
    "label",
    "desc",
    "associatedNodeID",
]
CSV_AXES = {"LPS": ("l", "p", "s"), "RAS": ("r", "a", "s")}
POINT_SUFFIXES = (".mrk.json", ".json", ".fcsv", ".csv")


@dataclass
class PointList:
    """Named world points in LPS with optional per-point extra fields (``description``, scores, flags)."""

    names: list[str]
    points_lps: np.ndarray
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = [str(n) for n in self.names]
        self.points_lps = np.asarray(self.points_lps, dtype=np.float64).reshape(-1, 3)
        if len(self.names) != len(self.points_lps):
            raise ValueError(f"{len(self.names)} names for {len(self.points_lps)} points")
        if not self.extra:
            self.extra = [{} for _ in self.names]
        if len(self.extra) != len(self.names):
            raise ValueError(f"{len(self.extra)} extra entries for {len(self.names)} points")
        self.extra = [dict(e) for e in self.extra]

    def __len__(self) -> int:
        return len(self.names)

    def points(self, frame: Frame = "LPS") -> np.ndarray:
        return convert_points(self.points_lps, "LPS", frame)

    def as_dict(self) -> dict[str, np.ndarray]:
        """Name -> LPS point (names are expected to be unique; the last one wins otherwise)."""
        return {n: p.copy() for n, p in zip(self.names, self.points_lps)}

    @classmethod
    def from_dict(
        cls, points: Mapping[str, np.ndarray], extra: Mapping[str, dict] | None = None, frame: Frame = "LPS"
    ) -> PointList:
        names = list(points)
        pts = np.array([np.asarray(points[n], dtype=np.float64).reshape(3) for n in names]).reshape(-1, 3)
        ex = [dict((extra or {}).get(n, {})) for n in names]
        return cls(names, convert_points(pts, frame, "LPS"), ex)


# ---- public API ------------------------------------------------------------------------------
def points_format(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    if name.endswith((".mrk.json", ".json")):
        return "mrk.json"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".csv"):
        return "csv"
    raise ValueError(f"unknown point-list file ending for {path}; use one of {', '.join(POINT_SUFFIXES)}")


def read_points(path: str | os.PathLike) -> PointList:
    """Read a ``.mrk.json``, ``.fcsv`` or ``.csv`` point list; points come back in LPS."""
    path = Path(path)
    fmt = points_format(path)
    if not path.is_file():
        raise FileNotFoundError(f"point list not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if fmt == "mrk.json":
            return _parse_mrk_json(text)
        if fmt == "fcsv":
            return _parse_fcsv(text)
        return _parse_csv(text)
    except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a valid {fmt} point list ({exc!r})") from exc


def write_points(
    path: str | os.PathLike, points: PointList, overwrite: bool = False, frame: Frame = "LPS"
) -> Path:
    """Write atomically; the format follows the file ending, coordinates are written in ``frame``."""
    path = Path(path)
    fmt = points_format(path)
    if frame not in ("LPS", "RAS"):
        raise ValueError(f"unknown world frame {frame!r}: use 'LPS' or 'RAS'")
    if fmt == "mrk.json":
        text = _format_mrk_json(points, frame)
    elif fmt == "fcsv":
        text = _format_fcsv(points, frame)
    else:
        text = _format_csv(points, frame)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


# ---- descriptions carrying extra fields --------------------------------------------------------
def _pack_description(extra: dict[str, Any]) -> str:
    fields = {k: v for k, v in extra.items() if k != "description"}
    text = str(extra.get("description", ""))
    if not fields:
        return text
    return json.dumps({"description": text, **fields}, default=_json_default, separators=(",", ":"))


def _unpack_description(text: str) -> dict[str, Any]:
    text = text or ""
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            out = dict(obj)
            if not out.get("description"):
                out.pop("description", None)
            return out
    return {"description": text} if text else {}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a point list")


# ---- Slicer markups JSON -----------------------------------------------------------------------
def _format_mrk_json(points: PointList, frame: Frame) -> str:
    pts = points.points(frame)
    # Identity orientation in RAS, expressed in the file's frame.
    orientation = (
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        if frame == "RAS"
        else [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]
    )
    control = []
    for n, (name, p, extra) in enumerate(zip(points.names, pts, points.extra)):
        control.append(
            {
                "id": str(n + 1),
                "label": name,
                "description": _pack_description(extra),
                "associatedNodeID": "",
                "position": [float(v) for v in p],
                "orientation": orientation,
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        )
    doc = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": frame,
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control),
                "controlPoints": control,
                "measurements": [],
                "display": {
                    "visibility": True,
                    "opacity": 1.0,
                    "color": [0.4, 1.0, 1.0],
                    "selectedColor": [1.0, 0.5, 0.5],
                    "propertiesLabelVisibility": True,
                    "pointLabelsVisibility": True,
                    "textScale": 3.0,
                    "glyphType": "Sphere3D",
                    "glyphScale": 1.0,
                    "glyphSize": 5.0,
                    "useGlyphScale": True,
                },
            }
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


def _parse_mrk_json(text: str) -> PointList:
    doc = json.loads(text)
    markups = [m for m in doc["markups"] if "controlPoints" in m]
    if not markups:
        raise ValueError("the markups file holds no control points")
    if len(markups) > 1:
        log.warning("markups file holds %d markups; reading the points of all of them", len(markups))
    names, pts, extras = [], [], []
    for m in markups:
        frame = str(m.get("coordinateSystem", "LPS")).upper()
        if frame not in ("LPS", "RAS"):
            raise ValueError(f"unsupported coordinateSystem {frame!r} in markups file")
        for cp in m["controlPoints"]:
            status = cp.get("positionStatus", "defined")
            if status != "defined" or "position" not in cp:
                log.warning("skipping control point %r: position %s", cp.get("label"), status)
                continue
            names.append(str(cp.get("label", cp.get("id", len(names) + 1))))
            pts.append(convert_points(np.asarray(cp["position"], dtype=np.float64), frame, "LPS"))
            extras.append(_unpack_description(cp.get("description", "")))
    return PointList(names, np.array(pts).reshape(-1, 3), extras)


# ---- legacy .fcsv ----------------------------------------------------------------------------------
def _format_fcsv(points: PointList, frame: Frame) -> str:
    buf = _io.StringIO()
    buf.write("# Markups fiducial file version = 4.11\n")
    buf.write(f"# CoordinateSystem = {frame}\n")
    buf.write("# columns = " + ",".join(FCSV_COLUMNS) + "\n")
    writer = csv.writer(buf, lineterminator="\n")
    for n, (name, p, extra) in enumerate(zip(points.names, points.points(frame), points.extra)):
        writer.writerow(
            [
                f"vtkMRMLMarkupsFiducialNode_{n}",
                *(repr(float(v)) for v in p),
                0,
                0,
                0,
                1,
                1,
                1,
                0,
                name,
                _pack_description(extra),
                "",
            ]
        )
    return buf.getvalue()


def _parse_fcsv(text: str) -> PointList:
    frame: Frame = "RAS"
    columns = FCSV_COLUMNS
    rows = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                frame = {"0": "RAS", "RAS": "RAS", "1": "LPS", "LPS": "LPS"}.get(value.upper(), None)
                if frame is None:
                    raise ValueError(f"unsupported CoordinateSystem {value!r} in .fcsv")
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
        elif line.strip():
            rows.append(line)
    names, pts, extras = [], [], []
    for row in csv.reader(rows):
        rec = dict(zip(columns, row))
        names.append(rec.get("label", ""))
        pts.append([float(rec["x"]), float(rec["y"]), float(rec["z"])])
        extras.append(_unpack_description(rec.get("desc", "")))
    return PointList(names, convert_points(np.array(pts).reshape(-1, 3), frame, "LPS"), extras)


# ---- plain CSV -------------------------------------------------------------------------------------
def _format_csv(points: PointList, frame: Frame) -> str:
    keys: list[str] = []
    for e in points.extra:
        for k in e:
            if k not in keys:
                keys.append(k)
    if "description" in keys:  # description first, then the other fields in order of appearance
        keys.remove("description")
        keys.insert(0, "description")
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", *CSV_AXES[frame], *keys])
    for name, p, extra in zip(points.names, points.points(frame), points.extra):
        cells = []
        for k in keys:
            if k not in extra:
                cells.append("")
            elif isinstance(extra[k], str):
                cells.append(extra[k])
            else:
                cells.append(json.dumps(extra[k], default=_json_default))
        writer.writerow([name, *(repr(float(v)) for v in p), *cells])
    return buf.getvalue()


def _parse_csv(text: str) -> PointList:
    comment_frame: str | None = None
    lines = []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip().lower() == "coordinatesystem":
                comment_frame = value.strip().upper()
        elif line.strip():
            lines.append(line)
    reader = csv.reader(lines)
    header = [h.strip() for h in next(reader)]
    lower = [h.lower() for h in header]
    frame = None
    for name, axes in CSV_AXES.items():
        if all(a in lower for a in axes):
            frame = name
            break
    if frame is None:
        if all(a in lower for a in ("x", "y", "z")) and comment_frame in ("LPS", "RAS"):
            frame, axes = comment_frame, ("x", "y", "z")
        else:
            raise ValueError(
                f"CSV header {header} does not name the frame: use columns label,l,p,s (LPS) or "
                "label,r,a,s (RAS), or label,x,y,z after a '# CoordinateSystem = LPS' line"
            )
    else:
        axes = CSV_AXES[frame]
    idx = [lower.index(a) for a in axes]
    label_col = lower.index("label") if "label" in lower else None
    extra_cols = [n for n in range(len(header)) if n not in idx and n != label_col]
    names, pts, extras = [], [], []
    for row in reader:
        names.append(row[label_col] if label_col is not None else str(len(names) + 1))
        pts.append([float(row[n]) for n in idx])
        extra = {}
        for n in extra_cols:
            cell = row[n] if n < len(row) else ""
            if cell == "":
                continue
            key = header[n]
            extra[key] = cell if key == "description" else _parse_cell(cell)
        extras.append(extra)
    return PointList(
        names, convert_points(np.array(pts, dtype=np.float64).reshape(-1, 3), frame, "LPS"), extras
    )


def _parse_cell(cell: str) -> Any:
    try:
        return json.loads(cell)
    except json.JSONDecodeError:
        return cell
