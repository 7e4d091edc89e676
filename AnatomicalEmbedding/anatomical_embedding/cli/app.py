"""``anatomical-embedding`` command line: one sub-command per engine feature.

Each feature module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). The list below
is the only place that knows all of them; imports happen lazily so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

#: Modules (relative to this package) that contribute sub-commands, in help order.
COMMAND_MODULES: tuple[str, ...] = (
    "anatomical_embedding.cli.phantoms",
    "anatomical_embedding.cli.fewshot",
    "anatomical_embedding.cli.embed",
    "anatomical_embedding.cli.import_model",
    "anatomical_embedding.cli.demo",
    "anatomical_embedding.cli.train",
    "anatomical_embedding.cli.finetune",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anatomical-embedding",
        description="Dense anatomical embeddings: phantoms, training, embedding, matching, few-shot, export.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from anatomical_embedding.training.runlock import RunFolderBusy

    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, RunFolderBusy) as exc:
        # Bad input: one clear line, no traceback (use -v for the traceback).
        logging.getLogger("anatomical_embedding").debug("error", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
