"""Segmentation metrics per organ (MONAI): Dice, 95th-percentile Hausdorff distance, normalised surface Dice."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from anatomical_embedding.io import Volume, resample_like

METRIC_COLUMNS = ("case", "label", "name", "dice", "hd95_mm", "nsd")


def segmentation_metrics(pred: Volume, ref: Volume, names: Mapping[int, str], nsd_tolerance_mm: float = 2.0,
                         case: str = "") -> list[dict]:
    """One row per named label. ``pred`` is resampled onto ``ref``'s grid if their grids differ.

    Empty-vs-empty gives Dice 1 and no distances; a structure missing in one map gives Dice 0 and
    an infinite HD95 (reported as ``inf``), which is what a reader should see.

    Single-slice images (one axis of size 1) are evaluated in 2D, on the slice with its in-plane spacing in
    mm: MONAI finds surfaces by erosion, and a (1, H, W) volume eroded in 3D has every pixel on its surface
    (the flat axis has no inside), which made HD95 too small and NSD too high.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    if not pred.same_geometry(ref, atol=1e-3):
        pred = resample_like(pred, ref, is_label=True)
    values = sorted(int(v) for v in names if int(v) != 0)
    if not values:
        raise ValueError("no labels to evaluate: give at least one named non-zero label")
    p = torch.from_numpy(np.asarray(pred.array).astype(np.int64))
    r = torch.from_numpy(np.asarray(ref.array).astype(np.int64))
    spacing = [float(s) for s in ref.spacing[::-1]]  # array axes are (k, j, i)
    flat = [a for a, n in enumerate(p.shape) if n == 1]
    if flat and p.dim() - len(flat) >= 2:  # 2D image: metrics on the slice, in-plane spacing
        keep = [a for a in range(p.dim()) if a not in flat]
        p, r = p.reshape([p.shape[a] for a in keep]), r.reshape([r.shape[a] for a in keep])
        spacing = [spacing[a] for a in keep]
    p1 = torch.stack([p == v for v in values])[None].float()
    r1 = torch.stack([r == v for v in values])[None].float()
    dice = compute_dice(p1, r1, include_background=True, ignore_empty=False)[0]
    hd = compute_hausdorff_distance(p1, r1, include_background=True, percentile=95, spacing=spacing)[0]
    nsd = compute_surface_dice(p1, r1, [nsd_tolerance_mm] * len(values), include_background=True,
                               spacing=spacing)[0]
    rows = []
    for n, v in enumerate(values):
        both_empty = not bool(p1[0, n].any()) and not bool(r1[0, n].any())
        rows.append({
            "case": case, "label": v, "name": names[v],
            "dice": 1.0 if both_empty else float(dice[n]),
            "hd95_mm": float("nan") if both_empty else float(hd[n]),
            "nsd": 1.0 if both_empty else float(nsd[n]),
        })
    return rows


def write_metrics_csv(rows: Sequence[dict], path: str | Path, columns: Sequence[str] = METRIC_COLUMNS) -> Path:
    """``rows`` (dicts with at least ``columns``) as a CSV with exactly those columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in columns})
    return path


def summarise(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean Dice, HD95 (finite values only) and NSD per organ name.

    ``hd95_inf`` counts the infinite HD95 values (an organ missed in the prediction or absent from the
    reference) that the HD95 mean leaves out, so a good-looking mean over few cases is visible as such;
    ``n`` is the number of rows.
    """
    out: dict[str, dict[str, float]] = {}
    for name in sorted({r["name"] for r in rows}):
        sel = [r for r in rows if r["name"] == name]
        hd = [r["hd95_mm"] for r in sel if math.isfinite(r["hd95_mm"])]
        out[name] = {"dice": float(np.mean([r["dice"] for r in sel])),
                     "hd95_mm": float(np.mean(hd)) if hd else float("nan"),
                     "nsd": float(np.mean([r["nsd"] for r in sel])), "n": len(sel),
                     "hd95_inf": sum(1 for r in sel if math.isinf(r["hd95_mm"]))}
    return out


def plot_dice(rows: Sequence[dict], path: str | Path, title: str = "Dice per organ") -> Path:
    """Box plot of Dice per organ (one point per case)."""
    from anatomical_embedding.evaluation.figures import pyplot, save_figure

    plt = pyplot()
    names = sorted({r["name"] for r in rows})
    data = [[r["dice"] for r in rows if r["name"] == n] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(names) + 2), 3.5), dpi=120)
    ax.boxplot(data, showmeans=True)
    for n, d in enumerate(data, start=1):
        ax.scatter(np.full(len(d), n) + np.random.default_rng(n).uniform(-0.08, 0.08, len(d)), d, s=10, alpha=0.7)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
