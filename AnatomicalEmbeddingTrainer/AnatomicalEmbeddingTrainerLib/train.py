#!/usr/bin/env python
"""Train a dense anatomical embedding (pretraining of any registered method) and optionally export it.

Runs unchanged in three ways::

    python AnatomicalEmbeddingTrainer/AnatomicalEmbeddingTrainerLib/train.py --method aefm --data DIR --out RUN_DIR
    torchrun --nproc_per_node N AnatomicalEmbeddingTrainer/AnatomicalEmbeddingTrainerLib/train.py ...  (DDP)
    Slicer --no-main-window --python-script .../AnatomicalEmbeddingTrainerLib/train.py ...

It lives in ``AnatomicalEmbeddingTrainerLib/`` so that Slicer does not take it for a scripted module (every
``.py`` at the top of a module folder is loaded as one: "class train was not found"). A source checkout keeps
``AnatomicalEmbeddingTrainer/train.py`` as a compatibility launcher (not installed) for the old command.

Output: the engine's JSON progress lines on stdout (see ``anatomical_embedding/training/progress.py``), plus
``{"event": "exported", "path": ...}`` after ``--export``; ``error`` events carry the messages below.
``--export-only --export MODEL.aemodel`` exports RUN_DIR as it is, without training (the Trainer's *Export
model*). Exit codes (``anatomical_embedding.training.monitor.EXIT_CODES``): 0 finished, 1 unexpected error, 2 bad input
(data, settings, output folder), 3 CUDA requested but unavailable, 4 GPU out of memory, 130 stopped by
SIGINT/SIGTERM after saving ``checkpoints/last.pt`` (continue with ``--resume``). A run folder that another live
process is training is refused with exit code 2 (the engine locks ``RUN_DIR/train.lock`` while it trains).

Finetuning is not implemented in the engine yet, so only pretraining is offered (few-shot segmentation heads
are trained with ``anatomical-embedding fewshot train``).

Inside Slicer, ``sys.exit`` from a ``--python-script`` would be taken for a script error or end the process
without Qt's shutdown; with ``--no-main-window`` this script asks Slicer to quit with the exit code
(``slicer.util.exit``); with a main window it leaves the application running and only logs the code.
"""
import time

#: When this process started, before the slow imports: a stop requested after it (the run folder's stop file, written
#: by the Trainer while torch is still being imported) is honoured, an older stop file is stale. The training monitor
#: passes its launch time (monitor.LAUNCHED_AT_ENV), which also covers a stop asked for before this interpreter ran.
_STARTED_AT = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

log = logging.getLogger("train")


def _this_file() -> Path:
    # Slicer's --python-script may not set __file__; it passes the script as sys.argv[0].
    return Path(globals().get("__file__") or sys.argv[0]).resolve()


def ensure_engine() -> None:
    """Make ``anatomical_embedding`` importable from a source checkout without pip install."""
    try:
        import anatomical_embedding  # noqa: F401  (pip-installed, or Slicer's module folder on sys.path)
        return
    except ImportError:
        pass
    here = _this_file().parent
    # installed: <modules>/AnatomicalEmbeddingTrainerLib/train.py next to <modules>/anatomical_embedding;
    # source checkout: AnatomicalEmbeddingTrainer/AnatomicalEmbeddingTrainerLib/train.py and AnatomicalEmbedding/
    for candidate in (here.parent, here.parents[1] / "AnatomicalEmbedding", here.parent / "AnatomicalEmbedding", here):
        if (candidate / "anatomical_embedding" / "__init__.py").is_file():
            sys.path.insert(0, str(candidate))
            return
    raise TrainError(1, "the anatomical_embedding engine is not installed; "
                        "run `pip install -e .` in the AnatomicalEmbedding checkout")


# ---- help text generated from the config dataclasses (so defaults never drift) ---------------------------
def _field_comments(cls) -> dict:
    """``name: type = default  # comment`` -> {name: comment} from the dataclass source (best effort)."""
    import inspect
    import re

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def settings_help(section: str, cls) -> str:
    from dataclasses import MISSING, fields

    from anatomical_embedding.training.monitor import toml_value

    comments = _field_comments(cls)
    lines = []
    for f in fields(cls):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        text = f"  {section}.{f.name}={toml_value(default)}"
        if f.name in comments:
            text = f"{text:<44} {comments[f.name]}"
        lines.append(text)
    return "\n".join(lines)


