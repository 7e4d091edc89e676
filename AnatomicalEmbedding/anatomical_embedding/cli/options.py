"""Options shared by several sub-commands, spelled the same everywhere."""
from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

#: The one spelling of each backend; ``onnx`` is accepted (with a warning) because fewshot used to take it.
BACKENDS = ("auto", "onnxruntime", "torch")
BACKEND_ALIASES = {"onnx": "onnxruntime"}


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=[*BACKENDS, *BACKEND_ALIASES],
                   help="auto (package: onnxruntime, run folder: torch), onnxruntime or torch")


def backend_name(value: str) -> str:
    """The canonical backend name; an alias gives a warning naming the canonical spelling."""
    if value in BACKEND_ALIASES:
        canonical = BACKEND_ALIASES[value]
        log.warning("--backend %s is spelled --backend %s; accepted for now", value, canonical)
        return canonical
    return value
