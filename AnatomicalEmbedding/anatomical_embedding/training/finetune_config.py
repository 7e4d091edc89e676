"""The run configuration of a finetune run: engine defaults, class names read from the label files, and
``--mode``/``--init-from``/``--resume`` resolved in one place (``finetune``, ``train.py``, the demo)."""
from __future__ import annotations

import json
from pathlib import Path

from anatomical_embedding.training.config import RunConfig, config_file_for_run, load_run_config

#: Engine settings of a finetune run when no --config file is given (the AEFM downstream recipe:
#: Adam at lr 1e-4, constant; best.pt by validation Dice). Resources/configs/finetune.toml holds the same.
FINETUNE_TRAIN_DEFAULTS: tuple[str, ...] = (
    "train.optimizer=\"adam\"", "train.lr=1e-4", "train.weight_decay=0.0", "train.lr_schedule=\"constant\"",
    "train.best_metric=\"val_dice_error\"", "train.ckpt_every=250", "train.batch_size=2",
)


def _label_names(path: Path) -> dict[int, str]:
    """Segment names of a label file without reading voxels where possible (sidecar / label_names.json)."""
    from anatomical_embedding.io.labelmaps import SEG_SUFFIX, read_labelmap, sidecar_path

    if path.name.lower().endswith(SEG_SUFFIX):
        return read_labelmap(path)[1]
    for candidate in (sidecar_path(path), path.parent / "label_names.json"):
        if candidate.is_file():
            return {int(k): str(v) for k, v in json.loads(candidate.read_text(encoding="utf-8")).items() if int(k) != 0}
    return {}


def class_names_from_labels(data: str, labels: str | None) -> tuple[str, ...]:
    """``("background", name of value 1, ...)`` from the label files' names (gaps as ``label_N``)."""
    from anatomical_embedding.data.datasets import DatasetSpec

    spec = DatasetSpec.from_path(data, labels)
    names: dict[int, str] = {}
    for case in spec.labelled:
        for value, name in _label_names(case.label).items():
            if names.setdefault(value, name) != name:
                raise ValueError(f"label value {value} is {names[value]!r} in one case and {name!r} in "
                                 f"{case.label}; make the segment names agree")
    if not names:
        return ()
    top = max(names)
    return ("background",) + tuple(names.get(v, f"label_{v}") for v in range(1, top + 1))


def resolve_finetune_config(out: str | Path, config_file: str | None, overrides: list[str], mode: str | None,
                            init_from: str | None, resume: bool, data: str, labels: str | None) -> RunConfig:
    """The finetune RunConfig of ``finetune`` and ``train.py --method finetune`` (one place for both)."""
    overrides = list(overrides)
    if resume:
        if mode or init_from:
            raise ValueError("--resume uses the run's own config.toml; drop --mode/--init-from")
        config_file = config_file_for_run(out, config_file, resume)
    else:
        if not config_file:
            overrides = list(FINETUNE_TRAIN_DEFAULTS) + overrides
        if mode:
            overrides.append(f"method.mode=\"{mode}\"")
        if init_from:
            overrides.append(f"method.init_from='{Path(init_from).resolve()}'")
    cfg = load_run_config("finetune", config_file, overrides)
    if cfg.method != "finetune":
        raise ValueError(f"{config_file} configures method {cfg.method!r}; finetune needs method = \"finetune\"")
    if not resume and not cfg.method_config.class_names:
        cfg.method_config.class_names = class_names_from_labels(data, labels)
    return cfg