def build_epilog() -> str:
    from anatomical_embedding.methods import available_methods, get_method

    parts = ["settings (--set KEY=VALUE, values in TOML syntax; shown with their defaults, the papers' values):"]
    try:
        from anatomical_embedding.training.config import TrainConfig

        parts += ["engine [train]:", settings_help("train", TrainConfig)]
    except ImportError as exc:  # torch missing: the help still prints and says what to install
        parts += [f"engine [train]: settings not listed ({exc}; install PyTorch to train)"]
    for name in available_methods():
        try:
            config = get_method(name).Config
        except ImportError as exc:  # e.g. torch missing: the help still prints, and names what is missing
            parts += [f"method {name}: settings not listed ({exc}; install PyTorch to train)"]
            continue
        parts += [f"method {name} [config] (--set method.KEY=VALUE):", settings_help("method", config)]
    parts += ["", "exit codes: 0 finished; 1 unexpected error; 2 bad input (data, settings, output folder);",
              "  3 CUDA requested but unavailable; 4 GPU out of memory (reduce patch size or batch size);",
              "  130 stopped by SIGINT/SIGTERM after saving checkpoints/last.pt (continue with --resume).",
              "",
              "finetuning: --method finetune [--mode embedding|backbone|scratch] --init-from PRETRAINED_RUN with",
              "  labelled --data trains a segmentation network (see `anatomical-embedding finetune --help`; the",
              "  method.* keys are those of methods/finetune.py); apply it with `anatomical-embedding segment`.",
              "",
              "examples:",
              "  python train.py --method aefm --data cohort/ --out runs/a1 --export a1.aemodel",
              "  torchrun --nproc_per_node 4 train.py --method aefm --data images/ --out runs/a2 --set train.batch_size=8",
              "  python train.py --data cohort/ --out runs/a1 --resume",
              "  python train.py --out runs/a1 --export-only --export a1.aemodel   (a stopped run, no training)",
              "  python train.py --method finetune --init-from runs/a1 --data cohort/ --out runs/seg1",
              "  Slicer --no-main-window --python-script train.py --method aefm --data cohort/ --out runs/a3"]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    from anatomical_embedding.methods import available_methods, available_tasks

    p = argparse.ArgumentParser(
        prog="train.py", description="Pretrain a dense anatomical embedding method (CPU, one GPU, or torchrun/DDP) "
        "and optionally export the model package.", epilog=build_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=available_methods() + available_tasks(),
                   help="method to pretrain, or finetune (default: from --config, or the resumed run)")
    p.add_argument("--mode", choices=["embedding", "backbone", "scratch"],
                   help="finetune only: image + frozen embedding (default), pretrained encoder, or from scratch")
    p.add_argument("--init-from", metavar="RUN_DIR", help="finetune only: the pretraining run to start from")
    p.add_argument("--data", help="images folder, cohort folder (images/ + labels/) or manifest .json (required, "
                                  "except with --export-only)")
    p.add_argument("--labels", help="label maps named like their images (optional; AEFM's region stage uses them)")
    p.add_argument("--out", required=True, help="run folder (RUN_DIR); must not hold a run unless --resume")
    p.add_argument("--config", help="TOML settings: method = \"...\", [train] and [config] tables "
                                    "(e.g. Resources/configs/aefm.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable): train.KEY=VALUE or method.KEY=VALUE; see below")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="shortcut for --set train.device=... (default: auto = CUDA if available)")
    p.add_argument("--resume", action="store_true",
                   help="continue RUN_DIR from checkpoints/last.pt with its saved config.toml (plus --set)")
    p.add_argument("--export", metavar="MODEL.aemodel",
                   help="when training finishes, export the model package here (ONNX, checked against torch)")
    p.add_argument("--export-checkpoint", default="last", choices=["last", "best"],
                   help="checkpoint to export (default: last)")
    p.add_argument("--export-only", action="store_true",
                   help="do not train: export RUN_DIR's checkpoint to --export (a stopped run, or one trained "
                        "without --export); the run folder is locked meanwhile, no --data needed")
    p.add_argument("--overwrite", action="store_true",
                   help="--export may replace an existing file (it is replaced once the new package is written)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as TOML and exit without training")
    return p


