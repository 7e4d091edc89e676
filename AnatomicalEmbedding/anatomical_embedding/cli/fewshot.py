"""``fewshot train|apply`` and ``evaluate segmentation`` sub-commands."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from anatomical_embedding.cli.options import add_backend_arg, backend_name
from anatomical_embedding.fewshot.head import FewShotConfig, FewShotHead, apply_head, train_head
from anatomical_embedding.io.images import IMAGE_SUFFIXES
from anatomical_embedding.io.outputs import check_outputs

#: What ``fewshot apply --out`` can write (io.labelmaps.write_labelmap).
LABELMAP_SUFFIXES = (".seg.nrrd", *IMAGE_SUFFIXES)


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, unit="%", file=sys.stderr, leave=False)

    def update(fraction: float, message: str) -> bool:
        bar.n = int(round(100 * min(1.0, fraction)))
        bar.set_postfix_str(message, refresh=True)
        return True

    return bar, update


def _open(model_path: str, backend: str):
    from anatomical_embedding.inference.backends import open_model

    return open_model(model_path, backend=backend_name(backend))


def _train(args: argparse.Namespace) -> int:
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import check_label_map, read_labelmap
    from anatomical_embedding.io.settings import in_range

    in_range(args.hidden, "--hidden", 0)
    in_range(args.voxels_per_class, "--voxels-per-class", 1)
    if len(args.images) != len(args.labels):
        raise ValueError(f"{len(args.images)} images but {len(args.labels)} label maps; give one label map per image")
    check_outputs([(args.out, "--out", (".aehead",))], args.overwrite)
    images, labels, names = [], [], {}
    for img, lab in zip(args.images, args.labels):
        images.append(read_image(img, replace_nonfinite=args.replace_nonfinite))
        vol, lab_names = read_labelmap(lab)
        check_label_map(images[-1], vol, lab)
        labels.append(vol)
        for v, n in lab_names.items():
            if names.setdefault(v, n) != n:
                raise ValueError(f"label value {v} is {names[v]!r} in one case and {n!r} in {lab}; make names agree")
    from anatomical_embedding.inference.defaults import resolve_model

    model_path = resolve_model(args.model, images[0].array)
    model = _open(model_path, args.backend)
    cfg = FewShotConfig(hidden=args.hidden, use_intensity=not args.no_intensity, use_coarse=not args.no_coarse,
                        voxels_per_class=args.voxels_per_class, seed=args.seed)
    bar, update = _progress_bar("few-shot training")
    try:
        head = train_head(model, images, labels, names, cfg, progress=update)
    finally:
        bar.close()
    head.history["model_path"] = str(Path(model_path).resolve())
    head.save(args.out, overwrite=args.overwrite)
    h = head.history
    print(f"head written to {args.out}: {len(head.class_names) - 1} classes, {h['n_voxels']} voxels, "
          f"{h['epochs_run']} epochs (best {h['best_epoch'] + 1}), val accuracy "
          f"{h['val_accuracy'][h['best_epoch']]:.3f}, {h['seconds']} s")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import write_labelmap

    check_outputs([(args.out, "--out", LABELMAP_SUFFIXES)], args.overwrite)
    head = FewShotHead.load(args.head)
    model_path = args.model or head.history.get("model_path")
    if not model_path:
        raise ValueError("the head does not record its model; pass --model")
    image = read_image(args.image, replace_nonfinite=args.replace_nonfinite)
    model = _open(model_path, args.backend)
    bar, update = _progress_bar("segmenting")
    try:
        seg = apply_head(model, head, image, postprocess_components=not args.no_postprocess,
                         progress=update)
    finally:
        bar.close()
    names = {v: n for v, n in zip(head.class_values, head.class_names) if v != 0}
    colors = {v: c for v, c in zip(head.class_values, head.colors) if v != 0 and c}
    write_labelmap(seg, names, args.out, overwrite=args.overwrite, colors=colors or None)
    print(f"labelmap written to {args.out} ({len(names)} segments)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from anatomical_embedding.evaluation.segmentation import plot_dice, segmentation_metrics, summarise, write_metrics_csv
    from anatomical_embedding.io.labelmaps import read_labelmap

    if len(args.pred) != len(args.ref):
        raise ValueError(f"{len(args.pred)} predictions but {len(args.ref)} references; pair them one to one")
    rows = []
    for pred_path, ref_path in zip(args.pred, args.ref):
        pred, _ = read_labelmap(pred_path)
        ref, names = read_labelmap(ref_path)
        rows += segmentation_metrics(pred, ref, names, args.tolerance, case=Path(ref_path).name)
    write_metrics_csv(rows, args.out)
    if args.plot:
        plot_dice(rows, args.plot)
    summary = summarise(rows)
    print(json.dumps(summary, indent=1) if args.json else "\n".join(
        f"{name:24s} dice {s['dice']:.3f}  hd95 {s['hd95_mm']:.1f} mm  nsd {s['nsd']:.3f}  (n={s['n']})"
        for name, s in summary.items()))
    return 0


def register(subparsers) -> None:
    fs = subparsers.add_parser("fewshot", help="few-shot segmentation head on frozen embeddings")
    sub = fs.add_subparsers(dest="fewshot_command", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train the light head M_S on a few labelled cases")
    t.add_argument("--model", help="model package (.aemodel) or training run folder (default: the shipped default "
                   "model for the first image's modality)")
    t.add_argument("--images", nargs="+", required=True, help="labelled images")
    t.add_argument("--labels", nargs="+", required=True,
                   help="label maps in the same order (.seg.nrrd, or label images with a .labels.json names file)")
    t.add_argument("--out", required=True, help="head file to write (.aehead)")
    add_backend_arg(t)
    t.add_argument("--hidden", type=int, default=FewShotConfig.hidden, help="hidden width; 0 = a single linear layer, the HDSSL paper's linear evaluation (default: %(default)s)")
    t.add_argument("--no-intensity", action="store_true", help="do not feed the image intensity to the head")
    t.add_argument("--no-coarse", action="store_true", help="do not feed the coarse embedding to the head")
    t.add_argument("--voxels-per-class", type=int, default=FewShotConfig.voxels_per_class,
                   help="class-balanced samples per class and case (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--replace-nonfinite", action="store_true", help="set NaN/infinite voxels to the image minimum")
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_train)
    a = sub.add_parser("apply", help="segment an image with a trained head")
    a.add_argument("--head", required=True)
    a.add_argument("--image", required=True)
    a.add_argument("--out", required=True, help="labelmap to write (.seg.nrrd keeps names and colours for Slicer)")
    a.add_argument("--model", help="model (default: the one recorded in the head; its hash must match)")
    add_backend_arg(a)
    a.add_argument("--no-postprocess", action="store_true", help="skip largest-component and hole filling")
    a.add_argument("--replace-nonfinite", action="store_true", help="set NaN/infinite voxels to the image minimum")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_apply)

    ev = subparsers.add_parser("evaluate", help="evaluate results against references")
    esub = ev.add_subparsers(dest="evaluate_command", metavar="WHAT")
    esub.required = True
    s = esub.add_parser("segmentation", help="per-organ Dice, HD95 and NSD (MONAI metrics) to CSV, plus a plot")
    s.add_argument("--pred", nargs="+", required=True)
    s.add_argument("--ref", nargs="+", required=True)
    s.add_argument("--out", default="segmentation_metrics.csv", help="CSV to write (default: %(default)s)")
    s.add_argument("--plot", help="PNG box plot of Dice per organ")
    s.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default: %(default)s)")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=_evaluate)
