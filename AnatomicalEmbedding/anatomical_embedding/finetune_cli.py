"""``anatomical-embedding finetune`` (train a segmentation network with the engine) and ``segment`` (apply it)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: Engine settings of a finetune run when no --config file is given (the AEFM downstream recipe:
#: Adam at lr 1e-4, constant; best.pt by validation Dice). Resources/configs/finetune.toml holds the same.
FINETUNE_TRAIN_DEFAULTS: tuple[str, ...] = (
    "train.optimizer=\"adam\"", "train.lr=1e-4", "train.weight_decay=0.0", "train.lr_schedule=\"constant\"",
    "train.best_metric=\"val_dice_error\"", "train.ckpt_every=250", "train.batch_size=2",
)

EPILOG = """\
examples:
  anatomical-embedding finetune --data cohort/ --init-from runs/aefm1 --out runs/seg1
  anatomical-embedding finetune --mode backbone --init-from runs/hdssl1 --data images/ --labels labels/ --out runs/seg2
  anatomical-embedding finetune --mode scratch --data cohort/ --out runs/unet --set method.spacing=[1.5,1.5,1.5]
  torchrun --nproc_per_node 4 -m anatomical_embedding.cli finetune --data cohort/ --init-from runs/aefm1 --out runs/seg3
  anatomical-embedding finetune --out runs/seg1 --data cohort/ --resume
  anatomical-embedding segment --run runs/seg1 --image ct.nii.gz --out ct_seg.seg.nrrd

modes: embedding (default): a MONAI U-Net on the image plus the frozen embedding of --init-from (AEFM's
downstream network); backbone: the pretrained network finetuned as the encoder (methods listed in
methods/backbones.py: aefm, hdssl, anatomask, adam; a 2D Adam/Eve run trains on single-slice images with
method.patch_size=[i,j,1]); scratch: the U-Net on the image alone, randomly initialised (baseline).

Label maps (all with the same label values) are required; unlabelled cases are skipped. A share of the
labelled cases (method.val_fraction) is held out and evaluated with sliding windows every
method.val_every steps (Dice; progress.jsonl "eval" events); checkpoints/best.pt is the best validated
model. Without --config the engine settings are Adam, lr 1e-4, constant (Resources/configs/finetune.toml);
--set overrides any train.KEY or method.KEY (see `anatomical-embedding train --help` for the engine keys).
"""


def _label_names(path: Path) -> dict[int, str]:
    """Segment names of a label file without reading voxels where possible (sidecar / label_names.json)."""
    from .io.labelmaps import SEG_SUFFIX, read_labelmap, sidecar_path

    if path.name.lower().endswith(SEG_SUFFIX):
        return read_labelmap(path)[1]
    import json

    for candidate in (sidecar_path(path), path.parent / "label_names.json"):
        if candidate.is_file():
            return {int(k): str(v) for k, v in json.loads(candidate.read_text(encoding="utf-8")).items() if int(k) != 0}
    return {}


def class_names_from_labels(data: str, labels: str | None) -> tuple[str, ...]:
    """``("background", name of value 1, ...)`` from the label files' names (gaps as ``label_N``)."""
    from .data import DatasetSpec

    spec = DatasetSpec.from_path(data, labels)
    names: dict[int, str] = {}
    for case in spec.labelled:
        for value, name in _label_names(case.label).items():
            if names.setdefault(value, name) != name:
                raise ValueError(f"label value {value} is {names[value]!r} in one case and {name!r} in "
                                 f"{case.label}; make the segment names agree")
    if not names:
        return ()
    top = max(names)
    return ("background",) + tuple(names.get(v, f"label_{v}") for v in range(1, top + 1))


def resolve_finetune_config(out: str | Path, config_file: str | None, overrides: list[str], mode: str | None,
                            init_from: str | None, resume: bool, data: str, labels: str | None):
    """The finetune RunConfig of ``finetune`` and ``train.py --method finetune`` (one place for both)."""
    from .training.config import config_file_for_run, load_run_config

    overrides = list(overrides)
    if resume:
        if mode or init_from:
            raise ValueError("--resume uses the run's own config.toml; drop --mode/--init-from")
        config_file = config_file_for_run(out, config_file, resume)
    else:
        if not config_file:
            overrides = list(FINETUNE_TRAIN_DEFAULTS) + overrides
        if mode:
            overrides.append(f"method.mode=\"{mode}\"")
        if init_from:
            overrides.append(f"method.init_from='{Path(init_from).resolve()}'")
    cfg = load_run_config("finetune", config_file, overrides)
    if cfg.method != "finetune":
        raise ValueError(f"{config_file} configures method {cfg.method!r}; finetune needs method = \"finetune\"")
    if not resume and not cfg.method_config.class_names:
        cfg.method_config.class_names = class_names_from_labels(data, labels)
    return cfg


def _finetune(args: argparse.Namespace) -> int:
    from .training.engine import Trainer

    cfg = resolve_finetune_config(args.out, args.config, args.overrides, args.mode, args.init_from, args.resume,
                                  args.data, args.labels)
    return Trainer(cfg, args.data, Path(args.out), labels=args.labels, resume=args.resume).run()


def _segment(args: argparse.Namespace) -> int:
    import torch

    from .io import read_image
    from .io.labelmaps import default_color, write_labelmap
    from .methods.finetune import class_names_dict, load_finetuned, segment_volume

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} exists; choose another --out or pass --overwrite")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    method = load_finetuned(args.run, args.checkpoint, device=device)
    seg = segment_volume(method, read_image(args.image), postprocess=args.postprocess)
    names = class_names_dict(method)
    write_labelmap(seg, names, args.out, overwrite=args.overwrite, colors={v: default_color(v) for v in names})
    present = sorted(int(v) for v in set(seg.array.ravel().tolist()) - {0})
    print(f"labelmap written to {args.out} ({len(present)} of {len(names)} segments present)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="train a segmentation network (frozen embedding + U-Net, pretrained backbone, or scratch)",
        description="Full finetuning for segmentation with the training engine (checkpoints, resume, DDP via "
                    "torchrun, AMP, progress JSON lines).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="images folder, cohort folder or manifest .json (with labels)")
    p.add_argument("--labels", help="folder of label maps matching the images by file name")
    p.add_argument("--out", required=True, help="run folder (RUN_DIR); must be new unless --resume")
    p.add_argument("--mode", choices=["embedding", "backbone", "scratch"],
                   help="what to train (default: embedding, or the config file's method.mode)")
    p.add_argument("--init-from", help="pretrained training run folder (embedding and backbone modes)")
    p.add_argument("--config", help="TOML settings (e.g. Resources/configs/finetune.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. train.max_steps=2000 or method.patch_size=[64,64,64]")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from checkpoints/last.pt")
    p.set_defaults(func=_finetune)

    s = subparsers.add_parser("segment", help="segment an image with a finetune run",
                              description="Apply a finetune run (sliding windows) and write a labelmap with its "
                                          "segment names (.seg.nrrd for Slicer, or an image + .labels.json).")
    s.add_argument("--run", required=True, help="finetune run folder")
    s.add_argument("--image", required=True)
    s.add_argument("--out", required=True, help="labelmap to write (.seg.nrrd keeps names and colours)")
    s.add_argument("--checkpoint", default="best", help="best (default; falls back to last), last or a step")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--postprocess", action="store_true", help="keep the largest component per class, fill holes")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_segment)


def main(argv: list[str] | None = None) -> int:
    """``python -m anatomical_embedding.finetune_cli ARGS`` = ``anatomical-embedding finetune ARGS``."""
    import sys

    from .cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
