"""``anatomical-embedding demo``: the whole mission on a fresh machine, no network, no GPU needed.

Stages:
1. generate a phantom cohort (and its preview picture);
2. pretrain every implemented method on the unlabelled training subjects;
3. export each run to an ONNX model package (``.aemodel``);
4. transfer all landmarks from one subject to each held-out subject (raw and robust-prior matching),
   against identical world coordinates and SimpleITK affine / affine + B-spline registration;
5. train few-shot heads on 1, 3 and 5 labelled cases per method and segment the held-out subjects;
6. write a report (HTML and Markdown with PNG figures) into the output folder.

``--quick`` is a smoke run of a few minutes; the default takes about 15-20 minutes on 2 CPU cores;
``--full`` uses a larger cohort, longer training and the GPU when present.
"""
from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = __doc__


def _handle(args: argparse.Namespace) -> int:
    from anatomical_embedding.evaluation.demo import run_demo

    summary = run_demo(args.out, quick=args.quick, full=args.full, seed=args.seed, overwrite=args.overwrite,
                       methods=args.methods)
    print()
    print(f"{'landmark transfer':34s} {'mean':>8s} {'median':>8s} {'p90':>8s} {'s/scan':>8s}")
    for m, v in summary["landmarks"].items():
        print(f"{m:34s} {v['mean_mm']:7.1f}mm {v['median_mm']:7.1f}mm {v['p90_mm']:7.1f}mm {v['seconds_per_scan']:8.2f}")
    print()
    for k, v in summary["fewshot_mean_dice"].items():
        print(f"few-shot {k:25s} mean Dice {v:.3f}")
    print()
    print(f"report      {summary['report_html']}")
    print(f"            {summary['report_md']}")
    print(f"total       {summary['seconds']:.0f} s")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the end-to-end demo on a synthetic phantom cohort",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smallest settings, a smoke run of a few minutes")
    mode.add_argument("--full", action="store_true", help="larger cohort and longer training (GPU if present)")
    p.add_argument("--methods", nargs="+", help="methods to pretrain (default: all implemented)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    p.set_defaults(func=_handle)
