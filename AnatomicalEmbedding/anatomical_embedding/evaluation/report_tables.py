"""Result tables of the demo report, built from the CSV files the demo writes next to it.

The report's landmark and few-shot tables are computed from ``landmark_errors.csv`` and
``fewshot_metrics.csv`` (not from the in-memory results), so a reader who recomputes a mean or a Dice
from the CSV files gets exactly the number the report shows (the CSVs round errors to 1 µm).
"""
from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anatomical_embedding.evaluation.segmentation import METRIC_COLUMNS, write_metrics_csv
from anatomical_embedding.evaluation.landmarks import TransferRecord, summarise

LANDMARK_COLUMNS = ("method", "source", "target", "landmark", "error_mm", "seconds_for_scan")
FEWSHOT_COLUMNS = ("method", "shots") + METRIC_COLUMNS
LANDMARK_HEADERS = ["method", "mean (mm)", "median (mm)", "p90 (mm)", "s per scan", "s per landmark"]

Table = tuple[list[str], list[list[object]]]


def _read_csv(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(columns)} (was it written by "
                             "the demo's CSV writers?)")
        return list(reader)


def read_landmark_records(path: str | Path) -> list[TransferRecord]:
    """``landmark_errors.csv`` (``landmark_eval.write_records_csv``) back into one record per scan transfer."""
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
    for row in _read_csv(path, LANDMARK_COLUMNS):
        groups.setdefault((row["method"], row["source"], row["target"]), []).append(row)
    if not groups:
        raise ValueError(f"{path} has no landmark rows")
    return [TransferRecord(method, source, target, [r["landmark"] for r in rows],
                           np.array([float(r["error_mm"]) for r in rows]), float(rows[0]["seconds_for_scan"]))
            for (method, source, target), rows in groups.items()]


def landmark_tables(path: str | Path) -> tuple[Table, Table, dict[str, dict]]:
    """The summary table (per method), the per-landmark mean table and ``landmark_eval.summarise``'s dict."""
    lm = summarise(read_landmark_records(path))
    summary = (LANDMARK_HEADERS, [[m, v["mean_mm"], v["median_mm"], v["p90_mm"], v["seconds_per_scan"],
                                   v["seconds_per_landmark"]] for m, v in lm.items()])
    names = list(next(iter(lm.values()))["per_landmark_mean_mm"])
    per_landmark = (["landmark"] + list(lm), [[n] + [lm[m]["per_landmark_mean_mm"].get(n, float("nan")) for m in lm]
                                              for n in names])
    return summary, per_landmark, lm


def write_fewshot_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Per method, shot count, case and organ: Dice, HD95 and NSD (``evaluation.segmentation_metrics`` rows
    with ``method`` and ``shots`` added)."""
    return write_metrics_csv(rows, path, FEWSHOT_COLUMNS)


def read_fewshot_csv(path: str | Path) -> list[dict]:
    return [{**r, "shots": int(r["shots"]), "label": int(r["label"]), "dice": float(r["dice"]),
             "hd95_mm": float(r["hd95_mm"]), "nsd": float(r["nsd"])} for r in _read_csv(path, FEWSHOT_COLUMNS)]


def fewshot_dice_table(path: str | Path) -> tuple[Table, list[tuple[str, int]]]:
    """Mean Dice per organ (rows, plus a ``mean`` row over organs and cases) and method/shots (columns)."""
    rows = read_fewshot_csv(path)
    if not rows:
        raise ValueError(f"{path} has no few-shot rows")
    keys = sorted({(x["method"], x["shots"]) for x in rows})
    organs = sorted({x["name"] for x in rows})

    def mean_dice(sel) -> float:
        values = [x["dice"] for x in rows if sel(x)]
        return float(np.mean(values)) if values else float("nan")

    body = [[o] + [mean_dice(lambda x, o=o, mk=mk: x["name"] == o and (x["method"], x["shots"]) == mk) for mk in keys]
            for o in organs]
    body.append(["mean"] + [mean_dice(lambda x, mk=mk: (x["method"], x["shots"]) == mk) for mk in keys])
    return (["organ"] + [f"{m} {k}-shot" for m, k in keys], body), keys


def add_landmark_results(report, csv_path: str | Path, cdf_png: str | Path | None = None) -> dict[str, dict]:
    """Add the landmark-transfer section (tables from ``csv_path``) to a ``report.Report``; return the summary."""
    summary, per_landmark, lm = landmark_tables(csv_path)
    report.heading("Landmark transfer")
    report.table(*summary)
    if cdf_png is not None:
        report.image(cdf_png, "Cumulative distribution of landmark errors (time per scan includes embedding or "
                              "registration)")
    report.heading("Mean error per landmark (mm)", 3)
    report.table(*per_landmark)
    return lm


#: First header of the real-pair table (the others are the landmark table's): a table of its own in the report.
REAL_PAIR_HEADER = "method (real CT pair)"


def add_real_pair_results(report, csv_path: str | Path, info: dict) -> dict[str, dict]:
    """The demo's real CT pair section (table from ``csv_path``, as for the phantoms); returns the summary."""
    summary, _, lm = landmark_tables(csv_path)
    disp = info.get("true_displacement_mm", {})
    t = info.get("transform", {})
    report.heading("Real CT pair")
    report.paragraph(
        f"`{Path(info['path']).name}` (TotalSegmentator's example CT, Apache-2.0; {info['size_ijk'][0]}x"
        f"{info['size_ijk'][1]}x{info['size_ijk'][2]} voxels at {max(info['spacing_mm']):g} mm) against a copy "
        f"deformed by a known transform (rotation {t.get('rotation_deg')} degrees, scale {t.get('scale')}, a "
        f"B-spline displacement and an intensity change; true displacement {disp.get('mean')} mm on average, "
        f"{disp.get('max')} mm at most). {info['n_points']} structure points are picked in the deformed copy "
        f"and transferred with the shipped default CT model ({info['model']}), exactly as "
        "`benchmarks/bench_real.py` builds its intra-subject pairs. Time per scan includes embedding both scans "
        "or the registration.")
    report.table([REAL_PAIR_HEADER] + summary[0][1:], summary[1])
    return lm


def add_fewshot_results(report, csv_path: str | Path) -> list[tuple[str, int]]:
    """Add the few-shot Dice section (table from ``csv_path``) to a ``report.Report``; return its (method, shots)."""
    table, keys = fewshot_dice_table(csv_path)
    report.heading("Few-shot segmentation (Dice on held-out subjects)")
    report.table(*table)
    return keys
