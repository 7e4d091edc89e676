"""How the low-confidence flag of refined matches relates to their error, on bench_real's real pairs.

    python benchmarks/bench_real_confidence.py [--data ../shared/data] [--threads 2] [--transforms 3]
                                               [--slab-mm 60] [--only NAME ...] [--no-cross] [--out benchmarks/results]

The default model of each pair's modality matches bench_real's points (intra-subject, slab and cross-subject pairs:
same volumes, seeds and points) with the robust prior, as the product does. For every match both confidence rules
of ``MatchConfig.refined_confidence`` are evaluated on the same match: ``similarity`` (the default: the fine cosine at
the prediction, scaled by the refined fit's mean similarity) and ``forward-backward`` (the raw backward search's
distance and the similarity, the earlier rule). Reported per pair type: of the matches within 3 mm of the truth,
the share flagged low (false alarms); of those over 10 mm off, the share flagged (caught). Matches the prior could
not answer (raw fallbacks) are flagged under both rules and counted too.

Writes ``real_confidence.json`` and ``real_confidence.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_line, md_table, write_results

log = logging.getLogger("bench_real_confidence")
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "AnatomicalEmbedding" / "anatomical_embedding" / "models"
GOOD_MM, BAD_MM = 3.0, 10.0
RULES = ("similarity", "forward-backward")


def flags(matcher, matches) -> dict[str, np.ndarray]:
    """Low-confidence flags of ``matches`` under both rules (one matching run, computed from its fields)."""
    from anatomical_embedding.inference.matching import fb_confidence, refined_confidence

    cfg, prior = matcher.config, matcher.prior
    sigma = matcher._fb_sigma()
    out = {rule: [] for rule in RULES}
    for m in matches:
        f = m.final
        if f.method != "prior" or prior is None or prior.refined is None:
            for rule in RULES:  # raw fallbacks and raw matches: the backward rule in both (as the matcher does)
                out[rule].append(bool(f.low_confidence))
            continue
        out["forward-backward"].append(fb_confidence(f.fb_distance_mm, f.similarity, sigma) < cfg.low_confidence)
        out["similarity"].append(bool(refined_confidence(f.fine_similarity, prior.refined.similarity, cfg)
                                      < cfg.low_confidence))
    return {rule: np.array(v, dtype=bool) for rule, v in out.items()}


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for group in [g for g in ("intra CT", "intra MR", "slab CT", "slab MR", "cross CT", "cross MR")
                  if any(r["group"] == g for r in records)]:
        rs = [r for r in records if r["group"] == group]
        err = np.concatenate([r["errors_mm"] for r in rs])
        good, bad = err <= GOOD_MM, err > BAD_MM
        row = {"group": group, "pairs": len(rs), "points": int(err.size), "good": int(good.sum()),
               "bad": int(bad.sum())}
        for rule in RULES:
            low = np.concatenate([r["low"][rule] for r in rs])
            row[f"{rule} flagged good"] = int(low[good].sum())
            row[f"{rule} flagged bad"] = int(low[bad].sum())
        rows.append(row)
    return rows


def _share(n: int, of: int) -> str:
    return f"{n} of {of}" + (f" ({100.0 * n / of:.1f} %)" if of else "")


def write_report(result: dict, out: Path) -> None:
    rows = result["summary"]
    lines = ["# Low-confidence flags of refined matches on real pairs", "", machine_line(result["machine"]), "",
             f"Command: `{result['command']}`", "",
             f"Wall time {result['wall_s']:.0f} s, peak resident memory {result['peak_rss_mb']:.0f} MB.", "",
             f"The default models match bench_real's points with the robust prior. Both rules of "
             f"`MatchConfig.refined_confidence` on the same matches: *similarity* (default) and *forward-backward* "
             f"(the earlier rule). *Correct*: within {GOOD_MM:g} mm of the truth (a flag there is a false alarm); "
             f"*wrong*: over {BAD_MM:g} mm off (a flag there is caught).", "",
             *md_table(["pair type", "pairs", "points", "correct flagged, similarity",
                        "correct flagged, forward-backward", "wrong flagged, similarity",
                        "wrong flagged, forward-backward"],
                       [[r["group"], r["pairs"], r["points"],
                         _share(r["similarity flagged good"], r["good"]),
                         _share(r["forward-backward flagged good"], r["good"]),
                         _share(r["similarity flagged bad"], r["bad"]),
                         _share(r["forward-backward flagged bad"], r["bad"])] for r in rows])]
    payload = {**result, "records": [{**r, "errors_mm": np.round(r["errors_mm"], 3).tolist(),
                                      "low": {k: v.tolist() for k, v in r["low"].items()}}
                                     for r in result["records"]]}
    write_results(out, "real_confidence", payload, lines)


def main(argv: list[str] | None = None) -> int:
    import bench_real as br

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    br.add_pair_arguments(ap, 2)
    ap.add_argument("--slab-mm", type=float, default=br.SLAB_MM)
    ap.add_argument("--no-cross", action="store_true", help="leave out the cross-subject pairs")
    args = ap.parse_args(argv)
    data = br.data_folder_or_error(args)
    if data is None:
        return 2
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.embedding import EmbedConfig, embed_volume
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.inference.prior import PriorConfig

    t_start = time.perf_counter()
    config = EmbedConfig.dense(fine_tile=32, min_size=8)  # bench_real's
    models = {m: open_model(MODELS / f"default_{m.lower()}.aemodel", threads=args.threads) for m in ("CT", "MR")}
    cases = []
    for name, modality, loader, path in br.case_list(data):
        if not args.only or name in args.only:
            cases.append(br.Case(name, modality, path, br.to_benchmark_grid(loader())))
    pairs = [p for c in cases for p in br.intra_pairs(c, args.transforms, args.points, args.seed, args.slab_mm)]
    if not args.no_cross:
        volumes = {c.name: c.volume for c in cases}
        pairs += br.cross_ct_pairs(data, volumes)[0] + br.cross_mr_pairs(data, volumes)[0]
    pairs = [p for p in pairs if len(p.points)]
    if not pairs:
        print(f"error: no readable volume in {data}", file=sys.stderr)
        return 2
    embeddings: dict[tuple[str, str], object] = {}
    records = []
    for pair in pairs:
        modality = pair.group.split()[-1]
        emb = []
        for key, volume in ((pair.source_key, pair.source), (pair.target_key, pair.target)):
            if (modality, key) not in embeddings:
                embeddings[(modality, key)] = embed_volume(models[modality], volume, config=config)
            emb.append(embeddings[(modality, key)])
        matcher = Matcher(emb[0], emb[1], prior_config=PriorConfig())
        matches = matcher.match(pair.points, with_raw=False)
        err = np.linalg.norm(np.array([m.final.point_lps for m in matches]) - pair.truth, axis=1)
        low = flags(matcher, matches)
        records.append({"group": pair.group, "pair": pair.name, "errors_mm": err, "low": low})
        log.info("%s: mean %.1f mm; flagged %s", pair.name, err.mean(),
                 ", ".join(f"{rule} {int(v.sum())}/{v.size}" for rule, v in low.items()))
        if len(embeddings) > 8:  # a pair's two images at most are reused by the next pairs
            embeddings = dict(list(embeddings.items())[-4:])
    result = br.run_result("bench_real_confidence.py", args.threads, argv, t_start, summarise(records), records)
    write_report(result, Path(args.out))
    for r in result["summary"]:
        print(f"{r['group']}: correct flagged {r['similarity flagged good']}/{r['good']} (similarity) vs "
              f"{r['forward-backward flagged good']}/{r['good']} (forward-backward); wrong flagged "
              f"{r['similarity flagged bad']}/{r['bad']} vs {r['forward-backward flagged bad']}/{r['bad']}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
