"""Embedding and per-click matching speed/memory (writes benchmarks/results/embedding.json and .md).

    python benchmarks/bench_embedding.py [--quick | --smoke] [--device auto|cpu|cuda] [--threads 2]
                                         [--backends torch onnxruntime] [--shapes K,J,I ...] [--clicks 10]
                                         [--out benchmarks/results]

Each configuration runs in its own subprocess so that peak memory (``ru_maxrss``) is its own. The
network is the published-size AEFM U-Net (widths 64/128/256/512, 64-d), untrained (timing only), fed
through the torch backend and through ONNX Runtime (exported package). Volumes are CT-like smooth
random fields already at the model spacing (1 mm). Per-click latency: after both volumes are embedded,
the robust prior is fitted once, then clicks are timed cold (fine tiles not yet computed) and warm
(same clicks again: tiles cached in memory); the fast viewer path is timed (corrected match with
forward-backward confidence, no separate raw search). Full mode embeds 256^3 and 512x512x300 and can
take a long time on a CPU; ``--quick`` embeds 128^3 and extrapolates the big volumes from the measured
time per window (the table says which figures are measured and which extrapolated). ``--smoke`` uses a
tiny network (widths 4/8/16/32, 8-d) on a 48^3 volume, all configurations in one process: a check that the
benchmark runs (``run_all.py --quick``, the tests), not a measurement. ``--device cuda`` times only torch (and
ONNX Runtime, when its CUDA provider is installed) on the GPU; ``auto`` adds them to the CPU backends when a GPU
is present. ``--shapes 300,512,512 --backends onnxruntime --clicks 0`` measures one CT-sized volume with one
backend (clicks are timed on the first shape only; with ``--clicks 0`` the target is not embedded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_description, machine_line, md_table, peak_rss_mb, write_results

PUBLISHED = {"widths": [64, 128, 256, 512], "feature_dim": 64}
CARD = {"spacing": [1.0, 1.0, 1.0], "intensity_preset": "ct_aefm", "method": "aefm", "modality": "CT"}


def ct_like(shape_kji, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = [max(4, s // 4) for s in shape_kji]
    a = ndimage.gaussian_filter(rng.normal(size=small).astype(np.float32), 1.5)
    a = ndimage.zoom(a, [s / m for s, m in zip(shape_kji, small)], order=1)[: shape_kji[0], : shape_kji[1], : shape_kji[2]]
    return (a / a.std() * 400.0).astype(np.float32)


def one(cfg: dict) -> dict:
    """Run one configuration (in a subprocess) and return its measurements."""
    threads = int(cfg["threads"])
    import torch

    torch.set_num_threads(threads)
    from anatomical_embedding.inference.backends import OnnxModel, TorchModel
    from anatomical_embedding.inference.embedding import EmbedConfig, EmbeddingCache, coarse_window_kji, embed_volume
    from anatomical_embedding.io import Volume
    from anatomical_embedding.inference.matching import Matcher
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.manual_seed(0)
    net = AEFMUNet(cfg["net"]["widths"], cfg["net"]["feature_dim"])
    card = dict(CARD, patch_size=[cfg["window"]] * 3)
    precision = cfg.get("precision", "fp32")
    if cfg["backend"] == "onnxruntime":
        model = OnnxModel(cfg["packages"][precision], device=cfg["device"], threads=threads)
    else:
        model = TorchModel(net, card, device=cfg["device"], precision=precision)
    shape = cfg["shape_kji"]
    arr = ct_like(shape)
    spacing = tuple(cfg.get("volume_spacing", (1.0, 1.0, 1.0)))
    src = Volume(arr, spacing=spacing)
    tgt = Volume(arr, spacing=spacing, origin=(7.0, -5.0, 3.0))
    # --model: the package's own window (its card's patch size), as the CLI and the viewer use it.
    ecfg = EmbedConfig(window=None if cfg.get("model_window") else (cfg["window"],) * 3,
                       dense_fine=bool(cfg.get("dense_fine")), coarse_from_dense=bool(cfg.get("dense_fine")),
                       max_window_voxels=int(cfg.get("max_window_voxels", 0)))
    out = {"backend": model.backend, "device": model.device, "precision": precision, "shape_kji": shape,
           "threads": threads, "max_window_voxels": ecfg.max_window_voxels}
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)
        t0 = time.perf_counter()
        s = embed_volume(model, src, cache, ecfg)
        out["embed_s"] = time.perf_counter() - t0
        win = coarse_window_kji(model, ecfg, s.prepared.array.shape)
        out["window"] = int(win[0]) if len(set(win.tolist())) == 1 else "x".join(str(int(v)) for v in win)
        out["stages_s"] = {k: round(v, 3) for k, v in s.timings.items()}  # where the time went
        out["windows"] = int(s.timings.get("windows", 0))
        t0 = time.perf_counter()
        s_again = embed_volume(model, src, cache, ecfg)
        out["embed_cached_s"] = time.perf_counter() - t0
        del s_again
        out["cache_mb_per_volume_coarse"] = cache.size_bytes(s.key) / 2**20
        if cfg.get("clicks", 0):  # the target is embedded only for the clicks (it doubles a big volume's time)
            t = embed_volume(model, tgt, cache, ecfg)
            m = Matcher(s, t)
            t0 = time.perf_counter()
            prior_ok = m.prior is not None
            out["prior_fit_s"] = time.perf_counter() - t0
            out["prior_ok"] = prior_ok
            rng = np.random.default_rng(1)
            lo = np.array([16, 16, 16])
            hi = np.asarray(src.shape_ijk) - 16
            pts = src.index_to_world(rng.uniform(lo, hi, size=(cfg["clicks"], 3)))
            cold, warm, errs = [], [], []
            for p in pts:
                t0 = time.perf_counter()
                r = m.match(p, with_raw=False)[0]
                cold.append(time.perf_counter() - t0)
                errs.append(float(np.linalg.norm(r.final.point_lps - p - np.array([7.0, -5.0, 3.0]))))
            for p in pts:
                t0 = time.perf_counter()
                m.match(p, with_raw=False)
                warm.append(time.perf_counter() - t0)
            # First clicks after background warming (issue 22): the likely tiles of the points (their source
            # tiles, the target tiles around the prior's predictions) are computed first, as the viewer does
            # once a pair is prepared; then each point's first click.
            for emb in (s, t):
                emb.clear_fine_tiles()

            def forwards() -> int:
                return s.stats["fine_forwards"] + t.stats["fine_forwards"]

            before = forwards()
            t0 = time.perf_counter()
            for emb, tiles in m.likely_tiles(pts):
                emb.warm_tiles(tiles)
            out["warm_likely_tiles_s"] = time.perf_counter() - t0
            out["warm_tiles_computed"] = forwards() - before
            first, before = [], forwards()
            for p in pts:
                t0 = time.perf_counter()
                m.match(p, with_raw=False)
                first.append(time.perf_counter() - t0)
            out.update({"click_after_warming_ms_median": 1000 * float(np.median(first)),
                        "click_after_warming_ms_p90": 1000 * float(np.percentile(first, 90)),
                        "tiles_computed_by_clicks_after_warming": forwards() - before})
            out.update({"click_cold_ms_median": 1000 * float(np.median(cold)),
                        "click_cold_ms_p90": 1000 * float(np.percentile(cold, 90)),
                        "click_warm_ms_median": 1000 * float(np.median(warm)),
                        "click_warm_ms_p90": 1000 * float(np.percentile(warm, 90)),
                        "click_error_mm_median": float(np.median(errs)),
                        "fine_forwards": s.stats["fine_forwards"] + t.stats["fine_forwards"],
                        "clicks": len(pts)})
            out["cache_mb_per_volume_with_tiles"] = cache.size_bytes(s.key) / 2**20
    out["peak_rss_mb"] = peak_rss_mb()
    if model.device.startswith("cuda") and model.backend == "torch":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def make_packages(spec: dict) -> dict[str, str]:
    """The packages timed: fp32 (``--model`` or the untrained published-size AEFM) and its int8 copy, calibrated
    on CT-like windows (``--precisions int8``)."""
    import torch

    from anatomical_embedding.inference.export import export_embedder
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    tmp, net, window = Path(spec["tmp"]), spec["net"], spec["window"]
    if spec.get("model"):
        packages = {"fp32": str(spec["model"])}
    else:
        torch.manual_seed(0)
        packages = {"fp32": str(export_embedder(AEFMUNet(net["widths"], net["feature_dim"]),
                                                dict(CARD, patch_size=[window] * 3), tmp / "aefm.aemodel"))}
    if "int8" in spec["precisions"]:
        from anatomical_embedding.inference.precision import convert_package
        from anatomical_embedding.io import Volume, write_image

        calib = []
        for seed in (11, 12):
            calib.append(tmp / f"calib{seed}.nii.gz")
            write_image(Volume(ct_like([2 * window] * 3, seed=seed), spacing=(1.0, 1.0, 1.0)), calib[-1])
        packages["int8"] = str(convert_package(packages["fp32"], tmp / "int8.aemodel", "int8", calib))
    return packages


def _label(r: dict) -> str:
    p = r.get("precision", "fp32")
    return r["backend"] if p == "fp32" else f"{r['backend']} {p}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="published network on 128^3, big volumes extrapolated")
    size.add_argument("--smoke", action="store_true", help="tiny network on 48^3 (checks the benchmark runs)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cpu: CPU backends only; cuda: GPU backends only (fails without a GPU); "
                         "auto: CPU backends, and the GPU ones when present")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", nargs="+", choices=("torch", "onnxruntime"), default=["torch", "onnxruntime"],
                    help="CPU backends to time (default: both)")
    ap.add_argument("--shapes", nargs="+", metavar="K,J,I",
                    help="volumes to embed instead of the mode's (e.g. 300,512,512 for one CT-sized volume)")
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "int8"), default=["fp32"],
                    help="bf16: torch autocast on the CPU; int8: an ONNX Runtime package quantised on CT-like "
                         "windows (export --precision int8). Each applies to the backend that has it")
    ap.add_argument("--model", help="time this .aemodel package (ONNX Runtime only) on a CT of 0.75 x 0.75 x 1.5 mm "
                                    "voxels instead of the untrained published-size AEFM on 1 mm voxels")
    ap.add_argument("--dense-fine", action="store_true",
                    help="embed with EmbedConfig(dense_fine=True, coarse_from_dense=True), as the viewer and `match` "
                         "do (one pass makes the coarse and the dense fine map): the embedding "
                         "includes each volume's dense fine map and clicks compute no fine tile")
    ap.add_argument("--max-window-voxels", type=int, default=0,
                    help="EmbedConfig.max_window_voxels: windows fitted to each volume, up to this many voxels "
                         "(2097152 = 128^3, for example); default 0, cubes of the window")
    ap.add_argument("--name", default="embedding", help="results file name (default embedding: OUT/embedding.md)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--packages", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))))
        return 0
    if args.packages:
        print("PACKAGES " + json.dumps(make_packages(json.loads(args.packages))))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (install a CUDA build of torch or use --device cpu)")
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    net = {"widths": [4, 8, 16, 32], "feature_dim": 8} if args.smoke else PUBLISHED
    window = 32 if args.smoke else 64 if args.quick else 96
    clicks = min(args.clicks, 2) if args.smoke else args.clicks
    shapes = ([[48, 48, 48]] if args.smoke else [[128, 128, 128]] if args.quick
              else [[256, 256, 256], [300, 512, 512]])
    if args.shapes:
        try:
            shapes = [[int(v) for v in text.split(",")] for text in args.shapes]
        except ValueError:
            raise SystemExit(f"--shapes: expected K,J,I integers such as 300,512,512, got {args.shapes}") from None
        if any(len(sh) != 3 or min(sh) < 16 for sh in shapes):
            raise SystemExit(f"--shapes: each volume needs three sizes of at least 16 voxels, got {args.shapes}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    spec = {"tmp": str(tmp), "net": net, "window": window, "model": args.model, "precisions": args.precisions}
    if args.smoke:
        packages = make_packages(spec)
    else:  # in its own process: Linux children inherit the parent's peak RSS (ru_maxrss) at fork, and int8
        # calibration holds gigabytes, which would then show up as every configuration's peak memory.
        proc = subprocess.run([sys.executable, __file__, "--packages", json.dumps(spec)], capture_output=True,
                              text=True, encoding="utf-8", errors="replace", check=False)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PACKAGES ")]
        if proc.returncode != 0 or not line:
            raise SystemExit(f"building the model packages failed:\n{proc.stderr[-3000:]}")
        packages = json.loads(line[0][9:])
    backends = ["onnxruntime"] if args.model else args.backends  # a package has no torch network
    configs = [] if args.device == "cuda" else [(b, "cpu") for b in backends]
    if gpu:
        import onnxruntime

        configs.append(("torch", "cuda"))
        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            configs.append(("onnxruntime", "cuda"))
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    for shape in shapes:
        runs = [(b, d, p) for b, d in configs for p in args.precisions
                if p == "fp32" or (p == "bf16" and b == "torch" and d == "cpu") or (p == "int8" and b == "onnxruntime")]
        for backend, device, precision in runs:
            cfg = {"backend": backend, "device": device, "packages": packages, "net": net, "threads": args.threads,
                   "shape_kji": shape, "window": window, "clicks": clicks if shape == shapes[0] else 0,
                   "precision": precision, "dense_fine": args.dense_fine,
                   "max_window_voxels": args.max_window_voxels, **({"model_window": True, "volume_spacing": [0.75, 0.75, 1.5]}
                                              if args.model else {})}
            print(f"running {backend} {precision} on {device}, {shape} ...", flush=True)
            t0 = time.perf_counter()
            if args.smoke:  # one process for all: saves a torch import per configuration (peak RSS is shared)
                res = one(cfg)
                res["wall_s"] = time.perf_counter() - t0
                results.append(res)
                continue
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                                  encoding="utf-8", errors="replace", env=env, check=False)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                results.append({"backend": backend, "device": device, "shape_kji": shape, "error": proc.stderr[-500:]})
                continue
            res = json.loads(line[0][7:])
            res["wall_s"] = time.perf_counter() - t0
            print(json.dumps(res), flush=True)
            results.append(res)
    shutil.rmtree(tmp, ignore_errors=True)
    # Extrapolate the big volumes from the measured seconds per window (quick mode only).
    extrap = []
    if args.quick:
        from anatomical_embedding.inference.embedding import window_starts

        for r in results:
            if "embed_s" not in r:
                continue
            per_window = r["embed_s"] / r["windows"]
            for big in ([256, 256, 256], [300, 512, 512]):
                n = int(np.prod([len(window_starts(-(-s // 16) * 16, 96, 0.25, 16)) for s in big]))
                w96 = per_window * (96 / window) ** 3
                extrap.append({"backend": _label(r), "device": r["device"], "shape_kji": big, "windows_96": n,
                               "embed_s_extrapolated": round(n * w96, 1)})
    mode = " --smoke" if args.smoke else " --quick" if args.quick else ""
    if args.backends != ["torch", "onnxruntime"]:
        mode += " --backends " + " ".join(args.backends)
    if args.shapes:
        mode += " --shapes " + " ".join(args.shapes)
    if args.precisions != ["fp32"]:
        mode += " --precisions " + " ".join(args.precisions)
    if args.clicks != 10:
        mode += f" --clicks {args.clicks}"
    if args.model:
        mode += f" --model {args.model}"
    if args.dense_fine:
        mode += " --dense-fine"
    if args.max_window_voxels:
        mode += f" --max-window-voxels {args.max_window_voxels}"
    if args.name != "embedding":
        mode += f" --name {args.name}"
    meta = machine_description(args.threads)
    meta.update(quick=args.quick, smoke=args.smoke, net=net, command=f"python benchmarks/bench_embedding.py{mode}")
    failed = [r for r in results if "error" in r]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([_label(r), r["device"], r["shape_kji"], "error"] + [""] * 11)
            continue
        nan = float("nan")
        rows.append([
            _label(r), r["device"], r["shape_kji"], r["window"], r["windows"], f"{r['embed_s']:.1f}",
            f"{r['embed_cached_s']:.2f}",
            f"{r.get('cache_mb_per_volume_with_tiles', r['cache_mb_per_volume_coarse']):.1f}",
            f"{r['peak_rss_mb']:.0f}", f"{r.get('prior_fit_s', nan):.2f}",
            f"{r.get('click_cold_ms_median', nan):.0f} / {r.get('click_cold_ms_p90', nan):.0f}",
            f"{r.get('click_warm_ms_median', nan):.0f} / {r.get('click_warm_ms_p90', nan):.0f}",
            f"{r.get('warm_likely_tiles_s', nan):.1f}",
            f"{r.get('click_after_warming_ms_median', nan):.0f} / {r.get('click_after_warming_ms_p90', nan):.0f}",
            f"{r.get('click_error_mm_median', nan):.2f}"])
    lines = ["# Embedding and per-click matching benchmark", "", machine_line(meta), "",
             (f"Model: `{Path(args.model).name}` on CT-like volumes of 0.75 x 0.75 x 1.5 mm voxels. " if args.model else
              f"Network: AEFM (widths {net['widths']}, {net['feature_dim']}-d), untrained. "
              f"Command: `{meta['command']}`."), "",
             *md_table(["backend", "device", "volume (k,j,i)", "window", "windows", "embed s", "cached s", "cache MB",
                        "peak RSS MB", "prior fit s", "click cold ms (median / p90)", "click warm ms (median / p90)",
                        "warming s", "first click after warming ms (median / p90)", "click error mm"], rows)]
    if extrap:
        lines += ["", "Extrapolated from the measured time per window (window 96^3, overlap 0.25, cost ~ voxels):", "",
                  *md_table(["backend", "device", "volume (k,j,i)", "windows", "embed s (extrapolated)"],
                            [[e["backend"], e["device"], e["shape_kji"], e["windows_96"], e["embed_s_extrapolated"]]
                             for e in extrap])]
    lines += ["", "Cache MB: the embedding cache of one volume (coarse map plus the fine tiles the clicks computed); "
              + ("peak RSS: the process so far (--smoke runs every configuration in one process). " if args.smoke else
                 "peak RSS: the configuration's own process. ")
              + ("Embedding with `EmbedConfig(dense_fine=True, coarse_from_dense=True)`: embed s includes the dense "
                 "fine map (one sliding-window pass of 64^3 windows makes both maps), prior fit s the robust prior's "
                 "dense refinement, and no click computes a fine tile (cold = the first click at a point). "
                 if args.dense_fine else "")
              + (f"Windows fitted to each volume (`EmbedConfig.max_window_voxels={args.max_window_voxels}`): the "
                 "window column is the fitted window (one side when all are equal, else k x j x i), chosen to process "
                 "the fewest voxels at the same overlap. " if args.max_window_voxels else "")
              + "Cold clicks compute fine tiles, warm clicks reuse them. Warming: the background computation of "
              "the clicked points' likely tiles (`Matcher.likely_tiles`), as the viewer runs it after preparing a "
              "pair; then each point's first click is timed.",
              "", "SAM reports 0.23 s per match on a GPU; the goal here is < 50 ms per click on a 2-core CPU."]
    staged = [r for r in results if "stages_s" in r]
    if staged:
        keys = ("prepare_s", "hash_s", "network_s", "blend_s", "cache_write_s")
        if any("dense_fine_s" in r["stages_s"] for r in staged):
            keys += ("dense_fine_s",)
        lines += ["", "Where the embedding time went (seconds; prepare = reorientation, resampling, intensity preset "
                  "and padding; blend = window extraction, Gaussian blending and normalisation; dense_fine = the "
                  "dense fine map's own pass, network and blending):", "",
                  *md_table(["backend", "volume (k,j,i)", *[k[:-2] for k in keys], "embed s"],
                            [[_label(r), r["shape_kji"], *[f"{r['stages_s'].get(k, 0.0):.2f}" for k in keys],
                              f"{r['embed_s']:.1f}"] for r in staged])]
    write_results(args.out, args.name, {"meta": meta, "results": results, "extrapolated": extrap}, lines)
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
