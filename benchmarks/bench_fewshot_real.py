"""Few-shot segmentation on real labels: the default MR model's head against a U-Net from scratch (issue 18).

    python benchmarks/bench_fewshot_real.py [--data ../shared/data] [--shots 1 3 5] [--splits 3]
                                            [--scratch-steps 300] [--threads 2] [--work DIR]
                                            [--out benchmarks/results]

Data: the six BraTS 2013 cases of ``DATA/brats-examples`` (CC BY-NC-SA: evaluation only, nothing trained here is
shipped). Image: T1c (z-scored in the brain). Two classes from the manual labels: ``tumour`` (BraTS labels 1-4,
the whole tumour) and ``brain`` (the brain mask without the tumour). With six cases the split rotates: split
``s`` labels cases ``s, s + 1, ..., s + k - 1`` (cyclically) and tests on the other ``6 - k``; ``--splits``
rotations per shot count.

Per split and shot count, side by side on the same cases:
* **head**: the few-shot head (``fewshot.head``, default settings) on the shipped default MR model's embeddings;
* **scratch**: a MONAI U-Net trained from scratch (``finetune --mode scratch``) on the same labelled cases at the
  default MR model's spacing, ``--scratch-steps`` steps of Adam at 2e-3 (the demo's budget; the downstream
  recipe's 1e-4 leaves a U-Net near chance at a few hundred steps).

Dice, HD95 and NSD (2 mm) per class and test case (``evaluation.segmentation_metrics``; HD95 of a missed class is
infinite and counted, not averaged). Writes ``fewshot_real.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
from _common import machine_description, machine_line, md_table, peak_rss_mb, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
NAMES = {1: "brain", 2: "tumour"}
HEAD, SCRATCH = "default MR head", "U-Net from scratch"


def brats_cases(data: Path) -> list[Path]:
    cases = sorted((data / "brats-examples").glob("*/brats_2013_pat*"))
    if len(cases) < 2:
        raise SystemExit(f"no BraTS cases under {data / 'brats-examples'} (see ../shared/data/README.md)")
    return cases


def label_map(otmulticlass: np.ndarray, brainmask: np.ndarray) -> np.ndarray:
    """BraTS labels -> 1 brain (mask without tumour), 2 tumour (labels 1-4), 0 elsewhere."""
    out = np.where(brainmask > 0, 1, 0).astype(np.uint8)
    out[otmulticlass > 0] = 2
    return out


def prepare(cases: list[Path], work: Path) -> list[dict]:
    """Image and label file per case (labels with their names next to them, as ``finetune`` reads them)."""
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import write_labelmap

    out = []
    for case in cases:
        image = case / "T1c_subtrMeanDivStd.nii.gz"
        ot, mask = read_image(case / "OTMultiClass.nii.gz"), read_image(case / "brainmask.nii.gz")
        label = work / f"{case.name}_label.nii.gz"
        if not label.is_file():
            write_labelmap(ot.with_array(label_map(ot.array, mask.array)), NAMES, label)
        out.append({"id": case.name, "image": str(image), "label": str(label)})
    return out


def splits(n: int, shots: int, count: int) -> list[tuple[list[int], list[int]]]:
    """``count`` rotations: labelled ``s .. s + shots - 1`` (mod n), tested on the rest."""
    result = []
    for s in range(min(count, n)):
        labelled = [(s + i) % n for i in range(shots)]
        result.append((labelled, [i for i in range(n) if i not in labelled]))
    return result


def run_scratch(train: list[dict], work: Path, spacing: float, steps: int, threads: int):
    from anatomical_embedding.methods.finetune import load_finetuned
    from anatomical_embedding.training.engine import Trainer
    from anatomical_embedding.training.finetune_config import resolve_finetune_config

    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "data.json"
    manifest.write_text(json.dumps({"cases": train}, indent=1), encoding="utf-8")
    overrides = [f"method.spacing=[{spacing},{spacing},{spacing}]", "method.patch_size=[48,48,48]",
                 "method.unet_res_units=1", "method.unet_channels=[8,16,32,64]", "method.val_every=0",
                 "method.val_fraction=0", f"train.max_steps={steps}", "train.lr=2e-3", "train.num_workers=0",
                 "train.tensorboard=false", "train.progress_bar=false", "train.batch_size=2", "train.device=cpu",
                 f"train.ckpt_every={steps}", f"train.threads={threads}"]
    run = work / "run"
    cfg = resolve_finetune_config(run, None, overrides, "scratch", None, False, str(manifest), None)
    t0 = time.perf_counter()
    if Trainer(cfg, manifest, run, echo_progress=False).run() != 0:
        raise RuntimeError(f"the scratch U-Net failed; see {run}")
    return load_finetuned(run, "last"), time.perf_counter() - t0


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for method in (HEAD, SCRATCH):
        for shots in sorted({r["shots"] for r in rows}):
            for name in (*NAMES.values(), "mean"):
                sel = [r for r in rows if r["method"] == method and r["shots"] == shots
                       and (name == "mean" or r["name"] == name)]
                if not sel:
                    continue
                hd = np.array([r["hd95_mm"] for r in sel], dtype=float)
                out.append({"method": method, "shots": shots, "class": name, "n": len(sel),
                            "dice": float(np.mean([r["dice"] for r in sel])),
                            "hd95_mm": float(np.mean(hd[np.isfinite(hd)])) if np.isfinite(hd).any() else float("inf"),
                            "hd95_missed": int((~np.isfinite(hd)).sum()),
                            "nsd": float(np.mean([r["nsd"] for r in sel]))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--splits", type=int, default=3, help="rotations of the split per shot count (default 3)")
    ap.add_argument("--scratch-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="folder for labels and runs (default: temporary)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from anatomical_embedding.evaluation.segmentation import segmentation_metrics
    from anatomical_embedding.fewshot.head import FewShotConfig, apply_heads, case_samples, train_head_on_samples
    from anatomical_embedding.inference.backends import open_model
    from anatomical_embedding.inference.defaults import default_model_path
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import read_labelmap
    from anatomical_embedding.methods.finetune import segment_volume

    cases = brats_cases(args.data)
    if max(args.shots) >= len(cases):
        raise SystemExit(f"--shots must leave test cases: {len(cases)} cases, got {max(args.shots)} shots")
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fewshot_real_"))
    work.mkdir(parents=True, exist_ok=True)
    files = prepare(cases, work)
    images = [read_image(f["image"]) for f in files]
    labels = [read_labelmap(f["label"])[0] for f in files]
    model_path = default_model_path("MR")
    model = open_model(model_path, backend="onnxruntime", threads=args.threads)
    config = FewShotConfig()
    samples = [case_samples(model, images[i], labels[i], NAMES, config, i) for i in range(len(files))]
    spacing = float(np.max(model.spacing))
    rows, timing = [], []
    for shots in args.shots:
        for split_index, (labelled, tests) in enumerate(splits(len(files), shots, args.splits)):
            t0 = time.perf_counter()
            head = train_head_on_samples([samples[i] for i in labelled], NAMES, model.model_hash, config)
            head_s = time.perf_counter() - t0
            scratch, scratch_s = run_scratch([files[i] for i in labelled], work / f"scratch_{shots}_{split_index}",
                                             spacing, args.scratch_steps, args.threads)
            for t in tests:
                (seg,) = apply_heads(model, [head], images[t])
                tag = {"shots": shots, "split": split_index, "labelled": [files[i]["id"] for i in labelled]}
                rows += [{**r, **tag, "method": HEAD} for r in segmentation_metrics(seg, labels[t], NAMES,
                                                                                    case=files[t]["id"])]
                seg = segment_volume(scratch, images[t], postprocess=True)
                rows += [{**r, **tag, "method": SCRATCH} for r in segmentation_metrics(seg, labels[t], NAMES,
                                                                                       case=files[t]["id"])]
            timing.append({"shots": shots, "split": split_index, "head_train_s": head_s, "scratch_train_s": scratch_s})
            dice = {m: np.mean([r["dice"] for r in rows if r["method"] == m and r["shots"] == shots
                                and r["split"] == split_index]) for m in (HEAD, SCRATCH)}
            print(f"{shots}-shot split {split_index}: Dice head {dice[HEAD]:.3f}, scratch {dice[SCRATCH]:.3f} "
                  f"(head {head_s:.1f} s, scratch {scratch_s:.0f} s)", flush=True)
    summary = summarise(rows)
    meta = machine_description(args.threads)
    meta["command"] = "python benchmarks/bench_fewshot_real.py " + " ".join(argv or sys.argv[1:])
    lines = ["# Few-shot segmentation on real labels (BraTS)", "", machine_line(meta), "",
             f"Command: `{meta['command'].strip()}`. Model: `{model_path.name}` (shipped, never trained on BraTS). "
             f"{len(files)} BraTS 2013 cases (T1c; CC BY-NC-SA, evaluation only); classes brain (mask without "
             f"tumour) and tumour (labels 1-4); {args.splits} rotating splits per shot count, tested on the cases "
             f"left out. Scratch: MONAI U-Net, {args.scratch_steps} steps at {spacing:g} mm. HD95 is the mean over "
             "finite values; `missed` counts test cases where a class was not found at all.", "",
             *md_table(["method", "labelled cases", "class", "Dice", "HD95 (mm)", "missed", "NSD (2 mm)"],
                       [[s["method"], s["shots"], s["class"], f"{s['dice']:.3f}", f"{s['hd95_mm']:.1f}",
                         s["hd95_missed"], f"{s['nsd']:.3f}"] for s in summary]), "",
             f"Head training {np.mean([t['head_train_s'] for t in timing]):.1f} s on average (cases embedded once, "
             f"{len(files)} in all); scratch U-Net {np.mean([t['scratch_train_s'] for t in timing]):.0f} s per run. "
             f"Wall time {time.perf_counter() - t_start:.0f} s, peak memory {peak_rss_mb():.0f} MB."]
    write_results(args.out, "fewshot_real", {"meta": meta, "summary": summary, "timing": timing,
                                             "rows": [{k: (v if not isinstance(v, float) or np.isfinite(v) else None)
                                                       for k, v in r.items()} for r in rows]}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