# ---- errors with exit codes ---------------------------------------------------------------------------
class TrainError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _event(event: str, **fields) -> None:
    print(json.dumps({"event": event, "time": round(time.time(), 3), **fields}), flush=True)


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


#: Why a finetune run has no --export (its network is a segmenter, not an embedding).
FINETUNE_EXPORT = ("--export makes embedding model packages; a finetune run is applied with "
                   "`anatomical-embedding segment --run RUN_DIR`")


def _is_finetune_run(run_dir) -> bool:
    saved = Path(run_dir) / "config.toml"
    return saved.is_file() and 'method = "finetune"' in saved.read_text(encoding="utf-8")


def _resumes_finetune(args) -> bool:
    return bool(args.resume and _is_finetune_run(args.out))


def resolve_config(args):
    from anatomical_embedding.training.config import config_file_for_run, load_run_config

    out = Path(args.out)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"train.device={json.dumps(args.device)}")
    if args.method == "finetune" or _resumes_finetune(args):
        from anatomical_embedding.training.finetune_config import resolve_finetune_config

        return resolve_finetune_config(out, args.config, overrides, args.mode, args.init_from, args.resume,
                                       args.data, args.labels)
    if args.mode or args.init_from:
        raise ValueError("--mode and --init-from are finetune settings; add --method finetune")
    return load_run_config(args.method, config_file_for_run(out, args.config, args.resume), overrides)


def check_device(cfg) -> None:
    import torch

    want = cfg.train.device
    if want == "auto" and torch.cuda.is_available():
        want = "cuda"  # the engine picks CUDA: check there is a GPU for this rank
    if want != "cuda":
        return
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise TrainError(3, "CUDA was requested (train.device=cuda) but no CUDA GPU is available "
                            f"(PyTorch {torch.__version__} is a {build} build"
                            + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
                            + "). Use --device cpu (slow), or install a CUDA build of PyTorch and check the driver.")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise TrainError(3, f"process with LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} visible; "
                            "use at most one process per GPU (--nproc_per_node)")


