"""Embedding and per-click matching speed/memory (writes benchmarks/results/embedding.json and .md).

    python benchmarks/bench_embedding.py [--quick] [--threads 2] [--out benchmarks/results]

Each configuration runs in its own subprocess so that peak memory (``ru_maxrss``) is its own. The
network is the published-size AEFM U-Net (widths 64/128/256/512, 64-d), untrained (timing only), fed
through the torch backend and through ONNX Runtime (exported package). Volumes are CT-like smooth
random fields already at the model spacing (1 mm). Per-click latency: after both volumes are embedded,
the robust prior is fitted once, then clicks are timed cold (fine tiles not yet computed) and warm
(same clicks again: tiles cached in memory); the fast viewer path is timed (corrected match with
forward-backward confidence, no separate raw search). Full mode embeds 256^3 and 512x512x300 and can
take a long time on a CPU; ``--quick`` embeds 128^3 and extrapolates the big volumes from the measured
time per window (the table says which figures are measured and which extrapolated).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    from anatomical_embedding.backends import OnnxModel, TorchModel
    from anatomical_embedding.embedding import EmbedConfig, EmbeddingCache, embed_volume
    from anatomical_embedding.io import Volume
    from anatomical_embedding.matching import Matcher
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.manual_seed(0)
    net = AEFMUNet(cfg["net"]["widths"], cfg["net"]["feature_dim"])
    card = dict(CARD, patch_size=[cfg["window"]] * 3)
    if cfg["backend"] == "onnxruntime":
        model = OnnxModel(cfg["package"], device="cpu", threads=threads)
    else:
        model = TorchModel(net, card, device="cpu")
    shape = cfg["shape_kji"]
    arr = ct_like(shape)
    src = Volume(arr, spacing=(1.0, 1.0, 1.0))
    tgt = Volume(arr, spacing=(1.0, 1.0, 1.0), origin=(7.0, -5.0, 3.0))
    ecfg = EmbedConfig(window=(cfg["window"],) * 3)
    out = {"backend": model.backend, "shape_kji": shape, "threads": threads, "window": cfg["window"]}
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(tmp)
        t0 = time.perf_counter()
        s = embed_volume(model, src, cache, ecfg)
        out["embed_s"] = time.perf_counter() - t0
        from anatomical_embedding.embedding import window_starts

        out["windows"] = int(np.prod([len(window_starts(-(-n // 16) * 16, min(cfg["window"], -(-n // 16) * 16), 0.25, 16))
                                      for n in shape]))
        t0 = time.perf_counter()
        s_again = embed_volume(model, src, cache, ecfg)
        out["embed_cached_s"] = time.perf_counter() - t0
        del s_again
        t = embed_volume(model, tgt, cache, ecfg)
        out["cache_mb_per_volume_coarse"] = cache.size_bytes(s.key) / 2**20
        if cfg.get("clicks", 0):
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
            out.update({"click_cold_ms_median": 1000 * float(np.median(cold)),
                        "click_warm_ms_median": 1000 * float(np.median(warm)),
                        "click_warm_ms_p90": 1000 * float(np.percentile(warm, 90)),
                        "click_error_mm_median": float(np.median(errs)),
                        "fine_forwards": s.stats["fine_forwards"] + t.stats["fine_forwards"],
                        "clicks": len(pts)})
            out["cache_mb_per_volume_with_tiles"] = cache.size_bytes(s.key) / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one))))
        return 0

    import torch

    from anatomical_embedding.export import export_embedder
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    window = 64 if args.quick else 96
    shapes = [[128, 128, 128]] if args.quick else [[256, 256, 256], [300, 512, 512]]
    tmp = Path(tempfile.mkdtemp(prefix="bench_embedding_"))
    torch.manual_seed(0)
    pkg = export_embedder(AEFMUNet(PUBLISHED["widths"], PUBLISHED["feature_dim"]),
                          dict(CARD, patch_size=[window] * 3), tmp / "aefm.aemodel")
    results = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    backends = ["torch", "onnxruntime"]
    gpu = torch.cuda.is_available()
    for shape in shapes:
        for backend in backends + (["torch-cuda"] if gpu else []):
            cfg = {"backend": backend.replace("-cuda", ""), "package": str(pkg), "net": PUBLISHED, "threads": args.threads,
                   "shape_kji": shape, "window": window, "clicks": args.clicks if shape == shapes[0] else 0}
            print(f"running {backend} {shape} ...", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                                  env=env)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                results.append({"backend": backend, "shape_kji": shape, "error": proc.stderr[-500:]})
                continue
            res = json.loads(line[0][7:])
            res["wall_s"] = time.perf_counter() - t0
            print(json.dumps(res), flush=True)
            results.append(res)
    # Extrapolate the big volumes from the measured seconds per window (quick mode only).
    extrap = []
    if args.quick:
        from anatomical_embedding.embedding import window_starts

        for r in results:
            if "embed_s" not in r:
                continue
            per_window = r["embed_s"] / r["windows"]
            for big in ([256, 256, 256], [300, 512, 512]):
                n = int(np.prod([len(window_starts(-(-s // 16) * 16, 96, 0.25, 16)) for s in big]))
                w96 = per_window * (96 / window) ** 3
                extrap.append({"backend": r["backend"], "shape_kji": big, "windows_96": n,
                               "embed_s_extrapolated": round(n * w96, 1)})
    meta = {"quick": args.quick, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(), "gpu": gpu,
            "torch": torch.__version__, "net": PUBLISHED, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "embedding.json").write_text(json.dumps({"meta": meta, "results": results, "extrapolated": extrap}, indent=2), encoding="utf-8")
    lines = ["# Embedding and per-click matching benchmark", "",
             f"{meta['date']}, {meta['cpu_count']} CPUs visible, {args.threads} threads, load average at end "
             f"{np.round(meta['load_avg_at_end'], 1).tolist()}, GPU: {gpu}. Network: published-size AEFM "
             f"(widths {PUBLISHED['widths']}, 64-d), untrained. Command: `python benchmarks/bench_embedding.py"
             f"{' --quick' if args.quick else ''}`.", "",
             "| backend | volume (k,j,i) | window | windows | embed s | cached s | cache MB | peak RSS MB | "
             "prior fit s | click cold ms | click warm ms (median / p90) | click error mm |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['shape_kji']} | error | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['backend']} | {r['shape_kji']} | {r['window']} | {r['windows']} | {r['embed_s']:.1f} | "
            f"{r['embed_cached_s']:.2f} | {r.get('cache_mb_per_volume_with_tiles', r['cache_mb_per_volume_coarse']):.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r.get('prior_fit_s', float('nan')):.2f} | "
            f"{r.get('click_cold_ms_median', float('nan')):.0f} | {r.get('click_warm_ms_median', float('nan')):.0f} / "
            f"{r.get('click_warm_ms_p90', float('nan')):.0f} | {r.get('click_error_mm_median', float('nan')):.2f} |")
    if extrap:
        lines += ["", "Extrapolated from the measured time per window (window 96^3, overlap 0.25, cost ~ voxels):", "",
                  "| backend | volume (k,j,i) | windows | embed s (extrapolated) |", "|---|---|---|---|"]
        lines += [f"| {e['backend']} | {e['shape_kji']} | {e['windows_96']} | {e['embed_s_extrapolated']} |" for e in extrap]
    lines += ["", "SAM reports 0.23 s per match on a GPU; the goal here is < 50 ms per click on a 2-core CPU."]
    (out / "embedding.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
