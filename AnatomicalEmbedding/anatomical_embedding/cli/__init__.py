"""The ``anatomical-embedding`` command line: ``main`` dispatches to one module per command group."""
from anatomical_embedding.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
