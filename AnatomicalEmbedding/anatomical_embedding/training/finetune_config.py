"""The run configuration of a finetune run: engine defaults, class names read from the label files, and
``--mode``/``--init-from``/``--resume`` resolved in one place (``finetune``, ``train.py``, the demo)."""
from __future__ import annotations

import json
from pathlib import Path

import logging

from anatomical_embedding.training.config import RunConfig, config_file_for_run, load_run_config

log = logging.getLogger(__name__)

#: Engine settings of a finetune run when no --config file is given (the AEFM downstream recipe:
#: Adam at lr 1e-4, constant; best.pt by validation Dice). Resources/configs/finetune.toml holds the same.
#: A backbone run adds its source method's recipe (FINETUNE_RECIPES) on top.
FINETUNE_TRAIN_DEFAULTS: tuple[str, ...] = (
    "train.optimizer=\"adam\"", "train.lr=1e-4", "train.weight_decay=0.0", "train.lr_schedule=\"constant\"",
    "train.best_metric=\"val_dice_error\"", "train.ckpt_every=250", "train.batch_size=2",
)


#: Each method's own finetuning recipe (``--mode backbone`` from a run of that method), on top of
#: FINETUNE_TRAIN_DEFAULTS, where its paper states one. ``--set`` still overrides every entry.
FINETUNE_RECIPES: dict[str, tuple[str, ...]] = {
    # AEFM (its downstream network, the embedding mode, and its backbone): FINETUNE_TRAIN_DEFAULTS as they are.
    "aefm": (),
    # HDSSL §4: 45K steps, batch 7, Adam at 3e-4 (the freeze-then-ramp schedule is FinetuneConfig's -1 default).
    "hdssl": ("train.optimizer=\"adam\"", "train.lr=3e-4", "train.batch_size=7", "train.max_steps=45000"),
    # Adam/Eve supplementary F.2 (segmentation): AdamW at 2e-4 with cosine decay, early stopping on 10 % of
    # the training data. Augmentation: the paper's random gamma and brightness-contrast are stood in for by
    # the intensity jitter (contrast x(1 +- 0.2), offset +- 0.1); its elastic, optical and grid distortions
    # are not implemented (deviation). The weight decay (0.05) is the paper's classification recipe; the
    # segmentation batch size is not stated: 8, because ResNetUNet uses BatchNorm and batch 2 gives noisy
    # statistics (our choice; see the warning below).
    "adam": ("train.optimizer=\"adamw\"", "train.lr=2e-4", "train.weight_decay=0.05",
             "train.lr_schedule=\"cosine\"", "train.batch_size=8", "method.val_fraction=0.1",
             "method.aug_scale=0.2", "method.aug_shift=0.1"),
    # AnatoMask §4 finetunes with nnU-Net 2.2 defaults: SGD (Nesterov, momentum 0.99) at 1e-2, poly decay,
    # weight decay 3e-5, batch 2. nnU-Net's spatial augmentations are not implemented (deviation); the
    # intensity jitter stands in for its brightness/contrast transforms.
    "anatomask": ("train.optimizer=\"sgd\"", "train.lr=1e-2", "train.sgd_momentum=0.99", "train.sgd_nesterov=true",
                  "train.weight_decay=3e-5", "train.lr_schedule=\"poly\"", "train.batch_size=2",
                  "method.aug_scale=0.25", "method.aug_shift=0.1"),
}

#: Source methods whose finetune backbone uses BatchNorm (statistics from ``batch_size`` patches per step).
BATCHNORM_BACKBONES = ("adam", "hdssl")


def recipe_for(mode: str | None, init_from: str | None) -> tuple[str, ...]:
    """The finetune recipe's overrides: the source method's for ``backbone``; AEFM's downstream one otherwise."""
    if (mode or "embedding") != "backbone" or not init_from:
        return ()
    cfg_path = Path(init_from) / "config.toml"
    if not cfg_path.is_file():
        return ()  # read_source reports the missing run
    from anatomical_embedding.methods.runs import read_method_run

    return FINETUNE_RECIPES.get(read_method_run(cfg_path)[0], ())


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
            overrides = list(FINETUNE_TRAIN_DEFAULTS) + list(recipe_for(mode, init_from)) + overrides
        if mode:
            overrides.append(f"method.mode=\"{mode}\"")
        if init_from:
            overrides.append(f"method.init_from='{Path(init_from).resolve()}'")
    cfg = load_run_config("finetune", config_file, overrides)
    if cfg.method != "finetune":
        raise ValueError(f"{config_file} configures method {cfg.method!r}; finetune needs method = \"finetune\"")
    if not resume and not cfg.method_config.class_names:
        cfg.method_config.class_names = class_names_from_labels(data, labels)
    source = cfg.method_config.source_method or _source_name(cfg.method_config.init_from)
    if cfg.method_config.mode == "backbone" and source in BATCHNORM_BACKBONES and cfg.train.batch_size < 4:
        log.warning("finetune: the %s backbone uses BatchNorm and train.batch_size is %d: its statistics come from "
                    "%d patches per step (a deviation from the paper's batches); use --set train.batch_size=8 or more",
                    source, cfg.train.batch_size, cfg.train.batch_size)
    return cfg


def _source_name(init_from: str) -> str:
    path = Path(init_from) / "config.toml" if init_from else None
    if path is None or not path.is_file():
        return ""
    from anatomical_embedding.methods.runs import read_method_run

    return read_method_run(path)[0]
