"""Few-shot fast path: head training time, apply time, and Dice against the number of labelled cases.

    python benchmarks/bench_fewshot.py [--model RUN_DIR_OR_PACKAGE] [--shots 1 3 5 10] [--threads 2]
                                       [--device auto|cpu|cuda] [--smoke] [--out benchmarks/results]

Writes ``fewshot.json``, ``fewshot.md`` and ``fewshot.png`` (Dice vs labelled cases, plus the training
time) under ``--out``. Data: a phantom cohort (``--subjects``, default 14 at 4 mm, 64 voxels per side): the
first ``max(shots)`` subjects are the labelled pool (``k`` shots = the first ``k``), the remaining ones are the
test cases. Model: ``--model`` (a training run folder or an ``.aemodel`` package), otherwise the tiny AEFM of
the test fixtures is trained first (8 mm, 300 steps: about 90 s on two idle cores, longer on busy ones; its
time is reported separately). The head uses the default :class:`FewShotConfig` (M_S with 64 hidden units,
intensity + coarse embedding inputs, 3000 voxels per class and case, early stopping) unless
``--voxels-per-class``/``--epochs`` say otherwise (the head's cost grows with both); ``apply`` includes
post-processing (largest component, hole filling). Dice is MONAI's, per organ, averaged over organs and test
cases (``evaluation.segmentation_metrics``). ``--smoke`` (``run_all.py --quick``, the tests) checks that the
benchmark runs: 2 subjects at 8 mm (32 voxels per side), 1 shot, an untrained tiny AEFM (widths 4/8/16/32) and a
head of 100 voxels per class and 5 epochs; its numbers are not a measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_description, machine_line, md_table, peak_rss_mb, write_results

ROOT = Path(__file__).resolve().parents[1]


def tiny_aefm(cohort, train_ids: list[str], work: Path) -> tuple[Path, float]:
    sys.path.insert(0, str(ROOT / "Testing"))
    from anatomical_embedding.training.config import load_run_config
    from anatomical_embedding.training.engine import Trainer
    from fixtures_data import TINY_AEFM_OVERRIDES  # the same tiny model the tests use

    manifest = work / "pretrain.json"
    manifest.write_text(json.dumps({"cases": [{"id": s.id, "image": str(s.image_path)}
                                              for s in cohort.subjects if s.id in train_ids]}), encoding="utf-8")
    t0 = time.perf_counter()
    run = work / "aefm"
    Trainer(load_run_config("aefm", None, TINY_AEFM_OVERRIDES), manifest, run).run()
    return run, time.perf_counter() - t0


def untrained_tiny_package(work: Path, spacing: float) -> Path:
    """An untrained tiny AEFM package (``--smoke``): exercises every step at a fraction of the cost."""
    import torch
    from anatomical_embedding.inference.export import export_embedder
    from anatomical_embedding.nets.aefm_unet import AEFMUNet

    torch.manual_seed(0)
    return export_embedder(AEFMUNet([4, 8, 16, 32], 8), {"method": "aefm", "spacing": [spacing] * 3,
                                                          "patch_size": [32] * 3}, work / "tiny_untrained.aemodel",
                           overwrite=True)


def write_report(result: dict, out: Path) -> None:
    """``fewshot.md`` and ``fewshot.png`` from the measurements (``fewshot.json``'s content)."""
    env, rows, cfg, model = result["env"], result["rows"], result["head_config"], result["model"]
    pretrain_s = model["pretrain_s"]
    source = model.get("description") or (f"trained here in {pretrain_s:.0f} s" if pretrain_s else model["path"])
    cohort = result["cohort"]
    # Older results (before the shared machine description) have only torch/platform/date/load in "env".
    header = (machine_line(result["machine"]) if "machine" in result else
              f"torch {env['torch']}, {env['platform']}, {env['date']}, {env['threads']} threads, 1-min load average "
              f"{env['load_average_1min']} (CPU figures are slower on a shared machine)")
    lines = [
        "# Few-shot fast path (frozen embedding + M_S head)", "", header, "",
        (f"Model: {model['card_method']} at {model['spacing']} mm ({source}); "
         f"{len(cohort['test_ids'])} held-out phantom subjects ({cohort['spacing_mm']:g} mm, {cohort['size']}^3), "
         f"{len(rows[0].get('dice_per_organ', {})) if rows else 0} organs. Head: {cfg['voxels_per_class']} voxels "
         f"per class and case, at most {cfg['epochs']} epochs "
         f"(patience {cfg['patience']}), hidden {cfg['hidden']}."), "",
        *md_table(["labelled cases", "head training (s)", "apply per case (s)", "voxels", "epochs", "mean Dice"],
                  [[r["shots"], f"{r['train_s']:.1f}", f"{r['apply_s_mean']:.2f}", r["n_voxels"], r["epochs_run"],
                    f"{r['mean_dice']:.3f}"] for r in rows]),
        "", ("Training time includes embedding the labelled cases (tiles) and the early-stopped NumPy head; "
             "apply includes embedding, the head and post-processing. Dice: mean over organs and test cases.")]
    if result.get("peak_rss_mb"):
        lines += ["", f"Peak resident memory of the benchmark process: {result['peak_rss_mb']:.0f} MB."]
    write_results(out, "fewshot", result, lines)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = [r["shots"] for r in rows]
    ax[0].plot(ks, [r["mean_dice"] for r in rows], "o-")
    ax[0].set_xlabel("labelled cases")
    ax[0].set_ylabel("mean Dice (held-out)")
    ax[0].set_xticks(ks)
    ax[0].grid(alpha=0.3)
    ax[1].plot(ks, [r["train_s"] for r in rows], "o-", label="head training")
    ax[1].plot(ks, [r["apply_s_mean"] for r in rows], "s-", label="apply (per case)")
    ax[1].set_xlabel("labelled cases")
    ax[1].set_ylabel("seconds")
    ax[1].set_xticks(ks)
    ax[1].legend()
    ax[1].grid(alpha=0.3)
    fig.suptitle("Few-shot head on a frozen embedding")
    fig.tight_layout()
    fig.savefig(out / "fewshot.png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="training run folder or .aemodel package (default: train the tiny AEFM)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 3, 5, 10])
    ap.add_argument("--subjects", type=int, default=14)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--voxels-per-class", type=int, default=None,
                    help="head samples per class and case (default: FewShotConfig's, 3000)")
    ap.add_argument("--epochs", type=int, default=None, help="head epoch cap (default: FewShotConfig's, 200)")
    ap.add_argument("--work", help="folder for the cohort and model (default: a temporary folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--report-only", action="store_true", help="rewrite fewshot.md/.png from OUT/fewshot.json")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device of the embedding model (ONNX Runtime's CUDA provider when installed)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny cohort, untrained tiny model, small head (checks the benchmark runs)")
    args = ap.parse_args(argv)
    spacing, size = (8.0, 32) if args.smoke else (4.0, 64)
    if args.smoke:
        args.shots, args.subjects = [1], 2
        args.voxels_per_class, args.epochs = args.voxels_per_class or 100, args.epochs or 5
    if args.report_only:
        write_report(json.loads((Path(args.out) / "fewshot.json").read_text(encoding="utf-8")), Path(args.out))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.evaluation.segmentation import segmentation_metrics
    from anatomical_embedding.fewshot.head import FewShotConfig, apply_head, train_head
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import read_labelmap
    from anatomical_embedding.phantoms import generate_cohort, load_cohort

    shots = sorted(set(args.shots))
    if args.subjects <= max(shots):
        raise SystemExit(f"--subjects must exceed the largest shot count {max(shots)} (the rest are test cases)")
    tmp = tempfile.TemporaryDirectory() if not args.work else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "cohort" / "manifest.json"
    t0 = time.perf_counter()
    if not manifest.is_file():
        generate_cohort(work / "cohort", args.subjects, seed=args.seed, spacing=spacing, size=size,
                        workers=args.threads)
    cohort = load_cohort(manifest)
    cohort_s = time.perf_counter() - t0
    pool, test = cohort.subjects[: max(shots)], cohort.subjects[max(shots):]
    pretrain_s = None
    model_path = args.model
    if not model_path and args.smoke:
        model_path = str(untrained_tiny_package(work, 8.0))
    elif not model_path:
        run, pretrain_s = tiny_aefm(cohort, [s.id for s in pool], work)  # never sees the test cases
        model_path = str(run)
    model = open_model(model_path, device=args.device, threads=args.threads)
    names = {v: n for v, n in cohort.label_names.items() if v != 0}
    images = [read_image(s.image_path) for s in pool]
    labels = [read_labelmap(s.label_path)[0] for s in pool]
    tests = [(read_image(s.image_path), read_labelmap(s.label_path)[0], s.id) for s in test]
    cfg = FewShotConfig()
    if args.voxels_per_class:
        cfg.voxels_per_class = args.voxels_per_class
    if args.epochs:
        cfg.epochs = args.epochs
    rows = []
    for k in shots:
        t0 = time.perf_counter()
        head = train_head(model, images[:k], labels[:k], names, cfg)
        train_s = time.perf_counter() - t0
        dice_rows, apply_times = [], []
        for image, ref, cid in tests:
            t0 = time.perf_counter()
            pred = apply_head(model, head, image)
            apply_times.append(time.perf_counter() - t0)
            dice_rows += segmentation_metrics(pred, ref, names, case=cid)
        per_organ = {}
        for r in dice_rows:
            per_organ.setdefault(r["name"], []).append(r["dice"])
        row = {"shots": k, "train_s": round(train_s, 2), "apply_s_mean": round(float(np.mean(apply_times)), 3),
               "n_voxels": head.history["n_voxels"], "epochs_run": head.history["epochs_run"],
               "mean_dice": round(float(np.mean([r["dice"] for r in dice_rows])), 4),
               "dice_per_organ": {n: round(float(np.mean(v)), 4) for n, v in per_organ.items()}}
        rows.append(row)
        print(json.dumps({k_: v for k_, v in row.items() if k_ != "dice_per_organ"}), flush=True)
    machine = machine_description(args.threads)
    env = {k: machine[k] for k in ("torch", "platform", "threads", "date", "load_average_1min")}
    result = {"env": env, "machine": machine, "smoke": args.smoke, "peak_rss_mb": peak_rss_mb(),
              "model": {"path": model_path, "card_method": model.card.get("method"), "device": model.device,
                        "description": "untrained tiny AEFM, --smoke" if args.smoke and not args.model else None,
                                    "spacing": model.card.get("spacing"), "hash": model.model_hash[:12],
                                    "pretrain_s": None if pretrain_s is None else round(pretrain_s, 1)},
              "cohort": {"subjects": args.subjects, "seed": args.seed, "spacing_mm": spacing, "size": size,
                         "test_ids": [s.id for s in test], "generate_s": round(cohort_s, 1)},
              "head_config": cfg.__dict__, "rows": rows}
    write_report(result, Path(args.out))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
