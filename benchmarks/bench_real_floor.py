"""The time floor of landmark transfer with the shipped networks, against the affine registration.

    python benchmarks/bench_real_floor.py [--data ../shared/data] [--threads 1] [--transforms 3] [--only NAME ...]
                                          [--out benchmarks/results]

Issue 18 asks for embedding plus matching per pair below the SimpleITK affine registration's time. On
``bench_real``'s intra-subject pairs (same volumes, seeds and points) this measures, side by side on each pair:

* ``affine``: ``bench_real``'s affine registration (4 mm, 2 % sampling, two levels), as timed there;
* ``product``: the default model of the pair's modality, both images embedded as the product embeds them
  (``EmbedConfig.dense``) plus matching with the robust prior, charged as ``bench_real`` charges it;
* ``network floor``: one network pass over each whole prepared image (resampled, intensity preset, padded to the
  size multiple), with no window overlap, no blending and no matching at all. No window layout and no matcher can
  make a pair cheaper than this with these networks.

Writes ``real_floor.json`` and ``real_floor.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_line, md_table, write_results

log = logging.getLogger("bench_real_floor")
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "AnatomicalEmbedding" / "anatomical_embedding" / "models"


class NetworkFloor:
    """Seconds of one whole-image network pass (coarse and fine outputs), per image key: the faster of two."""

    def __init__(self, model, config) -> None:
        self.model, self.config, self.seconds, self.voxels = model, config, {}, {}

    def image(self, key: str, volume) -> float:
        from anatomical_embedding.inference.embedding import prepare_volume

        if key not in self.seconds:
            prepared, _, _ = prepare_volume(self.model, volume, self.config)
            array = prepared.array[None, None]
            times = []
            for _ in range(2):  # the faster of two: the first call on a new shape also pays allocations
                t0 = time.perf_counter()
                self.model.embed_patch(array, want_fine=True)
                times.append(time.perf_counter() - t0)
            self.seconds[key] = min(times)
            self.voxels[key] = int(array.size)
        return self.seconds[key]


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for group in sorted({r["group"] for r in records}):
        rs = [r for r in records if r["group"] == group]
        a, p, f = (np.array([r[k] for r in rs]) for k in ("affine_s", "product_s", "floor_s"))
        rows.append({"group": group, "pairs": len(rs), "affine_s": float(a.mean()), "product_s": float(p.mean()),
                     "floor_s": float(f.mean()), "floor_over_affine": float(np.mean(f / a)),
                     "pairs_floor_below_affine": int(np.sum(f < a)),
                     "pairs_product_below_affine": int(np.sum(p < a)),
                     "network_ns_per_voxel": float(np.mean([r["ns_per_voxel"] for r in rs]))})
    return rows


def write_report(result: dict, out: Path) -> None:
    rows = result["summary"]
    lines = ["# Time floor of landmark transfer with the shipped networks", "", machine_line(result["machine"]), "",
             f"Command: `{result['command']}`", "",
             f"Wall time {result['wall_s']:.0f} s, peak resident memory {result['peak_rss_mb']:.0f} MB.", "",
             "Seconds per pair, side by side on bench_real's intra-subject pairs (same volumes, seeds and points). "
             "*affine*: bench_real's SimpleITK affine. *product*: the default model's embedding of both images plus "
             "matching with the robust prior, as bench_real charges it. *network floor*: one network pass over each "
             "whole prepared image (the faster of two passes; no window overlap, no blending, no matching): the "
             "least any window layout or matcher could cost with these networks.", "",
             *md_table(["pair type", "pairs", "affine s", "product s", "network floor s", "floor / affine (mean)",
                        "pairs with floor < affine", "pairs with product < affine", "network ns per voxel"],
                       [[r["group"], r["pairs"], f"{r['affine_s']:.2f}", f"{r['product_s']:.2f}",
                         f"{r['floor_s']:.2f}", f"{r['floor_over_affine']:.2f}",
                         f"{r['pairs_floor_below_affine']} of {r['pairs']}",
                         f"{r['pairs_product_below_affine']} of {r['pairs']}",
                         f"{r['network_ns_per_voxel']:.0f}"] for r in rows]), "",
             "## Per pair", "",
             *md_table(["pair", "model", "prepared voxels per image", "affine s", "product s", "network floor s",
                        "mean error affine / product (mm)"],
                       [[r["pair"], r["model"], f"{r['voxels_source']} / {r['voxels_target']}", f"{r['affine_s']:.2f}",
                         f"{r['product_s']:.2f}", f"{r['floor_s']:.2f}",
                         f"{r['affine_mm']:.1f} / {r['product_mm']:.1f}"] for r in result["records"]])]
    write_results(out, "real_floor", result, lines)


def main(argv: list[str] | None = None) -> int:
    import bench_real as br

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    br.add_pair_arguments(ap, 1, "CPU threads of every method (bench_real's figures: 1)")
    args = ap.parse_args(argv)
    data = br.data_folder_or_error(args)
    if data is None:
        return 2
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import EmbedConfig

    t_start = time.perf_counter()
    # bench_real's product configuration (min_size 8 for its thin volumes).
    config = EmbedConfig.dense(fine_tile=32, min_size=8)
    methods = {}
    for modality in ("CT", "MR"):
        model = open_model(MODELS / f"default_{modality.lower()}.aemodel", threads=args.threads)
        methods[modality] = (model.card["name"], br.ModelMethod(modality, model, "refined", {}, config),
                             NetworkFloor(model, config))
    affine = br.Registration("affine", br.REG_CONFIG)
    records = []
    for name, modality, loader, path in br.case_list(data):
        if args.only and name not in args.only:
            continue
        case = br.Case(name, modality, path, br.to_benchmark_grid(loader()))
        label, product, floor = methods[modality]
        for pair in br.intra_pairs(case, args.transforms, args.points, args.seed):
            if not len(pair.points):
                continue
            pred_a, affine_s, _ = affine.run(pair)
            pred_p, product_s, _ = product.run(pair)
            floor_s = floor.image(pair.source_key, pair.source) + floor.image(pair.target_key, pair.target)
            vs, vt = floor.voxels[pair.source_key], floor.voxels[pair.target_key]
            records.append({
                "group": pair.group, "pair": pair.name, "model": label, "affine_s": affine_s, "product_s": product_s,
                "floor_s": floor_s, "voxels_source": vs, "voxels_target": vt, "ns_per_voxel": 1e9 * floor_s / (vs + vt),
                "affine_mm": float(np.linalg.norm(pred_a - pair.truth, axis=1).mean()),
                "product_mm": float(np.linalg.norm(pred_p - pair.truth, axis=1).mean())})
            log.info("%s: affine %.2f s, product %.2f s, floor %.2f s", pair.name, affine_s, product_s, floor_s)
    if not records:
        print(f"error: no readable volume in {data}", file=sys.stderr)
        return 2
    result = br.run_result("bench_real_floor.py", args.threads, argv, t_start, summarise(records), records)
    write_report(result, Path(args.out))
    for r in result["summary"]:
        print(f"{r['group']}: affine {r['affine_s']:.2f} s, product {r['product_s']:.2f} s, network floor "
              f"{r['floor_s']:.2f} s ({r['pairs_floor_below_affine']} of {r['pairs']} pairs below the affine)")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
