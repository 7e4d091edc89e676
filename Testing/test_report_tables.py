"""The report's landmark and few-shot tables show exactly the aggregates of the CSV files written next to it.

The CSVs are written by the demo's writers from synthetic results, the report is built by the functions
the demo uses, and every number of its Markdown tables is checked against a mean / median / p90 / Dice
recomputed here from the CSV text alone (plain ``csv`` and sorting, not the engine's summaries); the
HTML must hold the same tables. Altering one CSV value after the report is written makes the check fail.
"""
from __future__ import annotations

import csv
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from anatomical_embedding.evaluation.landmarks import TransferRecord, write_records_csv
from anatomical_embedding.evaluation.report import Report
from anatomical_embedding.evaluation.report_tables import add_fewshot_results, add_landmark_results, write_fewshot_csv

METHODS = ["identical coordinate", "registration affine", "aefm robust prior"]
LANDMARKS = ["liver_dome", "kidney_left_upper_pole", "aortic_bifurcation", "l1_body", "spleen_tip"]
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_left", 4: "aorta"}


# ---- inputs ------------------------------------------------------------------------------------------
def write_inputs(folder: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    records = []
    for m, method in enumerate(METHODS):
        for t in range(3):
            # Errors from sub-millimetre to tens of mm (both number formats of the report); seconds per scan.
            errors = rng.gamma(2.0, [8.0, 2.0, 0.4][m], size=len(LANDMARKS))
            records.append(TransferRecord(method, "phantom_000", f"phantom_{9 + t:03d}", list(LANDMARKS), errors,
                                          float(rng.uniform(0.05, 30.0))))
    landmark_csv = write_records_csv(records, folder / "landmark_errors.csv")
    rows = []
    for method in ("aefm", "hdssl"):
        for shots in (1, 3):
            for case in ("phantom_009", "phantom_010", "phantom_011"):
                for label, name in ORGANS.items():
                    dice = float(rng.uniform(0.0, 1.0))
                    rows.append({"method": method, "shots": shots, "case": case, "label": label, "name": name,
                                 "dice": dice, "hd95_mm": float("inf") if dice == 0 else float(rng.uniform(1, 20)),
                                 "nsd": float(rng.uniform(0, 1))})
    fewshot_csv = write_fewshot_csv(rows, folder / "fewshot_metrics.csv")
    return landmark_csv, fewshot_csv


def build_report(folder: Path, landmark_csv: Path, fewshot_csv: Path) -> tuple[Path, Path]:
    """The demo's report sections, from the CSV files."""
    r = Report("AnatomicalEmbedding demo report")
    r.paragraph("Synthetic results for the table test.")
    add_landmark_results(r, landmark_csv)
    add_fewshot_results(r, fewshot_csv)
    return r.write(folder)


# ---- independent aggregates from the CSV text ----------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (the usual definition, numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def expected_tables(landmark_csv: Path, fewshot_csv: Path) -> list[tuple[list[str], list[list]]]:
    rows = list(csv.DictReader(landmark_csv.open(encoding="utf-8")))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary, per_landmark = [], {}
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        err = [float(r["error_mm"]) for r in sel]
        scans = {r["target"]: float(r["seconds_for_scan"]) for r in sel}  # one time per transferred scan
        summary.append([m, sum(err) / len(err), percentile(err, 50), percentile(err, 90),
                        sum(scans.values()) / len(scans), sum(scans.values()) / len(sel)])
        for r in sel:
            per_landmark.setdefault(r["landmark"], {}).setdefault(m, []).append(float(r["error_mm"]))
    landmark_table = [[n] + [sum(v[m]) / len(v[m]) for m in methods] for n, v in per_landmark.items()]

    seg = list(csv.DictReader(fewshot_csv.open(encoding="utf-8")))
    keys = sorted({(r["method"], int(r["shots"])) for r in seg})
    organs = sorted({r["name"] for r in seg})

    def dice(organ: str | None, key) -> float:
        d = [float(r["dice"]) for r in seg if (r["method"], int(r["shots"])) == key and organ in (None, r["name"])]
        return sum(d) / len(d)

    dice_table = [[o] + [dice(o, k) for k in keys] for o in organs] + [["mean"] + [dice(None, k) for k in keys]]
    return [
        (["method", "mean (mm)", "median (mm)", "p90 (mm)", "s per scan", "s per landmark"], summary),
        (["landmark"] + methods, landmark_table),
        (["organ"] + [f"{m} {k}-shot" for m, k in keys], dice_table),
    ]


# ---- parsing the report back ---------------------------------------------------------------------------
def markdown_tables(text: str) -> list[list[list[str]]]:
    tables, current = [], None
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not set(cells) <= {"---"}:
                current.append(cells)
        else:
            current = None
    return tables


class _TableParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(text: str) -> list[list[list[str]]]:
    parser = _TableParser()
    parser.feed(text)
    return parser.tables


def assert_shows(cell: str, value: float, where: str) -> None:
    """``cell`` is ``value`` printed to the precision the cell shows (half a unit of its last digit)."""
    if math.isnan(value):
        assert cell == "–", where
        return
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    assert abs(float(cell) - value) <= 0.5 * 10 ** -decimals + 1e-12, f"{where}: shows {cell}, CSV gives {value:.6g}"


def check_report(md_path: Path, html_path: Path, landmark_csv: Path, fewshot_csv: Path) -> None:
    """Every CSV-derived table is in the report (found by its header row) with the CSV's numbers; the HTML
    holds the same tables as the Markdown. Usable on a demo output folder (its other tables are ignored)."""
    md = markdown_tables(md_path.read_text(encoding="utf-8"))
    for n, (headers, rows) in enumerate(expected_tables(landmark_csv, fewshot_csv)):
        found = [t for t in md if t[0] == headers]
        assert len(found) == 1, f"{len(found)} tables with the headers {headers} in {md_path.name}, expected one"
        table = found[0]
        assert [r[0] for r in table[1:]] == [str(r[0]) for r in rows], f"table {n} row names"
        for got, want in zip(table[1:], rows):
            assert len(got) == len(want)
            for h, cell, value in zip(headers[1:], got[1:], want[1:]):
                assert_shows(cell, value, f"table {n}, {got[0]}, {h}")
    assert html_tables(html_path.read_text(encoding="utf-8")) == md, "the HTML tables differ from the Markdown ones"


# ---- tests ---------------------------------------------------------------------------------------------
def test_report_tables_equal_the_csv_aggregates(tmp_path):
    landmark_csv, fewshot_csv = write_inputs(tmp_path / "data")
    md, html = build_report(tmp_path / "report", landmark_csv, fewshot_csv)
    check_report(md, html, landmark_csv, fewshot_csv)
    assert len(markdown_tables(md.read_text(encoding="utf-8"))) == 3
    # Both number formats were exercised (3 significant digits below 1, one decimal above).
    text = md.read_text(encoding="utf-8")
    assert "| aefm robust prior | 0." in text and "| identical coordinate | 1" in text


def _edit_csv(path: Path, row_index: int, column: str, value: str) -> None:
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    rows[row_index][column] = value
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("which", ["landmark", "dice"])
def test_check_fails_when_a_csv_value_changes(tmp_path, which):
    landmark_csv, fewshot_csv = write_inputs(tmp_path / "data")
    md, html = build_report(tmp_path / "report", landmark_csv, fewshot_csv)
    check_report(md, html, landmark_csv, fewshot_csv)
    if which == "landmark":  # one landmark of one scan moves by 3 mm
        row = next(i for i, r in enumerate(csv.DictReader(landmark_csv.open(encoding="utf-8")))
                   if r["method"] == "aefm robust prior")
        old = float(next(r for i, r in enumerate(csv.DictReader(landmark_csv.open(encoding="utf-8"))) if i == row)
                    ["error_mm"])
        _edit_csv(landmark_csv, row, "error_mm", f"{old + 3.0:.3f}")
        match = "aefm robust prior"
    else:  # one organ of one case: Dice 0.3 higher
        old = float(next(csv.DictReader(fewshot_csv.open(encoding="utf-8")))["dice"])
        _edit_csv(fewshot_csv, 0, "dice", repr(old + 0.3))
        match = "shows"
    with pytest.raises(AssertionError, match=match):
        check_report(md, html, landmark_csv, fewshot_csv)
    # Rebuilt from the edited CSV, the report agrees with it again.
    md, html = build_report(tmp_path / "report2", landmark_csv, fewshot_csv)
    check_report(md, html, landmark_csv, fewshot_csv)


def test_html_table_mismatch_is_detected(tmp_path):
    landmark_csv, fewshot_csv = write_inputs(tmp_path / "data")
    md, html = build_report(tmp_path / "report", landmark_csv, fewshot_csv)
    page = html.read_text(encoding="utf-8")
    first_number = page.index("<td>", page.index("<tbody>")) + len("<td>")
    first_number = page.index("<td>", first_number) + len("<td>")  # the mean of the first method
    html.write_text(page[:first_number] + "9" + page[first_number:], encoding="utf-8")
    with pytest.raises(AssertionError, match="HTML"):
        check_report(md, html, landmark_csv, fewshot_csv)