def oom_message(cfg) -> str:
    import torch

    patch = getattr(cfg.method_config, "patch_size", None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    gpu = ""
    try:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f" on {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    except Exception:  # the message matters more than the GPU name
        pass
    msg = (f"GPU out of memory{gpu} with batch size {cfg.train.batch_size // max(world, 1)} per GPU"
           + (f" and patch size {list(patch)}" if patch is not None else "") + ". Reduce ")
    if patch is not None:
        from anatomical_embedding.training.monitor import toml_value

        smaller = [max(16, (int(s) * 2 // 3) // 16 * 16) for s in patch]
        msg += f"the patch size (e.g. --set method.patch_size={toml_value(smaller)}) or "
    msg += "the batch size (--set train.batch_size=...), or use more GPUs; bf16 (train.amp=bf16) also saves memory."
    return msg


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def export_package(run_dir: Path, out: Path, checkpoint: str, overwrite: bool = False) -> Path:
    from anatomical_embedding.inference.export import ParityError, export_run_checked

    try:
        path, diff = export_run_checked(run_dir, out, checkpoint=checkpoint, overwrite=overwrite)
    except ParityError as exc:  # an internal fault (exit 1), not bad input
        raise TrainError(1, str(exc)) from exc
    log.info("exported %s (ONNX vs torch max abs diff %.2e)", path, diff)
    return path


def _started_at() -> float:
    from anatomical_embedding.training.monitor import LAUNCHED_AT_ENV

    try:
        return min(_STARTED_AT, float(os.environ[LAUNCHED_AT_ENV]))
    except (KeyError, ValueError):
        return _STARTED_AT


def check_export_target(export: Path, overwrite: bool) -> None:
    if export.exists() and not overwrite:
        raise FileExistsError(f"--export: {export} exists; choose another file name, delete it or add --overwrite")


def export_only(args) -> int:
    """``--export-only``: RUN_DIR's checkpoint to a package, checked against torch; no training. The run folder's
    lock is held meanwhile, so no training process writes the checkpoint while it is read."""
    from anatomical_embedding.training.runlock import RunLock

    if not args.export:
        raise ValueError("--export-only needs --export MODEL.aemodel")
    run_dir, export = Path(args.out), Path(args.export)
    if args.resume or args.method:
        raise ValueError("--export-only exports the run folder as it is; leave out --method and --resume")
    if not (run_dir / "config.toml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run folder (no config.toml)")
    if _is_finetune_run(run_dir):
        raise ValueError(FINETUNE_EXPORT)
    check_export_target(export, args.overwrite)
    with RunLock(run_dir):
        path = export_package(run_dir, export, args.export_checkpoint, overwrite=args.overwrite)
    _event("exported", path=str(path))
    return 0


def run(args) -> int:
    if args.export_only:
        return export_only(args)
    from anatomical_embedding.training.engine import Trainer

    cfg = resolve_config(args)
    if args.print_config:
        import tomli_w

        print(tomli_w.dumps(cfg.to_dict()), end="")
        return 0
    export = Path(args.export) if args.export else None
    if export is not None and cfg.method == "finetune":
        raise ValueError(FINETUNE_EXPORT)
    if export is not None:
        # Checked before training so that hours of training do not end in a refused export.
        check_export_target(export, args.overwrite)
    check_device(cfg)
    # The Trainer locks the run folder (rank 0) against a second training process; kept through the export.
    trainer = Trainer(cfg, args.data, args.out, labels=args.labels, resume=args.resume, started_at=_started_at(),
                      keep_run_lock=True)
    try:
        try:
            code = trainer.run()
        except Exception as exc:
            if _is_oom(exc):
                raise TrainError(4, oom_message(cfg)) from exc
            raise
        if code == 0 and export is not None and _is_main_rank():
            path = export_package(Path(args.out), export, args.export_checkpoint, overwrite=args.overwrite)
            _event("exported", path=str(path))
    finally:
        trainer.release_run_lock()
    return code


def main(argv=None) -> int:
    ensure_engine()
    from anatomical_embedding.training.runlock import RunFolderBusy

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.data and not args.export_only:
        parser.error("the following arguments are required: --data")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(run(args) or 0)
    except TrainError as exc:
        code, message = exc.code, str(exc)
    except (FileNotFoundError, FileExistsError, ValueError, RunFolderBusy) as exc:
        code, message = 2, str(exc)
    except KeyboardInterrupt:
        code, message = 130, "interrupted"
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message and exit code 1
        import traceback

        traceback.print_exc()
        code, message = 1, f"{type(exc).__name__}: {exc}"
    if _is_main_rank():
        _event("error", message=message, exit_code=code)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def safe_main(argv=None) -> int:
    """:func:`main` that always returns an exit code: errors before training (engine or torch missing while the
    help is built, bad arguments) included. Inside Slicer an exception escaping the script would leave a
    ``--no-main-window`` Slicer running forever; here every path reaches :func:`_exit`."""
    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help (0) and bad arguments (2)
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:  # noqa: BLE001 - e.g. ImportError raised before main's own handler
        code = exc.code if isinstance(exc, TrainError) else 130 if isinstance(exc, KeyboardInterrupt) else 1
        message = str(exc) if isinstance(exc, TrainError) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ImportError):
            message += " (install the training dependencies: the Trainer module offers it, or pip install torch)"
        try:
            _event("error", message=message, exit_code=code)
        except Exception:  # noqa: BLE001 - nothing may stop the exit
            pass
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


def _exit(code: int) -> None:
    slicer = sys.modules.get("slicer")
    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "commandOptions"):  # running inside the Slicer application
        if app.commandOptions().noMainWindow:
            slicer.util.exit(code)  # quit the (windowless) application with this code
        else:
            log.info("train.py finished with exit code %d (Slicer stays open)", code)
        return
    sys.exit(code)


if __name__ == "__main__":
    _exit(safe_main())
