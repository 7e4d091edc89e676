"""``anatomical-embedding phantoms``: write a synthetic abdomen CT cohort with labels and landmarks.

Output folder layout:
  images/phantom_000.nii.gz       CT-like image, int16 HU
  labels/phantom_000.nii.gz       organ label map (uint8); labels/label_names.json, labels/labels.ctbl
  landmarks/phantom_000.mrk.json  Slicer markups, LPS world coordinates (also .csv)
  manifest.json                   everything above, plus the organ each landmark lies in
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _handle(args: argparse.Namespace) -> int:
    from anatomical_embedding.phantoms.generate import generate_cohort, load_cohort

    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    t0 = time.perf_counter()
    manifest = generate_cohort(
        args.out,
        args.n,
        args.seed,
        spacing=args.spacing,
        size=args.size,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    seconds = time.perf_counter() - t0
    info = json.loads(manifest.read_text(encoding="utf-8"))
    shapes = np.array([s["shape_ijk"] for s in info["subjects"]])
    spacings = np.array([s["spacing"] for s in info["subjects"]])
    print(f"subjects    {info['n']} (seed {info['seed']}) in {seconds:.1f} s")
    print(f"size ijk    {shapes.min(0).tolist()} .. {shapes.max(0).tolist()} voxels")
    print(
        f"spacing     in-plane {spacings[:, 0].min():.2f}-{spacings[:, 0].max():.2f} mm, "
        f"slices {spacings[:, 2].min():.2f}-{spacings[:, 2].max():.2f} mm"
    )
    print(f"landmarks   {len(info['landmark_organs'])} per subject; labels {len(info['label_names'])} organs")
    print(f"manifest    {manifest}")
    if args.preview is not None:
        from anatomical_embedding.phantoms.preview import write_preview

        target = Path(args.out) / "preview.png" if args.preview is True else Path(args.preview)
        print(f"preview     {write_preview(load_cohort(manifest), target, overwrite=True)}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantoms",
        help="generate a synthetic abdomen CT cohort (images, labels, landmarks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--n", type=int, default=20, help="number of subjects (default: 20)")
    p.add_argument(
        "--seed", type=int, default=0, help="cohort seed; the same seed gives identical files (default: 0)"
    )
    p.add_argument(
        "--spacing",
        type=float,
        default=None,
        help="fixed isotropic spacing in mm; default: random per subject around 2 mm "
        "(in-plane x1.0-1.25, slices x1.0-1.5)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="at most this many voxels per axis (coarser spacing, same anatomy): small test cohorts",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default: 2)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder, replacing files")
    p.add_argument(
        "--preview",
        nargs="?",
        const=True,
        default=None,
        metavar="PATH",
        help="also write a PNG of slices with labels and landmarks (default PATH: OUT/preview.png)",
    )
    p.set_defaults(func=_handle)
