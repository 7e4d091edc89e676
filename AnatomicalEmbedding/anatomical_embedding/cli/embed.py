"""``anatomical-embedding embed | match | export``: dense embeddings, click-to-correspond, ONNX packages.

World points on the command line (``--point``) are RAS by default, like Slicer; pass ``--frame LPS`` for
ITK/DICOM coordinates. Markups files carry their own coordinate system. Output markups (.mrk.json) are
written in LPS with per-point measurements ``similarity``, ``confidence`` and ``low_confidence`` (0/1),
readable by Slicer.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from anatomical_embedding.cli.options import add_backend_arg, backend_name

log = logging.getLogger(__name__)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a .aemodel package (ONNX Runtime) or a training run directory (torch); default: "
                   "the shipped default model for the image's modality (CT if it holds air in HU, else MR)")
    add_backend_arg(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cache", default=None, help="embedding cache folder (default $ANATOMICAL_EMBEDDING_CACHE "
                   "or ~/.cache/anatomical-embedding)")
    p.add_argument("--cache-budget-gb", type=float, default=4.0, help="cache size budget (LRU eviction)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--replace-nonfinite", action="store_true",
                   help="set NaN/infinite voxels to the image minimum (default: refuse such images)")
    p.add_argument("--max-window-voxels", type=int, default=0, metavar="N",
                   help="fit each image's sliding windows, up to N voxels each, so the network processes fewer "
                        "voxels (e.g. 2097152 = 128^3: 1.7x faster for a published-size model on a 512x512x300 "
                        "CT); default 0: cubes of the model's patch size, as in the papers")


def register(subparsers) -> None:
    e = subparsers.add_parser("embed", help="embed an image (coarse map for the whole volume, cached)")
    _add_model_args(e)
    e.add_argument("--image", required=True, help="image file or DICOM folder")
    e.add_argument("--out", default=None, help="optional .npz with the coarse map and its grid geometry")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=_embed)

    m = subparsers.add_parser("match", help="find the points of the source image in the target image")
    _add_model_args(m)
    m.add_argument("--source", required=True, help="image the points belong to")
    m.add_argument("--target", required=True, help="image to find them in")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--point", action="append", help="x,y,z world point in --frame (repeatable; write --point=-1,2,3 "
                   "when x is negative)")
    g.add_argument("--points", help="markups file with the points (.mrk.json, .csv, .fcsv)")
    m.add_argument("--frame", default="RAS", choices=["RAS", "LPS"], help="frame of --point (default RAS, as Slicer)")
    m.add_argument("--out", default=None, help="output point list (.mrk.json, .fcsv or .csv), LPS, with scores")
    m.add_argument("--report", default=None, help="optional JSON with raw and corrected matches and the prior")
    m.add_argument("--heatmap", default=None, help="similarity to the first point as an image on the target grid")
    m.add_argument("--no-prior", action="store_true", help="raw matching only (no robust affine/TPS prior)")
    m.add_argument("--no-refine", action="store_true",
                   help="keep the coarse robust prior and its fine search (skip the dense refinement in embedding "
                        "space; faster, less precise)")
    m.add_argument("--top-k", type=int, default=3)
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=_match)

    x = subparsers.add_parser("export", help="export a training run to a .aemodel package (ONNX + model card)")
    src = x.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="training run directory")
    src.add_argument("--package", help="an fp32 .aemodel to convert to --precision fp16 or int8")
    x.add_argument("--out", required=True, help="MODEL.aemodel (a MODEL.aemodel.sha256 sidecar is written too)")
    x.add_argument("--checkpoint", default="last")
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp32 (default, exact); fp16 (for ONNX Runtime on CUDA; slower on CPUs); int8 (static "
                        "quantisation, faster on CPUs with VNNI/AMX). Parity to fp32 goes into the model card")
    x.add_argument("--calibration-images", nargs="+", default=None, metavar="IMAGE",
                   help="images like those the model will embed: int8 calibrates on them (required), and the "
                        "parity of fp16/int8 is measured on other windows of them")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=_export)


def _check_model_args(args) -> None:
    """Numeric arguments, checked before any file is read."""
    from anatomical_embedding.io.settings import in_range

    in_range(args.cache_budget_gb, "--cache-budget-gb", 0.0)
    if args.max_window_voxels:
        in_range(args.max_window_voxels, "--max-window-voxels", 16 ** 3)


def _open(args, image):
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.defaults import resolve_model
    from anatomical_embedding.inference.embedding import EmbeddingCache

    model = open_model(resolve_model(args.model, image.array), backend=backend_name(args.backend), device=args.device)
    cache = None if args.no_cache else EmbeddingCache(args.cache, int(args.cache_budget_gb * 2**30))
    return model, cache


def _embed(args: argparse.Namespace) -> int:
    from anatomical_embedding.inference.embedding import EmbedConfig, embed_volume
    from anatomical_embedding.io import atomic_write, read_image
    from anatomical_embedding.io.outputs import check_outputs

    _check_model_args(args)
    check_outputs([(args.out, "--out", (".npz",))], args.overwrite)
    vol = read_image(args.image, replace_nonfinite=args.replace_nonfinite)
    model, cache = _open(args, vol)
    t0 = time.perf_counter()
    emb = embed_volume(model, vol, cache, EmbedConfig(max_window_voxels=args.max_window_voxels))
    dt = time.perf_counter() - t0
    print(f"embedded {args.image}: coarse map {emb.coarse.shape} in {dt:.2f} s ({model.backend}, {model!r})")
    if cache is not None:
        print(f"cache entry {emb.key} in {cache.root} ({cache.size_bytes(emb.key) / 2**20:.1f} MB)")
    if args.out:
        out = Path(args.out)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, coarse=emb.coarse.astype(np.float16), spacing=emb.prepared.spacing * emb.stride,
                         origin=emb.coarse_volume(emb.coarse[0]).origin, direction=emb.prepared.direction,
                         card=json.dumps(model.card), frame="LPS", axis_order="C,k,j,i")

        atomic_write(out, write, overwrite=args.overwrite)
        print(f"wrote {out}")
    return 0


def _parse_point(text: str) -> list[float]:
    parts = [p for p in text.replace(";", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise ValueError(f"--point needs x,y,z, got {text!r}")
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"--point needs three numbers x,y,z, got {text!r}") from None


def write_matches(path: Path, names: list[str], matches, overwrite: bool = False) -> Path:
    """Write matched points (LPS) with io.markups; per-point extras: similarity, confidence, low_confidence,
    fb_distance_mm, method and the raw (uncorrected) match. ``.mrk.json`` also gets Slicer measurements
    (``similarity``, ``confidence``, ``low_confidence`` as 0/1 per control point) so Slicer shows them.
    """
    from anatomical_embedding.io import atomic_write
    from anatomical_embedding.io.markups import PointList, points_format, write_points

    extra = []
    for m in matches:
        f = m.final
        e = {"similarity": round(f.similarity, 5), "confidence": round(f.confidence, 5) if f.confidence is not None else None,
             "low_confidence": bool(f.low_confidence), "fb_distance_mm": f.fb_distance_mm, "method": f.method,
             "description": f"similarity={f.similarity:.3f} confidence={(f.confidence or 0):.3f}"
                            + (" LOW CONFIDENCE" if f.low_confidence else "")}
        if m.corrected is not None:
            e["raw_point_lps"] = [round(float(v), 4) for v in m.raw.point_lps]
            e["raw_similarity"] = round(m.raw.similarity, 5)
            e["raw_confidence"] = None if m.raw.confidence is None else round(m.raw.confidence, 5)
        extra.append(e)
    pl = PointList(names, np.array([m.final.point_lps for m in matches]), extra)
    path = write_points(path, pl, overwrite=overwrite, frame="LPS")
    if points_format(path) == "mrk.json":
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc["markups"][0]["measurements"] = [
            {"name": key, "enabled": True, "units": "", "printFormat": fmt,
             "controlPointValues": [float(np.nan if e[key] is None else e[key]) for e in extra]}
            for key, fmt in (("similarity", "%5.3f"), ("confidence", "%5.3f"), ("low_confidence", "%.0f"))
        ]
        atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8"), overwrite=True)
    return path


def _match(args: argparse.Namespace) -> int:
    from anatomical_embedding.inference.embedding import EmbedConfig, embed_volume
    from anatomical_embedding.io import convert_points, read_image
    from anatomical_embedding.io.images import IMAGE_SUFFIXES
    from anatomical_embedding.io.markups import POINT_SUFFIXES
    from anatomical_embedding.io.outputs import OutputSet, check_outputs
    from anatomical_embedding.io.settings import in_range
    from anatomical_embedding.inference.matching import MatchConfig, Matcher
    from anatomical_embedding.inference.prior import PriorConfig

    _check_model_args(args)
    in_range(args.top_k, "--top-k", 1)
    outputs = check_outputs([(args.out, "--out", POINT_SUFFIXES), (args.report, "--report", (".json",)),
                             (args.heatmap, "--heatmap", IMAGE_SUFFIXES)], args.overwrite)
    if args.point:
        pts = np.array([_parse_point(p) for p in args.point])
        names = [f"P-{n + 1}" for n in range(len(pts))]
        frame = args.frame
    else:
        from anatomical_embedding.io.markups import read_points

        pl = read_points(args.points)
        pts, names, frame = np.asarray(pl.points_lps), list(pl.names), "LPS"
    source = read_image(args.source, replace_nonfinite=args.replace_nonfinite)
    target = read_image(args.target, replace_nonfinite=args.replace_nonfinite)
    model, cache = _open(args, source)
    prior = None if args.no_prior else PriorConfig(refine=None) if args.no_refine else PriorConfig()
    # The refinement reads dense fine maps of both images: matching then reads them too (no fine tiles).
    dense = prior is not None and prior.refine is not None
    config = (EmbedConfig.dense if dense else EmbedConfig)(max_window_voxels=args.max_window_voxels)
    t0 = time.perf_counter()
    src = embed_volume(model, source, cache, config)
    tgt = embed_volume(model, target, cache, config)
    t1 = time.perf_counter()
    matcher = Matcher(src, tgt, MatchConfig(top_k=args.top_k), prior)
    results = matcher.match(pts, frame=frame, names=names)
    t2 = time.perf_counter()
    print(f"embedding {t1 - t0:.2f} s, matching {len(results)} point(s) {t2 - t1:.2f} s "
          f"({1000 * (t2 - t1) / max(1, len(results)):.0f} ms/point incl. prior fit)")
    show = args.frame if args.point else "RAS"
    print(f"{'name':<12} {'matched (' + show + ')':<34} {'sim':>6} {'conf':>6} {'fb mm':>7}  method")
    for r in results:
        f = r.final
        p = convert_points(f.point_lps, "LPS", show)
        flag = "  LOW" if f.low_confidence else ""
        print(f"{r.name:<12} {np.array2string(p, precision=2, separator=', '):<34} {f.similarity:6.3f} "
              f"{(f.confidence or 0):6.3f} {(f.fb_distance_mm or 0):7.2f}  {f.method}{flag}")
    with OutputSet(outputs):  # all outputs or none
        _write_match_outputs(args, names, results, matcher, model, show)
    return 0


def _write_match_outputs(args: argparse.Namespace, names: list[str], results, matcher, model, show: str) -> None:
    from anatomical_embedding.io import write_image

    if args.out:
        out = write_matches(Path(args.out), names, results, overwrite=args.overwrite)
        print(f"wrote {out}")
    if args.report:
        from anatomical_embedding.io import atomic_write

        rep = {"matches": [{"name": r.name, "raw": r.raw.as_dict(show),
                            "corrected": r.corrected.as_dict(show) if r.corrected else None} for r in results],
               "prior": matcher.prior.summary() if (matcher.prior_config and matcher.prior) else None,
               "model": model.card.get("method"), "model_hash": model.model_hash}
        atomic_write(Path(args.report), lambda p: p.write_text(json.dumps(rep, indent=2), encoding="utf-8"), overwrite=args.overwrite)
    if args.heatmap:
        hm = matcher.heatmap(results[0].raw.query_lps)
        write_image(hm, args.heatmap, overwrite=args.overwrite)
        print(f"wrote heatmap for {results[0].name} to {args.heatmap}")


def _export(args: argparse.Namespace) -> int:
    from anatomical_embedding.inference.export import export_run, export_run_checked
    from anatomical_embedding.inference.precision import check_precision, convert_package
    from anatomical_embedding.io.outputs import check_outputs

    check_outputs([(args.out, "--out", (".aemodel",))], args.overwrite)
    check_precision(args.precision, args.calibration_images)
    if args.package is not None:
        if not Path(args.package).is_file():
            raise FileNotFoundError(f"--package {args.package} not found")
        out = convert_package(args.package, args.out, args.precision, args.calibration_images, args.overwrite)
        _print_parity(out)
        return 0
    if args.precision != "fp32":
        out = export_run(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite, opset=args.opset,
                         precision=args.precision, calibration_images=args.calibration_images)
        _print_parity(out)
        return 0
    out, diff = export_run_checked(args.run, args.out, checkpoint=args.checkpoint, overwrite=args.overwrite,
                                   opset=args.opset)
    print(f"wrote {out} and {out.name}.sha256; ONNX vs torch max abs diff {diff:.2e}")
    return 0


def _print_parity(out: Path) -> None:
    from anatomical_embedding.inference.backends import read_package

    p = read_package(out)[0]["precision"]
    print(f"wrote {out} and {out.name}.sha256 ({p['dtype']}); cosine to fp32 on {p['parity_inputs']}: "
          + ", ".join(f"{o} mean {v['cosine_mean']:.4f}, 1st percentile {v['cosine_p01']:.4f}"
                      for o, v in p.items() if isinstance(v, dict)))
