"""``anatomical-embedding train``: pretrain a method on a folder of images (one GPU, many, or CPU)."""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  anatomical-embedding train --method aefm --data cohort/ --out runs/aefm1
  anatomical-embedding train --method aefm --data images/ --labels labels/ --out runs/aefm2 \\
      --config Resources/configs/aefm.toml --set train.batch_size=4 --set method.n_pos=500
  torchrun --nproc_per_node 8 -m anatomical_embedding.cli.app train --method aefm --data images/ --out runs/big
  anatomical-embedding train --out runs/aefm1 --data cohort/ --resume

data: a folder of 3D images (NIfTI/NRRD/MHA or DICOM series folders), a folder with images/ and
labels/ sub-folders, or a manifest .json. Label maps (optional; AEFM's region stage uses them) must have
the same file names as their images.

settings: TOML with method = "...", a [train] table (engine: batch_size (global), epochs, max_steps, lr,
optimizer, amp, compile, channels_last, num_workers, log_every, ckpt_every, keep_last, seed, ...) and a
[config] table (the method's settings, e.g. AEFM patch_size, n_pos, n_neg, temperature, momentum).
--set overrides them: train.KEY=VALUE, method.KEY=VALUE (values in TOML syntax, e.g. [64,64,64]).

output (RUN_DIR): config.toml (the full settings), checkpoints/last.pt, best.pt, step_*.pt,
metrics.csv, progress.jsonl (JSON lines, also on stdout; see training/progress.py), tensorboard/.

exit codes: 0 finished; 2 bad input, or RUN_DIR is being trained by another process (one-line message);
130 stopped by SIGINT/SIGTERM after saving checkpoints/last.pt (continue with --resume).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="pretrain an embedding method (AEFM, ...) on unlabelled images",
        description="Pretrain a dense anatomical embedding method. Works on CPU, one GPU, or many GPUs "
                    "and nodes via torchrun (DDP).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from anatomical_embedding.methods import available_methods

    p.add_argument("--method", choices=available_methods(),
                   help="training method (default: from --config or the resumed run)")
    p.add_argument("--data", required=True, help="images folder, cohort folder or manifest .json")
    p.add_argument("--labels", help="folder of label maps matching the images by file name (optional)")
    p.add_argument("--out", required=True, help="run folder (RUN_DIR); must be new unless --resume")
    p.add_argument("--config", help="TOML settings file (e.g. Resources/configs/aefm.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. train.lr=3e-4 or method.n_pos=500 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR from checkpoints/last.pt with its saved config.toml (plus --set)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from anatomical_embedding.training.config import config_file_for_run, load_run_config
    from anatomical_embedding.training.engine import Trainer

    out = Path(args.out)
    cfg = load_run_config(args.method, config_file_for_run(out, args.config, args.resume), args.overrides)
    return Trainer(cfg, args.data, out, labels=args.labels, resume=args.resume).run()


def main(argv: list[str] | None = None) -> int:
    """``python -m anatomical_embedding.cli.train ARGS`` = ``anatomical-embedding train ARGS``.

    Standalone entry (used by torchrun and the tests) with the same error handling as the main CLI.
    """
    import logging
    import sys

    parser = argparse.ArgumentParser(prog="anatomical-embedding")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from anatomical_embedding.training.runlock import RunFolderBusy

    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, RunFolderBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
