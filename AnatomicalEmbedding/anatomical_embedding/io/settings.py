"""Numeric settings with declared ranges: dataclass fields say what they accept, loaders check it.

``ranged(default, lo, hi)`` is a ``dataclasses.field`` whose metadata holds the closed range [lo, hi]
(``None``: unbounded). ``check_ranges(obj, section)`` raises one ValueError naming the setting, its value
and the valid range, so a bad ``--set train.batch_size=0`` stops before any work instead of dividing by
zero an hour later. ``in_range`` checks a single command-line argument the same way.
"""
from __future__ import annotations

import math
from dataclasses import field, fields
from typing import Any


def ranged(default: Any, lo: float | None = None, hi: float | None = None, **kwargs: Any) -> Any:
    """A dataclass field whose numeric value (or each element of a tuple value) must lie in [lo, hi]."""
    return field(default=default, metadata={"range": (lo, hi)}, **kwargs)


def describe_range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo} to {hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}" if hi is not None else "any number"


def in_range(value: float, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` if it is finite and in [lo, hi], else ValueError naming ``name`` and the valid range."""
    bad = isinstance(value, float) and not math.isfinite(value)
    bad = bad or (lo is not None and value < lo) or (hi is not None and value > hi)
    if bad:
        raise ValueError(f"{name}={value} is out of range; valid: {describe_range(lo, hi)}")
    return value


def check_ranges(obj: Any, section: str) -> Any:
    """Check every ``ranged`` field of dataclass instance ``obj``; returns ``obj``."""
    for f in fields(obj):
        rng = f.metadata.get("range")
        if rng is None:
            continue
        value = getattr(obj, f.name)
        for v in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                in_range(v, f"{section}.{f.name}" if section else f.name, *rng)
    return obj


__all__ = ["ranged", "in_range", "check_ranges", "describe_range"]
