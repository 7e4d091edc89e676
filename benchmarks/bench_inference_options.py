"""Per-window inference cost by backend, precision and ONNX Runtime session option (issue 22), side by side.

    python benchmarks/bench_inference_options.py [--smoke] [--threads 2] [--repeats 4] [--out benchmarks/results]

Writes ``inference_options.{json,md}``. One window of the coarse (whole-volume) pass, the cost that a
512x512x300 CT pays ~320 times with the published-size AEFM (widths 64-512, 64-d, window 96^3, untrained:
timing only) and the fine window of a click tile (48^3). Rows, one option at a time against the default:

* torch fp32; torch bf16 autocast (CPU, oneDNN; fast only where the CPU has bf16 instructions);
* ONNX Runtime fp32 with its defaults, then each session option changed alone: graph optimisation level
  basic / extended, intra-op spinning off, memory pattern off, CPU memory arena off, one thread;
* ONNX Runtime fp16 and int8 packages (``export --precision``; int8 calibrated on CT-like windows).

Each row also gives the cosine similarity of its coarse map to torch fp32 on the same window.
``--smoke``: a tiny network on 32^3 windows (checks that the benchmark runs; not a measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_description, machine_line, md_table, write_results
from bench_embedding import CARD, PUBLISHED, ct_like


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (session initialisation, oneDNN primitive creation)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import onnxruntime as ort
    import torch

    from anatomical_embedding.inference.backends import COARSE_ONNX_NAME, ONNX_NAME, read_package
    from anatomical_embedding.inference.export import export_embedder
    from anatomical_embedding.inference.precision import convert_package, voxel_cosines
    from anatomical_embedding.io import Volume, write_image
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.set_num_threads(args.threads)
    net_cfg = {"widths": [4, 8, 16, 32], "feature_dim": 8} if args.smoke else PUBLISHED
    window, fine_window = (32, 32) if args.smoke else (96, 48)
    repeats = 1 if args.smoke else args.repeats
    torch.manual_seed(0)
    net = AEFMUNet(net_cfg["widths"], net_cfg["feature_dim"]).eval()
    # The model's input is already windowed CT: ct_like is in HU, the aefm preset maps it.
    from anatomical_embedding.io import get_preset

    preset = get_preset(CARD["intensity_preset"])
    x = preset.apply(ct_like([window] * 3, seed=1))[None, None].astype(np.float32)
    xf = preset.apply(ct_like([fine_window] * 3, seed=2))[None, None].astype(np.float32)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench_options_") as tmp:
        tmp = Path(tmp)
        pkg = export_embedder(net, dict(CARD, patch_size=[window] * 3), tmp / "fp32.aemodel")
        calib = []
        for seed in (3, 4):
            path = tmp / f"calib{seed}.nii.gz"
            write_image(Volume(ct_like([2 * window] * 3, seed=seed), spacing=(1.0, 1.0, 1.0)), path)
            calib.append(str(path))
        packages = {"fp32": pkg,
                    "fp16": convert_package(pkg, tmp / "fp16.aemodel", "fp16", calib),
                    "int8": convert_package(pkg, tmp / "int8.aemodel", "int8", calib)}

        with torch.inference_mode():
            ref = net.forward_coarse(torch.from_numpy(x)).numpy()

        def add(name: str, coarse_fn, fine_fn, coarse_out) -> None:
            t_c = _time(coarse_fn, repeats)
            t_f = _time(fine_fn, repeats)
            cos = float(voxel_cosines(ref, coarse_out()).mean())
            results.append({"config": name, "coarse_window_s": t_c, "fine_window_s": t_f, "cosine_to_torch_fp32": cos})
            rows.append([name, f"{t_c:.3f}", f"{t_f:.3f}", f"{cos:.5f}"])
            print(rows[-1], flush=True)

        tx, txf = torch.from_numpy(x), torch.from_numpy(xf)

        def torch_run(inp, coarse_only: bool, bf16: bool):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = net.forward_coarse(inp) if coarse_only else net(inp)[1]
                return out.float().numpy()
            return run

        add("torch fp32", torch_run(tx, True, False), torch_run(txf, False, False), torch_run(tx, True, False))
        add("torch bf16 autocast", torch_run(tx, True, True), torch_run(txf, False, True), torch_run(tx, True, True))

        go = ort.GraphOptimizationLevel
        variants = [("default", {}), ("graph basic", {"graph_optimization_level": go.ORT_ENABLE_BASIC}),
                    ("graph extended", {"graph_optimization_level": go.ORT_ENABLE_EXTENDED}),
                    ("no spinning", {"config": {"session.intra_op.allow_spinning": "0"}}),
                    ("no memory pattern", {"enable_mem_pattern": False}),
                    ("no CPU arena", {"enable_cpu_mem_arena": False}),
                    ("1 thread", {"intra_op_num_threads": 1})]

        def sessions(package: Path, options: dict):
            _, members = read_package(package)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            for key, value in options.items():
                if key == "config":
                    for k, v in value.items():
                        opts.add_session_config_entry(k, v)
                else:
                    setattr(opts, key, value)
            full = ort.InferenceSession(members[ONNX_NAME], opts, providers=["CPUExecutionProvider"])
            coarse = ort.InferenceSession(members[COARSE_ONNX_NAME], opts, providers=["CPUExecutionProvider"])
            return coarse, full

        def ort_rows(label: str, package: Path, options: dict) -> None:
            coarse, full = sessions(package, options)
            add(label, lambda: coarse.run(["coarse"], {"image": x})[0],
                lambda: full.run(["fine"], {"image": xf})[0],
                lambda: coarse.run(["coarse"], {"image": x})[0].astype(np.float32))

        for label, options in variants:
            ort_rows(f"onnxruntime fp32, {label}", packages["fp32"], options)
        for precision in ("fp16", "int8"):
            ort_rows(f"onnxruntime {precision}", packages[precision], {})

    meta = machine_description(args.threads)
    meta.update(smoke=args.smoke, net=net_cfg, window=window, fine_window=fine_window, repeats=repeats,
                command="python benchmarks/bench_inference_options.py" + (" --smoke" if args.smoke else ""))
    lines = ["# Inference options: backend, precision, ONNX Runtime session settings", "", machine_line(meta), "",
             (f"Network: AEFM (widths {net_cfg['widths']}, {net_cfg['feature_dim']}-d), untrained. One coarse window "
              f"of {window}^3 (the whole-volume pass repeats it) and one fine window of {fine_window}^3 (a click tile "
              f"with its margin). Mean of {repeats} runs after a warm-up. Command: `{meta['command']}`."), "",
             *md_table(["configuration", "coarse window s", "fine window s", "coarse cosine to torch fp32"], rows), "",
             "Options change one at a time from ONNX Runtime's defaults (graph optimisation all, spinning on, memory "
             "pattern and arena on) with the benchmark's thread count."]
    write_results(args.out, "inference_options", {"meta": meta, "results": results}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
