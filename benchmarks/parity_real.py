"""Point-by-point parity of two models in a ``bench_real.py`` result (e.g. an fp32 package and its int8 copy).

    python benchmarks/parity_real.py --result DIR/real.json --reference default_ct --candidate default_ct_int8
                                     [--voxel-mm 4] [--out benchmarks/results]

For every pair and variant (raw, robust prior) both models ran on, the candidate's predicted point is compared
with the reference's: the share within one voxel (no axis off by more than ``--voxel-mm``) and the shift in mm.
Writes ``precision_parity.{json,md}`` with the accuracy of both (mean error against the truth) beside it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from _common import machine_line, md_table, write_results


def parity(records: list[dict], reference: str, candidate: str, voxel_mm: float) -> list[dict]:
    by = {(r["group"], r["pair"], r["method"]): r for r in records if "predicted_lps" in r}
    rows = []
    for variant in ("raw", "robust prior"):
        groups: dict[str, dict[str, list]] = {}
        for (group, pair, method), ref in by.items():
            if method != f"{reference} {variant}":
                continue
            cand = by.get((group, pair, f"{candidate} {variant}"))
            if cand is None:
                continue
            a, b = np.asarray(ref["predicted_lps"]), np.asarray(cand["predicted_lps"])
            g = groups.setdefault(group, {"within": [], "shift": [], "err_ref": [], "err_cand": []})
            g["within"] += np.all(np.abs(a - b) <= voxel_mm + 1e-6, axis=1).tolist()
            g["shift"] += np.linalg.norm(a - b, axis=1).tolist()
            g["err_ref"] += list(ref["errors_mm"])
            g["err_cand"] += list(cand["errors_mm"])
        for group, g in groups.items():
            shift = np.asarray(g["shift"])
            rows.append({"group": group, "variant": variant, "points": len(shift),
                         "within_one_voxel": int(np.sum(g["within"])), "shift_median_mm": float(np.median(shift)),
                         "shift_p90_mm": float(np.percentile(shift, 90)), "shift_max_mm": float(shift.max()),
                         "error_reference_mm": float(np.mean(g["err_ref"])),
                         "error_candidate_mm": float(np.mean(g["err_cand"]))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, required=True, help="real.json written by bench_real.py")
    ap.add_argument("--reference", required=True, help="model label of the reference (fp32) package")
    ap.add_argument("--candidate", required=True, help="model label of the package compared with it")
    ap.add_argument("--voxel-mm", type=float, default=4.0, help="the models' voxel size (default 4 mm)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    result = json.loads(args.result.read_text(encoding="utf-8"))
    rows = parity(result["records"], args.reference, args.candidate, args.voxel_mm)
    if not rows:
        raise SystemExit(f"no pair in {args.result} has predictions of both {args.reference} and {args.candidate} "
                         "(bench_real.py records predictions since 2026-12-06; rerun it)")
    lines = [f"# Parity of {args.candidate} with {args.reference} on real scans", "",
             f"From `{args.result.name}`, written by `{result.get('command', 'bench_real.py')}`.", "",
             machine_line(result["machine"]),
             "", "Within one voxel: no axis off by more than "
             f"{args.voxel_mm:g} mm from the reference's prediction. Errors are means against the truth.", "",
             *md_table(["pair type", "variant", "points", "within one voxel", "shift median / p90 / max (mm)",
                        f"error {args.reference} (mm)", f"error {args.candidate} (mm)"],
                       [[r["group"], r["variant"], r["points"],
                         f"{r['within_one_voxel']} ({100 * r['within_one_voxel'] / r['points']:.0f} %)",
                         f"{r['shift_median_mm']:.2f} / {r['shift_p90_mm']:.2f} / {r['shift_max_mm']:.1f}",
                         f"{r['error_reference_mm']:.1f}", f"{r['error_candidate_mm']:.1f}"] for r in rows])]
    write_results(args.out, "precision_parity", {"source": str(args.result), "reference": args.reference,
                                                 "candidate": args.candidate, "voxel_mm": args.voxel_mm, "rows": rows,
                                                 "machine": result["machine"]}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
