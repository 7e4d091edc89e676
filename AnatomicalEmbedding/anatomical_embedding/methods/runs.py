"""Reading a training run folder: its method and ``[config]`` section, and its checkpoints.

These live with the methods, below ``training``, because methods load earlier runs themselves (finetuning
reads its pretrained source, a later Adam/Eve stage its previous stage); ``training`` builds on them.
"""
from __future__ import annotations

import tomllib
import typing
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from anatomical_embedding.io.settings import check_ranges
from anatomical_embedding.methods import get_method


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a TOML/CLI value to a dataclass field type (ValueError with the field name)."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError(value)
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin is tuple:
            args = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.strip("[]()").split(",") if v.strip()]
            items = list(value)
            if args and args[-1] is not Ellipsis and len(items) != len(args):
                raise ValueError(f"needs {len(args)} values")
            types = [args[0]] * len(items) if (args and args[-1] is Ellipsis) else list(args)
            return tuple(_convert(v, t, name) for v, t in zip(items, types))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid value {value!r} for {name} (expected {getattr(tp, '__name__', tp)}): {exc}") from None
    return value


def build_dataclass(cls: type, values: dict, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(section + '.' + u for u in unknown)}; "
                         f"valid: {', '.join(sorted(known))}")
    obj = cls(**{k: _convert(v, hints[k], f"{section}.{k}") for k, v in values.items()})
    return check_ranges(obj, section)  # fields declared with io.settings.ranged


def plain_config(config: Any) -> dict:
    """A method's config dataclass as plain containers (the ``[config]`` table of ``config.toml``)."""
    return _plain(asdict(config))


def read_method_run(path: str | Path) -> tuple[str, Any]:
    """``(method name, its config dataclass)`` from a run's ``config.toml``."""
    data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    name = data["method"]
    return name, build_dataclass(get_method(name).Config, data.get("config", {}), "method")


def resolve_checkpoint(run_dir: str | Path, checkpoint: str = "last") -> Path:
    """``"last"``, ``"best"``, a step number, or a file path -> the checkpoint file."""
    run_dir = Path(run_dir)
    cand = Path(checkpoint)
    if cand.suffix == ".pt" and cand.is_file():
        return cand
    name = f"step_{int(checkpoint):08d}.pt" if str(checkpoint).isdigit() else f"{checkpoint}.pt"
    path = run_dir / "checkpoints" / name
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}; is {run_dir} a training run folder (RUN_DIR)?")
    return path


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be read (truncated by a kill or a full disk, or damaged)."""


def _step_files(folder: Path) -> list[Path]:
    """``step_*.pt`` in ``folder``, newest first."""
    return sorted((p for p in folder.glob("step_*.pt") if p.name[5:-3].isdigit()), reverse=True)


def _read_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # zip/pickle/EOF errors: torch gives no single type for a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptCheckpoint(f"checkpoint {path} is unreadable (truncated or damaged: {first[:120]})") from exc
    if not isinstance(ck, dict) or "model" not in ck or "step" not in ck:
        raise CorruptCheckpoint(f"checkpoint {path} is not a training checkpoint (no model/step)")
    return ck


def newest_intact_checkpoint(folder: Path, exclude: Path | None = None) -> tuple[Path, dict] | None:
    """The newest readable ``step_*.pt`` (then ``last.pt``, ``best.pt``) in ``folder`` and its content."""
    folder = Path(folder)
    for p in [*_step_files(folder), folder / "last.pt", folder / "best.pt"]:
        if not p.is_file() or (exclude is not None and p.resolve() == Path(exclude).resolve()):
            continue
        try:
            return p, _read_checkpoint(p)
        except CorruptCheckpoint:
            continue
    return None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint's content; a damaged file raises CorruptCheckpoint (a ValueError: CLI exit 2) naming
    the newest intact checkpoint of the same folder, so the message says what to use instead."""
    path = Path(path)
    try:
        return _read_checkpoint(path, map_location)
    except CorruptCheckpoint as exc:
        intact = newest_intact_checkpoint(path.parent, exclude=path)
        hint = (f"; the newest intact checkpoint is {intact[0]} (step {int(intact[1]['step'])}): "
                f"pass --checkpoint {int(intact[1]['step'])}" if intact else "; no intact checkpoint is left")
        raise CorruptCheckpoint(f"{exc}{hint}") from exc.__cause__


def load_resume_checkpoint(folder: Path) -> tuple[Path, dict]:
    """``(path, content)`` to resume from: ``last.pt``, or when it is damaged the newest intact checkpoint
    with a warning naming both (resuming from an older step is still exact: the sample stream is
    indexed by step)."""
    import logging

    last = Path(folder) / "last.pt"
    try:
        if not last.is_file():  # killed between the first step_*.pt and its copy to last.pt
            raise CorruptCheckpoint(f"checkpoint {last} is missing")
        return last, _read_checkpoint(last)
    except CorruptCheckpoint as exc:
        intact = newest_intact_checkpoint(Path(folder), exclude=last)
        if intact is None:
            raise CorruptCheckpoint(f"--resume: {exc}, and no intact checkpoint is left in {folder}; "
                                    f"start a new run") from exc.__cause__
        logging.getLogger(__name__).warning("%s; resuming from %s (step %d) instead", exc, intact[0],
                                            int(intact[1]["step"]))
        return intact


def build_method(method_name: str, config_dict: dict):
    """A method instance from its name and ``[config]`` dict (as saved in ``config.toml``)."""
    cls = get_method(method_name)
    return cls(build_dataclass(cls.Config, dict(config_dict), "method"))


def build_embedder(method_name: str, config_dict: dict):
    """The (untrained) embedder a method would produce with this configuration."""
    return build_method(method_name, config_dict).embedder()
