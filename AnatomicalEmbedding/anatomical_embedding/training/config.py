"""Run configuration: engine settings (``[train]``) plus the method's dataclass (``[method]``).

TOML layout (``RUN_DIR/config.toml`` is written in the same layout for every run)::

    method = "aefm"
    [train]            # TrainConfig (engine)
    batch_size = 2
    [config]           # the method's Config dataclass (``method`` is taken by the name)
    patch_size = [96, 96, 96]

``--set key=value`` overrides use dotted keys (``train.lr=3e-4``, ``method.n_pos=500`` or
``config.n_pos=500``); the value is
parsed as TOML when possible and converted to the dataclass field's type.
"""
from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anatomical_embedding.io.settings import ranged
from anatomical_embedding.methods.runs import build_dataclass, plain_config

ENGINE_VERSION = "0.1.0"


@dataclass
class TrainConfig:
    seed: int = ranged(0, 0)
    batch_size: int = ranged(2, 1)  # global batch (patch pairs per step), split evenly over DDP ranks
    epochs: int = ranged(0, 0)  # 0: the method's default (AEFM: 500 + 200)
    max_steps: int = ranged(0, 0)  # > 0 overrides epochs; 0 = use epochs (negative is refused)
    # Wall-clock budget of this run in seconds, set-up included: the step under way finishes, a checkpoint is saved
    # and the run ends as a stop (exit 130; --resume continues, with its own budget). 0 = no limit.
    max_seconds: float = ranged(0.0, 0.0)
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = ranged(1e-4, 0.0)
    weight_decay: float = ranged(1e-5, 0.0)
    warmup_steps: int = ranged(0, 0)
    lr_schedule: str = "cosine"  # cosine | constant | poly (nnU-Net: (1 - t) ** 0.9)
    sgd_momentum: float = ranged(0.9, 0.0, 1.0)  # SGD only (nnU-Net, AnatoMask's finetuning: 0.99 with Nesterov)
    sgd_nesterov: bool = False
    grad_clip: float = ranged(0.0, 0.0)  # max grad norm; 0 = off
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU) | bf16 | fp16 | none
    compile: bool = False
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = ranged(2, 0)
    cache_dir: str = ""  # preprocessed-data cache; "" = RUN_DIR/cache
    memory_cache: int = ranged(4, 0)  # preprocessed cases kept in memory per worker
    log_every: int = ranged(10, 1)
    ckpt_every: int = ranged(500, 1)
    keep_last: int = ranged(3, 1)
    best_metric: str = "loss"  # a logged term (lower is better)
    deterministic: bool = False
    threads: int = ranged(0, 0)  # torch CPU threads per process; 0 = torch default
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class RunConfig:
    method: str
    train: TrainConfig
    method_config: Any

    def to_dict(self) -> dict:
        """Plain containers only (stored in checkpoints, loadable with ``weights_only=True``)."""
        return {"method": self.method, "train": asdict(self.train), "config": plain_config(self.method_config)}


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def config_file_for_run(out: str | Path, config_file: str | Path | None, resume: bool) -> str | Path | None:
    """The settings file of a new run (``config_file``) or, with ``resume``, the run's own saved one."""
    if not resume:
        return config_file
    saved = Path(out) / "config.toml"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: {saved} not found; is {out} a run folder?")
    if config_file:
        raise ValueError("--resume uses the run's own config.toml; drop --config (use --set to change settings)")
    return saved


def load_run_config(method: str | None, config_file: str | Path | None = None,
                    overrides: list[str] | None = None) -> RunConfig:
    """Method defaults, then the TOML file, then ``--set`` overrides."""
    from anatomical_embedding.methods import get_method

    data: dict = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - {"method", "train", "config"})
    if unknown:
        raise ValueError(f"unknown top-level key(s) {unknown} in config; expected method, [train], [config]")
    name = method or data.get("method")
    if not name:
        raise ValueError("no method given; pass --method or set method = \"...\" in the config file")
    if method and data.get("method") and data["method"] != method:
        raise ValueError(f"--method {method} contradicts method = {data['method']!r} in {config_file}")
    train = dict(data.get("train", {}))
    mcfg = dict(data.get("config", {}))
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        section, _, field = key.strip().partition(".")
        if section == "train" and field:
            train[field] = _parse_value(text.strip())
        elif section in ("config", "method") and field:
            mcfg[field] = _parse_value(text.strip())
        else:
            raise ValueError(f"--set key {key!r} must start with 'train.' or 'method.' (e.g. train.lr=1e-4)")
    cls = get_method(name)
    return RunConfig(name, build_dataclass(TrainConfig, train, "train"), build_dataclass(cls.Config, mcfg, "method"))


def run_config_from_dict(data: dict) -> RunConfig:
    from anatomical_embedding.methods import get_method

    cls = get_method(data["method"])
    return RunConfig(data["method"], build_dataclass(TrainConfig, data.get("train", {}), "train"),
                     build_dataclass(cls.Config, data.get("config", {}), "method"))


def save_run_config(cfg: RunConfig, path: Path) -> None:
    import tomli_w

    from anatomical_embedding.io import atomic_write

    blob = tomli_w.dumps(cfg.to_dict())
    atomic_write(Path(path), lambda p: Path(p).write_text(blob, encoding="utf-8"), overwrite=True)


def read_run_config(path: Path) -> RunConfig:
    return run_config_from_dict(tomllib.loads(Path(path).read_text(encoding="utf-8")))


__all__ = ["TrainConfig", "RunConfig", "load_run_config", "save_run_config", "read_run_config",
           "run_config_from_dict", "ENGINE_VERSION"]
