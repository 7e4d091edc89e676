"""AEFM training throughput (writes benchmarks/results/training.json and .md).

    python benchmarks/bench_training.py [--device auto|cpu|cuda] [--smoke] [--steps 10] [--threads 2]
                                        [--out benchmarks/results]

Times full optimiser steps of the engine's AEFM method (online + momentum forward of both patches,
L_AC against a full queue, backward, AdamW, momentum update and enqueue) on patch pairs drawn by the
method's own sampler from a CT-like random volume already at the model spacing. Data loading is not
timed (the engine prefetches it in DataLoader workers). Configurations:

* ``gpu-default``: the paper defaults (published widths 64/128/256/512, 64-d, 96^3 patches, n_pos 1000,
  n_neg 100000), batch 2 and 4, bf16 autocast, optionally ``torch.compile``; MFU = model FLOPs (counted
  with ``torch.utils.flop_counter`` on one step) / time / peak dense bf16 FLOP/s of the GPU.
* ``cpu-small``: widths 8/16/32/64, 16-d, 32^3 patches, n_pos 200, n_neg 4096, batch 2, fp32.
* ``--smoke``: only ``cpu-tiny`` (widths 4/8/16/32, 8-d, 32^3 patches, n_neg 256, 2 steps), a check that the
  benchmark runs (``run_all.py --quick``, the tests); its numbers are not representative.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine_description, machine_line, md_table, peak_rss_mb, write_results

#: Dense bf16 peak (FLOP/s) by device-name substring, for the MFU estimate.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def ct_like(shape_kji, seed=0) -> torch.Tensor:
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    small = [max(4, s // 8) for s in shape_kji]
    a = ndimage.zoom(rng.normal(size=small).astype(np.float32), [s / m for s, m in zip(shape_kji, small)], order=1)
    return torch.from_numpy(np.clip(a[: shape_kji[0], : shape_kji[1], : shape_kji[2]], -1, 1).astype(np.float32))


def bench(name: str, overrides: dict, batch: int, device: str, steps: int, amp: str, compile_: bool) -> dict:
    from anatomical_embedding.methods import get_method
    from anatomical_embedding.methods.base import StepContext
    from anatomical_embedding.training.config import build_dataclass

    cls = get_method("aefm")
    cfg = build_dataclass(cls.Config, overrides, "method")
    torch.manual_seed(0)
    method = cls(cfg).to(device)
    if compile_:
        method.encoder.compile()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    # Fill both queues so the loss has its full cost from the first timed step.
    method.queue_local.enqueue(torch.nn.functional.normalize(torch.randn(cfg.n_neg, cfg.feature_dim, device=device), dim=1))
    method.queue_global.enqueue(torch.nn.functional.normalize(torch.randn(cfg.n_neg, cfg.feature_dim, device=device), dim=1))
    side = [int(np.ceil(p * 1.15)) for p in cfg.patch_size[::-1]]
    volume = ct_like(side)
    rng = np.random.default_rng(0)
    batches = [method.collate([method.make_sample({"image": volume}, rng, 0) for _ in range(batch)]) for _ in range(2)]
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step(i: int) -> None:
        ctx = StepContext(i, 0, steps)
        with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = method(batches[i % 2], ctx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.after_optimizer_step(ctx)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(2 if not compile_ else 3):  # warm-up (and compilation)
        step(i)
    sync()
    flops = None
    if device.startswith("cuda"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            step(0)
        flops = fc.get_total_flops()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / steps
    out = {"name": name, "device": device, "batch": batch, "amp": amp, "compile": compile_,
           "patch_size": list(cfg.patch_size), "widths": list(cfg.widths), "feature_dim": cfg.feature_dim,
           "n_pos": cfg.n_pos, "n_neg": cfg.n_neg, "steps_timed": steps,
           "s_per_step": dt, "steps_per_s": 1 / dt, "samples_per_s": batch / dt}
    if not device.startswith("cuda"):
        # The CPU configurations run first, so the process peak so far is theirs.
        out["peak_rss_mb"] = peak_rss_mb()
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
        out.update(gpu=gpu, gpu_mem_mb=torch.cuda.max_memory_allocated() / 2**20, flops_per_step=flops,
                   achieved_tflops=flops / dt / 1e12 if flops else None,
                   mfu=(flops / dt / peak) if (flops and peak) else None)
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="cpu: CPU configurations only; cuda: also the GPU ones (fails without a GPU); "
                         "auto: the GPU ones when present")
    ap.add_argument("--cpu-only", action="store_true", help="same as --device cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny configuration only (checks the benchmark runs)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile on GPU")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cpu" if args.cpu_only else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU (install a CUDA build of torch or use --device cpu)")
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    results = []
    if args.smoke:
        tiny = {"widths": (4, 8, 16, 32), "feature_dim": 8, "patch_size": (32, 32, 32), "n_pos": 50, "n_neg": 256}
        results.append(bench("cpu-tiny", tiny, 2, "cpu", 2, "none", False))
        if gpu:
            results.append(bench("gpu-tiny", tiny, 2, "cuda", 2, "bf16", False))
    else:
        small = {"widths": (8, 16, 32, 64), "feature_dim": 16, "patch_size": (32, 32, 32), "n_pos": 200, "n_neg": 4096}
        results.append(bench("cpu-small", small, 2, "cpu", max(3, args.steps // 2), "none", False))
        if gpu:
            for b in (2, 4):
                results.append(bench("gpu-default", {}, b, "cuda", args.steps, "bf16", False))
            if args.compile:
                results.append(bench("gpu-default-compiled", {}, 4, "cuda", args.steps, "bf16", True))
    meta = machine_description(args.threads)
    meta.update(smoke=args.smoke,
                command="python benchmarks/bench_training.py " + " ".join(sys.argv[1:] if argv is None else argv))
    lines = ["# AEFM training throughput", "", machine_line(meta), "",
             *md_table(["config", "device", "batch", "amp", "patch", "widths/dim", "s/step", "steps/s", "samples/s",
                        "peak RSS MB", "GPU MB", "MFU"],
                       [[f"{r['name']}{' (compiled)' if r['compile'] else ''}",
                         r.get("gpu", f"cpu x{args.threads} threads"), r["batch"], r["amp"],
                         "x".join(map(str, r["patch_size"])), f"{'/'.join(map(str, r['widths']))}/{r['feature_dim']}",
                         f"{r['s_per_step']:.3f}", f"{r['steps_per_s']:.2f}", f"{r['samples_per_s']:.2f}",
                         f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-",
                         f"{r['gpu_mem_mb']:.0f}" if r.get("gpu_mem_mb") else "-",
                         f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"] for r in results]),
             "", ("Steps include both encoders on both patches, L_AC against full queues (n_neg), backward, "
                  "AdamW, momentum update and enqueue; data loading excluded (prefetched by workers). Peak RSS: the "
                  "process peak after the CPU configurations.")]
    write_results(args.out, "training", {"meta": meta, "results": results}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
