"""``anatomical-embedding finetune`` (train a segmentation network with the engine) and ``segment`` (apply it)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)

EPILOG = """\
examples:
  anatomical-embedding finetune --data cohort/ --init-from runs/aefm1 --out runs/seg1
  anatomical-embedding finetune --mode backbone --init-from runs/hdssl1 --data images/ --labels labels/ --out runs/seg2
  anatomical-embedding finetune --mode scratch --data cohort/ --out runs/unet --set method.spacing=[1.5,1.5,1.5]
  torchrun --nproc_per_node 4 -m anatomical_embedding.cli.app finetune --data cohort/ --init-from runs/aefm1 --out runs/seg3
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
--mode backbone adds the source method's paper recipe (training/finetune_config.py FINETUNE_RECIPES: HDSSL
Adam 3e-4 batch 7; Adam/Eve AdamW 2e-4 cosine with augmentation; AnatoMask nnU-Net's SGD 1e-2 poly); --set overrides any train.KEY or method.KEY (see `anatomical-embedding train --help` for the engine keys).
"""


def _finetune(args: argparse.Namespace) -> int:
    from anatomical_embedding.training.engine import Trainer
    from anatomical_embedding.training.finetune_config import resolve_finetune_config

    cfg = resolve_finetune_config(args.out, args.config, args.overrides, args.mode, args.init_from, args.resume,
                                  args.data, args.labels)
    return Trainer(cfg, args.data, Path(args.out), labels=args.labels, resume=args.resume).run()


def _segment(args: argparse.Namespace) -> int:
    import torch

    from anatomical_embedding.io import read_image
    from anatomical_embedding.io.labelmaps import default_color, write_labelmap
    from anatomical_embedding.methods.finetune import class_names_dict, load_finetuned, segment_volume

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
    """``python -m anatomical_embedding.cli.finetune ARGS`` = ``anatomical-embedding finetune ARGS``."""
    import sys

    from anatomical_embedding.cli.app import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
