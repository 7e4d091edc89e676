"""``anatomical-embedding demo``: the whole mission on a fresh machine, no network, no GPU needed.

Stages (each prints progress and what it produced):
1. generate a phantom cohort and its preview picture.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    n_subjects: int
    spacing: float
    size: int | None

    @classmethod
    def for_mode(cls, quick: bool, full: bool) -> "DemoSettings":
        if quick:
            return cls(n_subjects=8, spacing=4.0, size=None)
        if full:
            return cls(n_subjects=40, spacing=2.0, size=None)
        return cls(n_subjects=20, spacing=3.0, size=None)


def run_demo(out: Path, quick: bool = False, full: bool = False, seed: int = 0, overwrite: bool = False) -> dict:
    from .phantoms import generate_cohort, load_cohort
    from .phantoms.preview import write_preview

    settings = DemoSettings.for_mode(quick, full)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose another --out or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"settings": settings.__dict__, "stages": {}}

    t0 = time.perf_counter()
    print(f"[1/1] generating {settings.n_subjects} phantom subjects at {settings.spacing} mm ...", flush=True)
    manifest = generate_cohort(out / "cohort", settings.n_subjects, seed, spacing=settings.spacing,
                               size=settings.size, overwrite=overwrite)
    cohort = load_cohort(manifest)
    preview = write_preview(cohort, out / "cohort" / "preview.png")
    summary["stages"]["phantoms"] = {
        "manifest": str(manifest), "preview": str(preview), "seconds": round(time.perf_counter() - t0, 1),
        "subjects": len(cohort.subjects), "landmarks_per_subject": len(cohort.subjects[0].landmarks),
        "labels": len(cohort.label_names),
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _handle(args: argparse.Namespace) -> int:
    summary = run_demo(args.out, quick=args.quick, full=args.full, seed=args.seed, overwrite=args.overwrite)
    ph = summary["stages"]["phantoms"]
    print()
    print(f"cohort      {ph['subjects']} subjects, {ph['landmarks_per_subject']} landmarks each, "
          f"{ph['labels']} organ labels ({ph['seconds']} s)")
    print(f"manifest    {ph['manifest']}")
    print(f"preview     {ph['preview']}")
    print(f"summary     {Path(args.out) / 'demo_summary.json'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on a synthetic phantom cohort",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smallest settings, a smoke run of a few minutes")
    mode.add_argument("--full", action="store_true", help="larger cohort and longer training (GPU if present)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    p.set_defaults(func=_handle)
