"""Preview picture of a cohort: axial, coronal and sagittal slices with labels and landmarks overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from anatomical_embedding.io import Volume, atomic_write
from anatomical_embedding.phantoms.labels import LABEL_COLORS

#: Labels drawn in colour (the body-wide fat and soft-tissue labels would hide the image).
OVERLAY_LABELS = tuple(range(1, 14))
WINDOW = (-250.0, 350.0)  # abdomen window, HU
NEAR_MM = 10.0  # landmarks this close to a slice are drawn on it


def _subjects(source, n: int) -> list[tuple[str, Volume, Volume, dict[str, np.ndarray]]]:
    if hasattr(source, "subjects"):  # a Cohort on disk
        return [(s.id, s.load_image(), s.load_labels(), s.landmarks) for s in source.subjects[:n]]
    return [(s.subject_id, s.image, s.labels, s.landmarks) for s in list(source)[:n]]


def _lut() -> np.ndarray:
    lut = np.zeros((256, 4), dtype=np.float32)
    for lab in OVERLAY_LABELS:
        lut[lab, :3] = np.asarray(LABEL_COLORS[lab]) / 255.0
        lut[lab, 3] = 0.35
    return lut


def write_preview(
    source,
    path: str | Path,
    n_subjects: int = 3,
    overwrite: bool = True,
    centre_landmarks: Sequence[str] = ("L1_body_centre", "kidney_left_centroid", "L3_body_centre"),
) -> Path:
    """Write a PNG: one row per subject, axial / coronal / sagittal slice through ``centre_landmarks``.

    ``source`` is a :class:`Cohort` or a sequence of :class:`PhantomSubject`. Overwrites by default
    because the picture is derived output, regenerated at will.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = _subjects(source, n_subjects)
    if not items:
        raise ValueError("no subjects to preview")
    lut = _lut()
    fig, axes = plt.subplots(
        len(items),
        3,
        figsize=(12, 3.8 * len(items)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.2, 1.2, 1.0]},
    )
    for row, (sid, image, labels, landmarks) in enumerate(items):
        names = list(landmarks)
        pts = np.stack([landmarks[n] for n in names])
        ijk = image.world_to_index(pts)
        anchor = [landmarks.get(n, pts.mean(axis=0)) for n in centre_landmarks]
        k0 = int(np.clip(np.rint(image.world_to_index(anchor[0])[2]), 0, image.array.shape[0] - 1))
        j0 = int(np.clip(np.rint(image.world_to_index(anchor[1])[1]), 0, image.array.shape[1] - 1))
        i0 = int(np.clip(np.rint(image.world_to_index(anchor[2])[0]), 0, image.array.shape[2] - 1))
        si, sj, sk = image.spacing
        ni, nj, nk = image.shape_ijk
        views = [
            (
                f"axial k={k0}",
                image.array[k0],
                labels.array[k0],
                (0, ni * si, nj * sj, 0),
                "upper",
                np.abs(ijk[:, 2] - k0) * sk,
                ijk[:, 0] * si,
                ijk[:, 1] * sj,
            ),
            (
                f"coronal j={j0}",
                image.array[:, j0, :],
                labels.array[:, j0, :],
                (0, ni * si, 0, nk * sk),
                "lower",
                np.abs(ijk[:, 1] - j0) * sj,
                ijk[:, 0] * si,
                ijk[:, 2] * sk,
            ),
            (
                f"sagittal i={i0}",
                image.array[:, :, i0],
                labels.array[:, :, i0],
                (0, nj * sj, 0, nk * sk),
                "lower",
                np.abs(ijk[:, 0] - i0) * si,
                ijk[:, 1] * sj,
                ijk[:, 2] * sk,
            ),
        ]
        for col, (title, img, lab, extent, origin, dist, px, py) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(
                img,
                cmap="gray",
                vmin=WINDOW[0],
                vmax=WINDOW[1],
                extent=extent,
                origin=origin,
                interpolation="nearest",
            )
            ax.imshow(lut[lab], extent=extent, origin=origin, interpolation="nearest")
            near = dist <= NEAR_MM
            ax.scatter(px[near], py[near], s=14, c="yellow", edgecolors="black", linewidths=0.5)
            for n in np.flatnonzero(near):
                ax.annotate(
                    names[n],
                    (px[n], py[n]),
                    fontsize=5,
                    color="yellow",
                    xytext=(3, 3),
                    textcoords="offset points",
                )
            ax.set_title(f"{sid}  {title}", fontsize=8)
            ax.tick_params(labelsize=6)
            ax.set_xlabel("mm", fontsize=6)
    fig.tight_layout()
    path = Path(path)

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    try:
        atomic_write(path, save, overwrite)
    finally:
        plt.close(fig)
    return path
