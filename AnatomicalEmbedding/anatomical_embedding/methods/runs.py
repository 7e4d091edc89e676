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
    return cls(**{k: _convert(v, hints[k], f"{section}.{k}") for k, v in values.items()})


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


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def build_method(method_name: str, config_dict: dict):
    """A method instance from its name and ``[config]`` dict (as saved in ``config.toml``)."""
    cls = get_method(method_name)
    return cls(build_dataclass(cls.Config, dict(config_dict), "method"))


def build_embedder(method_name: str, config_dict: dict):
    """The (untrained) embedder a method would produce with this configuration."""
    return build_method(method_name, config_dict).embedder()
