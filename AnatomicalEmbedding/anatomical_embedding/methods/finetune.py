"""Full finetuning for segmentation, run by the training engine (``anatomical-embedding finetune``).

Three modes (``mode``), one supervised task:

* ``embedding`` (AEFM's downstream network): a MONAI 3D U-Net whose input is the image plus the *frozen*
  embedding of a pretrained model (``init_from``): the coarse map (trilinearly up-sampled) and the fine map
  concatenated to the image as extra channels. The embedding net is a sub-module without gradients, kept in
  eval mode, and saved in the checkpoints, so a finetune run is self-contained.
* ``backbone``: the pretrained network itself, finetuned as the encoder of a segmentation network built by
  its method's entry in :mod:`.backbones` (AEFM: U-Net + M_S head; HDSSL: FPN + FPN head).
* ``scratch``: the same MONAI U-Net on the image alone, randomly initialised (the baseline).

Samples: one labelled patch per sample. With probability ``foreground_fraction`` the patch is centred on a
voxel of a foreground class drawn uniformly among the classes present in the case (class-balanced
foreground sampling, as MONAI's ``RandCropByLabelClasses``), otherwise anywhere. Loss: MONAI ``DiceCELoss``
(softmax, one-hot labels). Validation: the labelled cases are split once (``val_fraction``, seeded); the
training stream never draws validation cases (``case_weights``), and every ``val_every`` steps the engine
calls :meth:`FinetuneMethod.evaluate`: MONAI ``sliding_window_inference`` over each validation case, Dice per
foreground class (MONAI ``DiceMetric``), logged as ``val_dice`` and ``val_dice_error`` (= 1 - Dice, the
default ``train.best_metric`` of finetune runs, so ``best.pt`` is the best validated model).

2D pretrained models (Adam/Eve ``dims = 2``, the paper's radiographs; :meth:`FinetuneMethod.source_is_2d`
asks the source method's ``accepts_2d``): backbone mode only, on single-slice images. The flat axis is moved to
k, patches are ``(i, j, 1)`` (``patch_size`` with k = 1; the default becomes the pretrained input size), and
validation and ``segment`` use 2D sliding windows on the slice.

Preprocessing: the pretrained model's spacing and intensity preset unless ``spacing``/``preset`` are set
(scratch without ``init_from``: 1 mm and ``ct_aefm``). ``class_names`` (index = label value) are written
by the CLI from the label files and used by :func:`segment_volume` for the output segment names.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anatomical_embedding.io.settings import ranged
from anatomical_embedding.methods.base import DataInfo, Method, StepContext

log = logging.getLogger(__name__)

MODES = ("embedding", "backbone", "scratch")


@dataclass
class FinetuneConfig:
    mode: str = "embedding"  # embedding (frozen embedding + U-Net) | backbone | scratch
    init_from: str = ""  # pretrained training run folder (embedding/backbone; scratch: optional, for preprocessing)
    init_checkpoint: str = "last"  # checkpoint of init_from: last | best | step number
    spacing: tuple[float, ...] = ranged((), 1e-06)  # mm along (i, j, k); () = the pretrained model's (scratch: 1 mm)
    preset: str = ""  # intensity preset name; "" = the pretrained model's (scratch: ct_aefm)
    patch_size: tuple[int, int, int] = ranged((96, 96, 96), 1)  # voxels along (i, j, k); multiples of 16 (2D source: k = 1)
    num_classes: int = ranged(0, 0)  # 0 = max label value + 1
    class_names: tuple[str, ...] = ()  # name of each label value (index 0 = background); set by the CLI
    foreground_fraction: float = ranged(0.67, 0.0, 1.0)  # share of patches centred on a foreground class
    unet_channels: tuple[int, ...] = ranged((32, 64, 128, 256, 320), 1)  # downstream U-Net widths (embedding, scratch)
    unet_res_units: int = ranged(2, 0)
    head_hidden: int = ranged(64, 1)  # hidden width of the backbone mode's segmentation head
    val_fraction: float = ranged(0.2, 0.0, 1.0)  # share of labelled cases held out for validation (at least 1 if >= 2 cases)
    val_every: int = ranged(250, 0)  # steps between validations (and at the end); 0 = never
    split_seed: int = 0
    sw_overlap: float = ranged(0.5, 0.0, 0.99)  # sliding-window overlap (validation and segment)
    sw_batch_size: int = ranged(2, 1)
    aug_scale: float = ranged(0.0, 0)  # intensity jitter per patch (off by default)
    aug_shift: float = ranged(0.0, 0)
    aug_noise: float = ranged(0.0, 0)
    # Backbone mode: the pretrained layers stay frozen for backbone_freeze_steps, then their learning rate rises
    # exponentially from backbone_ramp_start x lr to lr over backbone_ramp_steps (HDSSL's finetuning: 15K frozen
    # steps, then 3e-5 -> 3e-4 over 1,200 steps). -1 = the source method's paper schedule (HDSSL), else none.
    backbone_freeze_steps: int = ranged(-1, -1)
    backbone_ramp_steps: int = ranged(-1, -1)
    backbone_ramp_start: float = ranged(0.1, 0.0, 1.0)
    # Filled from init_from when the run starts, so the run is self-describing (apply needs no init_from).
    source_method: str = ""
    source_config: dict = field(default_factory=dict)
    source_info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- pretrained source
def read_source(path: str | Path, checkpoint: str = "last") -> tuple[str, dict, dict, dict]:
    """``(method name, [config] dict, model_info, method state_dict)`` of a pretrained training run folder."""
    from anatomical_embedding.methods.runs import load_checkpoint, plain_config, read_method_run, resolve_checkpoint

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"init_from {p} does not exist; pass a pretraining run folder (RUN_DIR)")
    if p.is_file():
        raise ValueError(f"init_from {p} is a file; finetuning needs the pretraining run folder (its torch "
                         "weights): an exported .aemodel package holds ONNX only")
    if not (p / "config.toml").is_file():
        raise FileNotFoundError(f"{p / 'config.toml'} not found; init_from must be a pretraining run folder")
    method_name, method_config = read_method_run(p / "config.toml")
    if method_name == FinetuneMethod.name:
        raise ValueError(f"init_from {p} is a finetune run, not a pretrained embedding model; "
                         "pass the run folder of its pretraining (e.g. an AEFM or HDSSL run)")
    ck = load_checkpoint(resolve_checkpoint(p, checkpoint))
    info = dict(ck.get("model_info") or {})
    return method_name, plain_config(method_config), info, ck["model"]


def _load_state(module: nn.Module, state: dict, what: str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ValueError(f"{what} does not match its configuration ({first}...); the checkpoint and the "
                         "run's config.toml disagree: was the run folder edited or mixed with another run?") from None


def _preset_value(preset: str) -> str | dict:
    return json.loads(preset) if preset.strip().startswith("{") else preset


def _preset_text(preset: str | dict) -> str:
    """A preset for the config file: its registered name when it is one, else its JSON."""
    from anatomical_embedding.io import PRESETS

    if isinstance(preset, str):
        return preset
    name = preset.get("name")
    if name in PRESETS and PRESETS[name].to_dict() == preset:
        return name
    return json.dumps(preset, sort_keys=True)


def _require_multiple(size: Sequence[int], multiple: int, what: str, is_2d: bool = False) -> None:
    if is_2d:  # (i, j, 1): the slice axis is not convolved
        if int(size[2]) != 1 or any(int(s) % multiple for s in size[:2]):
            raise ValueError(f"finetune patch_size {list(size)} of a 2D pretrained model must be (i, j, 1) with i, j "
                             f"multiples of {multiple} ({what}); e.g. --set method.patch_size="
                             f"[{multiple * 4},{multiple * 4},1]")
        return
    if any(int(s) % multiple for s in size):
        raise ValueError(f"finetune patch_size {list(size)} must be multiples of {multiple} ({what}); "
                         f"e.g. --set method.patch_size=[{multiple * 4},{multiple * 4},{multiple * 4}]")


def _slice_axis(shape: Sequence[int], what: str) -> int:
    """The flat axis of a single-slice volume (k, j, i), preferring k; ValueError for a volume."""
    flat = [a for a, s in enumerate(shape) if int(s) == 1]
    if not flat:
        raise ValueError(f"{what} is a volume of {tuple(int(s) for s in shape)} voxels but the pretrained model is 2D "
                         "(Adam/Eve dims=2): finetune and segment it on single-slice images, or pretrain with "
                         "method.dims=3")
    return 0 if 0 in flat else flat[0]


#: Paper schedules of the backbone mode: method -> (frozen steps, ramp steps, lr factor at the ramp's start).
PAPER_BACKBONE_SCHEDULES: dict[str, tuple[int, int, float]] = {"hdssl": (15000, 1200, 0.1)}


def backbone_lr_factor(step: int, freeze: int, ramp: int, start: float) -> float:
    """0 while frozen, then ``start ** (1 - t)`` for t in [0, 1) along the ramp (exponential), then 1."""
    if step < freeze:
        return 0.0
    if ramp > 0 and step < freeze + ramp:
        return float(start ** (1.0 - (step - freeze) / ramp))
    return 1.0


def pretrained_parameter_names(network: nn.Module, source: nn.Module) -> set[str]:
    """Names (in ``network.named_parameters()``) of the parameters that come from the pretrained ``source``:
    the network's own list when it keeps one (weights copied into new modules), else the parameters it shares
    with ``source`` (modules taken over)."""
    own = getattr(network, "pretrained_parameter_names", None)
    if own is not None:
        return set(own)
    shared = {id(p) for p in source.parameters()}
    return {n for n, p in network.named_parameters() if id(p) in shared}


class _BackboneFactor:
    def __init__(self, freeze: int, ramp: int, start: float) -> None:
        self.freeze, self.ramp, self.start = freeze, ramp, start

    def __call__(self, step: int) -> float:
        return backbone_lr_factor(step, self.freeze, self.ramp, self.start)


# -------------------------------------------------------------------------------------------- the task
class FinetuneMethod(Method):
    """Supervised segmentation as an engine method (see the module docstring)."""

    name = "finetune"
    Config = FinetuneConfig

    def __init__(self, config: FinetuneConfig, load_pretrained: bool = True) -> None:
        super().__init__(config)
        c = config
        if c.mode not in MODES:
            raise ValueError(f"finetune mode must be one of {', '.join(MODES)}, got {c.mode!r}")
        if c.num_classes < 2:
            raise ValueError("finetune needs num_classes >= 2 (background + at least one structure); it is "
                             "set from the label maps, so give labelled cases (--labels or a manifest with labels)")
        if c.mode != "scratch" and not c.source_method and not c.init_from:
            raise ValueError(f"finetune mode {c.mode!r} needs a pretrained model: pass --init-from RUN_DIR")
        state = None
        self.is_2d = self.accepts_2d(c)
        if c.mode != "scratch":
            if load_pretrained and c.init_from:
                name, cfg_dict, _, state = read_source(c.init_from, c.init_checkpoint)
                if c.source_method and (name != c.source_method or cfg_dict != c.source_config):
                    raise ValueError(f"init_from {c.init_from} holds a {name!r} model that differs from the one this "
                                     f"run was started with ({c.source_method!r}); resume with the original model")
                c.source_method, c.source_config = name, cfg_dict
            from anatomical_embedding.methods.runs import build_method

            source = build_method(c.source_method, c.source_config)
            if state is not None:
                _load_state(source, state, f"pretrained checkpoint of {c.init_from}")
        self.embedding: nn.Module | None = None
        if c.mode == "embedding":
            emb = source.embedder()
            for p in emb.parameters():
                p.requires_grad_(False)
            self.embedding = emb.eval()
            in_ch = 1 + int(emb.coarse_channels) + int(emb.fine_channels)
            self.network = self._unet(in_ch)
            self.size_multiple = int(np.lcm(int(emb.size_multiple), self.network_multiple))
        elif c.mode == "backbone":
            from anatomical_embedding.methods.backbones import segmentation_network

            self.network = segmentation_network(source, c.num_classes, c.head_hidden)
            # Parameters taken over from the pretrained model (the schedule below freezes, then warms them up),
            # by name: a network that shares the source's modules (AEFM, HDSSL, Adam) names them through the
            # shared parameters; one that copies weights into new modules (AnatoMask's STU-Net) says which of
            # its parameters it loaded (``pretrained_parameter_names``). Object identity alone missed the copies.
            self.pretrained_names = pretrained_parameter_names(self.network, source)
            self._pretrained_ids = {id(p) for n, p in self.network.named_parameters() if n in self.pretrained_names}
            freeze, ramp, _ = self.backbone_schedule()
            if (freeze > 0 or ramp > 0) and not self._pretrained_ids:
                log.warning("finetune: the backbone schedule (%d frozen, %d ramp steps) has no pretrained parameters "
                            "to act on; every parameter trains at the base rate", freeze, ramp)
            self._pretrained_modules = [m for m in self.network.children() if any(True for _ in m.parameters())
                                        and all(id(p) in self._pretrained_ids for p in m.parameters())]
            # A backbone may keep layers the segmentation path does not use (AEFM's global map): DDP must know.
            self.ddp_find_unused_parameters = True
            self.size_multiple = int(getattr(self.network, "size_multiple", 16))
        else:
            self.network = self._unet(1)
            self.size_multiple = self.network_multiple
        _require_multiple(c.patch_size, self.size_multiple, f"the {c.mode} network's size multiple", self.is_2d)
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    def backbone_schedule(self) -> tuple[int, int, float]:
        """(frozen steps, ramp steps, start factor) of the pretrained backbone; (0, 0, 1) outside backbone mode."""
        c = self.config
        if c.mode != "backbone":
            return 0, 0, 1.0
        paper = PAPER_BACKBONE_SCHEDULES.get(c.source_method, (0, 0, 1.0))
        freeze = paper[0] if c.backbone_freeze_steps < 0 else c.backbone_freeze_steps
        ramp = paper[1] if c.backbone_ramp_steps < 0 else c.backbone_ramp_steps
        return int(freeze), int(ramp), float(c.backbone_ramp_start)

    def param_groups(self) -> list[dict]:
        freeze, ramp, start = self.backbone_schedule()
        ids = getattr(self, "_pretrained_ids", set())
        if (freeze <= 0 and ramp <= 0) or not ids:
            return super().param_groups()
        trainable = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if id(p) not in ids], "lr_factor": None},
                {"params": [p for p in trainable if id(p) in ids], "lr_factor": _BackboneFactor(freeze, ramp, start)}]

    def _unet(self, in_channels: int) -> nn.Module:
        from monai.networks.nets import UNet

        ch = tuple(int(v) for v in self.config.unet_channels)
        if len(ch) < 2:
            raise ValueError(f"unet_channels needs at least 2 widths, got {list(ch)}")
        self.network_multiple = 2 ** (len(ch) - 1)
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=self.config.num_classes, channels=ch,
                    strides=(2,) * (len(ch) - 1), num_res_units=self.config.unet_res_units, norm="INSTANCE")

    def train(self, mode: bool = True) -> FinetuneMethod:
        super().train(mode)
        if self.embedding is not None:  # frozen: BatchNorm statistics (HDSSL) must not move either
            self.embedding.eval()
        return self

    # ----------------------------------------------------------------- data
    @classmethod
    def source_is_2d(cls, config: FinetuneConfig) -> bool:
        """True when the pretrained model is a 2D network (its method's ``accepts_2d``, e.g. Adam/Eve dims=2)."""
        if config.mode == "scratch":
            return False
        name, cfg_dict = config.source_method, config.source_config
        if not name:
            path = Path(config.init_from) / "config.toml" if config.init_from else None
            if path is None or not path.is_file():
                return False  # read_source reports the missing run
            from anatomical_embedding.methods.runs import plain_config, read_method_run

            name, run_config = read_method_run(path)
            cfg_dict = plain_config(run_config)
        if name == cls.name:
            return False  # read_source refuses a finetune run as a source
        from anatomical_embedding.methods.runs import build_dataclass
        from anatomical_embedding.methods import get_method

        source = get_method(name)
        return bool(source.accepts_2d(build_dataclass(source.Config, dict(cfg_dict), "method")))

    @classmethod
    def accepts_2d(cls, config: FinetuneConfig) -> bool:
        if not cls.source_is_2d(config):
            return False
        if config.mode != "backbone":  # the 2D embedding has no slice axis to up-sample for the 3D U-Net
            raise ValueError(f"the pretrained model {config.init_from or config.source_method} is 2D (e.g. Adam/Eve "
                             f"dims=2); finetune it with --mode backbone (its 2D U-Net), not --mode {config.mode}")
        return True

    @classmethod
    def _source_info(cls, config: FinetuneConfig) -> dict:
        if config.source_info:
            return config.source_info
        if config.init_from:
            return read_source(config.init_from, config.init_checkpoint)[2]
        return {}

    @classmethod
    def resolved_preprocessing(cls, config: FinetuneConfig) -> tuple[tuple[float, float, float], str | dict]:
        info = {} if (config.spacing and config.preset) else cls._source_info(config)
        if config.spacing:
            spacing = config.spacing
        elif info.get("spacing"):
            spacing = info["spacing"]
        elif config.mode == "scratch":
            spacing = (1.0,)
        else:
            raise ValueError("the pretrained model records no spacing; set method.spacing")
        spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, float), (3,)))
        preset = _preset_value(config.preset) if config.preset else info.get("intensity_preset", "ct_aefm")
        return spacing, preset

    @classmethod
    def preprocess_config(cls, config: FinetuneConfig):
        from anatomical_embedding.data.datasets import PreprocessConfig

        spacing, preset = cls.resolved_preprocessing(config)
        # 2D: no padding to the patch (it would make a slice flat along i or j a volume); crops pad instead.
        min_size = (0, 0, 0) if cls.accepts_2d(config) else tuple(int(p) for p in config.patch_size)
        return PreprocessConfig(spacing=spacing, preset=preset, min_size=min_size)

    @classmethod
    def min_image_size(cls, config: FinetuneConfig) -> tuple[int, int, int]:
        return (1, 1, 1)  # smaller volumes are padded to the patch size

    @classmethod
    def configure_from_data(cls, config: FinetuneConfig, info: DataInfo) -> FinetuneConfig:
        if info.n_labelled == 0:
            raise ValueError(f"finetuning needs labelled cases but none of the {info.n_cases} cases in "
                             f"{info.source} has a label map; pass --labels LABEL_DIR or list 'label' in the manifest")
        if info.max_label < 1:
            raise ValueError("every label map is empty (only background 0); label at least one structure")
        if config.num_classes == 0:
            config.num_classes = int(info.max_label) + 1
        elif config.num_classes <= info.max_label:
            raise ValueError(f"method.num_classes={config.num_classes} but the labels go up to {info.max_label}; "
                             f"use num_classes >= {info.max_label + 1} or 0 (automatic)")
        names = list(config.class_names)
        if len(names) < config.num_classes:
            names = (names or ["background"]) + [f"label_{v}" for v in range(max(1, len(names)), config.num_classes)]
        config.class_names = tuple(names[: config.num_classes])
        if config.init_from:  # record the pretrained model so that the run describes itself
            name, cfg_dict, model_info, _ = read_source(config.init_from, config.init_checkpoint)
            config.source_method, config.source_config = name, cfg_dict
            config.source_info = {k: v for k, v in model_info.items()
                                  if k in ("method", "spacing", "intensity_preset", "patch_size", "step")}
        if config.patch_size == FinetuneConfig.patch_size and cls.accepts_2d(config):
            # The 3D default makes no sense for a 2D network: use its pretraining input size (paper: 224 x 224).
            size = list(config.source_info.get("patch_size") or [])[:2] or [224, 224]
            config.patch_size = (int(size[0]), int(size[1]), 1)
        spacing, preset = cls.resolved_preprocessing(config)
        config.spacing = spacing
        config.preset = _preset_text(preset)
        return config

    def default_epochs(self) -> int:
        return 1000

    def split(self, labelled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) case indices: a seeded split of the labelled cases, fixed for the run."""
        idx = np.flatnonzero(labelled)
        perm = np.random.default_rng([self.config.split_seed, 17]).permutation(idx)
        n_val = round(self.config.val_fraction * len(idx))
        n_val = min(max(n_val, 1 if self.config.val_fraction > 0 else 0), len(idx) - 1)
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    def case_weights(self, labelled: np.ndarray, epoch: int) -> np.ndarray:
        train, _ = self.split(labelled)
        w = np.zeros(len(labelled))
        w[train] = 1.0 / len(train)
        return w

    def make_sample(self, item: dict, rng: np.random.Generator, epoch: int) -> dict:
        from anatomical_embedding.data.patches import jitter_intensity

        if item.get("label") is None:  # case_weights never picks these
            raise ValueError(f"case {item.get('id')} has no label map")
        image = item["image"].numpy() if torch.is_tensor(item["image"]) else np.asarray(item["image"])
        label = item["label"].numpy() if torch.is_tensor(item["label"]) else np.asarray(item["label"])
        if self.is_2d:  # the slice as (1, rows, cols): the 2D network sees its plane whatever the flat axis
            axis = _slice_axis(image.shape, f"case {item.get('id')}")
            image, label = np.moveaxis(image, axis, 0), np.moveaxis(label, axis, 0)
        size = np.asarray(self.config.patch_size[::-1], dtype=int)  # (k, j, i)
        centre = sample_centre(label, self.config.foreground_fraction, rng)
        lo = centre - size // 2
        img = crop_padded(image, lo, size, float(image.min()))
        lab = crop_padded(label, lo, size, 0)
        patch = jitter_intensity(torch.from_numpy(img)[None], rng, self.config.aug_scale, self.config.aug_shift,
                                 self.config.aug_noise)
        return {"image": patch.float(), "label": torch.from_numpy(lab.astype(np.int64))[None]}

    # ----------------------------------------------------------------- training
    def inputs(self, image: torch.Tensor) -> torch.Tensor:
        """Network input: the image, plus (embedding mode) its frozen coarse and fine embedding."""
        if self.embedding is None:
            return image
        with torch.no_grad():
            coarse, fine = self.embedding(image)
            coarse = F.interpolate(coarse.float(), size=tuple(image.shape[2:]), mode="trilinear", align_corners=False)
        return torch.cat([image, coarse.to(image.dtype), fine.to(image.dtype)], dim=1)

    def predict_logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.network(self.inputs(image))

    def forward(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        freeze = self.backbone_schedule()[0]
        if self.training and freeze > 0:
            # Frozen means frozen: normalisation statistics (HDSSL's BatchNorm) stay as pretrained too.
            for module in getattr(self, "_pretrained_modules", ()):
                module.train(ctx.step >= freeze)
        logits = self.predict_logits(batch["image"])
        loss = self.loss_fn(logits.float(), batch["label"])
        return loss, {"dice_ce": loss.detach()}

    @property
    def eval_every(self) -> int:
        return int(self.config.val_every)

    @torch.no_grad()
    def evaluate(self, dataset, labelled: np.ndarray, ctx: StepContext, device: torch.device) -> dict[str, float]:
        """Mean foreground Dice of the validation cases (split over DDP ranks, gathered)."""
        _, val = self.split(labelled)
        total = torch.zeros(1, 2, dtype=torch.float64, device=device)
        for n in val[ctx.rank::ctx.world_size]:
            item = dataset[int(n)]
            pred = self.segment_array(item["image"].to(device))
            total[0, 0] += mean_dice(pred, item["label"].to(device).long(), self.config.num_classes)
            total[0, 1] += 1
        total = ctx.all_gather(total).sum(0)
        if total[1] == 0:
            return {}
        dice = float(total[0] / total[1])
        return {"val_dice": dice, "val_dice_error": 1.0 - dice}

    def segment_array(self, image: torch.Tensor) -> torch.Tensor:
        """Labels (k, j, i) of a preprocessed image (k, j, i) by Gaussian-blended sliding windows."""
        roi = tuple(int(p) for p in self.config.patch_size[::-1])
        if self.is_2d:  # 2D windows over the slice; the network gets (N, C, 1, rows, cols)
            axis = _slice_axis(image.shape, "the image")
            plane = torch.movedim(image, axis, 0)
            return torch.movedim(self._segment_windows(plane[0], roi[1:], lambda x: self.predict_logits(
                x[:, :, None])[:, :, 0])[None], 0, axis)
        return self._segment_windows(image, roi, self.predict_logits)

    def _segment_windows(self, image: torch.Tensor, roi: tuple[int, ...], predictor) -> torch.Tensor:
        """Labels of an image (2D or 3D) by sliding windows of ``roi`` (array order) through ``predictor``."""
        from monai.inferers import sliding_window_inference

        shape = tuple(image.shape)
        # Pad small volumes as training did (with the image minimum, i.e. air), not with MONAI's zeros.
        need = [max(0, r - s) for r, s in zip(roi, shape)]
        x = image.float()[None, None]
        if any(need):
            pads = [v for n in reversed(need) for v in (n // 2, n - n // 2)]
            x = F.pad(x, pads, value=float(x.min()))
        logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=self.config.sw_batch_size,
                                          predictor=predictor, overlap=self.config.sw_overlap, mode="gaussian")
        lo = [n // 2 for n in need]
        return logits[(0, slice(None)) + tuple(slice(a, a + s) for a, s in zip(lo, shape))].argmax(0)

    # ----------------------------------------------------------------- export
    def embedder(self):
        raise ValueError("a finetune run is a segmentation model, not an embedding model; use "
                         "`anatomical-embedding segment --run RUN_DIR` to apply it")

    def model_info(self) -> dict:
        c = self.config
        return {"method": self.name, "task": "segmentation", "mode": c.mode, "num_classes": int(c.num_classes),
                "class_names": list(c.class_names), "spacing": [float(s) for s in c.spacing] if c.spacing else [],
                "patch_size": [int(p) for p in c.patch_size], "source_method": c.source_method}


# ---------------------------------------------------------------------------------------- sampling helpers
def sample_centre(label: np.ndarray, foreground_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A patch centre (k, j, i): on a uniformly drawn present foreground class with the given probability."""
    if rng.random() < foreground_fraction:
        classes = np.unique(label)
        classes = classes[classes > 0]
        if len(classes):
            c = classes[rng.integers(len(classes))]
            vox = np.flatnonzero(label.ravel() == c)
            return np.asarray(np.unravel_index(vox[rng.integers(len(vox))], label.shape))
    return np.array([rng.integers(s) for s in label.shape])


def crop_padded(array: np.ndarray, lo: np.ndarray, size: np.ndarray, fill: float) -> np.ndarray:
    """``array[lo : lo + size]`` with ``fill`` wherever the box leaves the array."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(lo + size, array.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst = src_lo - lo
    out[tuple(slice(int(d), int(d + h - l)) for d, l, h in zip(dst, src_lo, src_hi))] = \
        array[tuple(slice(int(l), int(h)) for l, h in zip(src_lo, src_hi))]
    return out


def mean_dice(pred: torch.Tensor, ref: torch.Tensor, num_classes: int) -> float:
    """MONAI ``DiceMetric`` over foreground classes present in the reference (or predicted), averaged."""
    from monai.metrics import DiceMetric

    p = F.one_hot(pred.long(), num_classes).permute(3, 0, 1, 2)[None].float()
    r = F.one_hot(ref.long(), num_classes).permute(3, 0, 1, 2)[None].float()
    per_class = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, r)[0]
    valid = ~torch.isnan(per_class)
    # A class predicted but absent from the reference counts as 0 (ignore_empty drops it as NaN).
    false_pos = (r[0, 1:].flatten(1).sum(1) == 0) & (p[0, 1:].flatten(1).sum(1) > 0)
    scores = torch.where(valid, per_class, torch.zeros_like(per_class))[valid | false_pos]
    return float(scores.mean()) if len(scores) else float("nan")


# ------------------------------------------------------------------------------------------- applying
def load_finetuned(run_dir: str | Path, checkpoint: str = "best", device: str = "cpu") -> FinetuneMethod:
    """A trained finetune run (config.toml + checkpoint) in eval mode; needs no access to ``init_from``."""
    from anatomical_embedding.methods.runs import load_checkpoint, plain_config, read_method_run, resolve_checkpoint

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found; {run_dir} is not a finetune run folder")
    method_name, method_config = read_method_run(cfg_path)
    if method_name != FinetuneMethod.name:
        raise ValueError(f"{run_dir} is a {method_name!r} pretraining run, not a finetune run; segment with the "
                         "few-shot head (`fewshot apply`) or finetune it first (`finetune --init-from`)")
    try:
        path = resolve_checkpoint(run_dir, checkpoint)
    except FileNotFoundError:
        if checkpoint != "best":
            raise
        path = resolve_checkpoint(run_dir, "last")  # runs without validation have no best.pt
    method = FinetuneMethod(replace(method_config), load_pretrained=False)
    _load_state(method, load_checkpoint(path)["model"], f"checkpoint {path}")
    return method.to(device).eval()


def segment_volume(method: FinetuneMethod, image, postprocess: bool = False):
    """Segment a ``Volume``: preprocess, sliding-window inference, labels back on the image's own grid."""
    from anatomical_embedding.data.datasets import PreprocessConfig, preprocess_volume
    from anatomical_embedding.io import resample_like

    spacing, preset = FinetuneMethod.resolved_preprocessing(method.config)
    pre, _ = preprocess_volume(image, PreprocessConfig(spacing=spacing, preset=preset))
    device = next(method.parameters()).device
    with torch.inference_mode():
        labels = method.segment_array(torch.from_numpy(np.ascontiguousarray(pre.array, dtype=np.float32)).to(device))
    out = labels.cpu().numpy().astype(np.int16)
    if postprocess:
        from anatomical_embedding.io.labelmaps import keep_largest_components

        out = keep_largest_components(out, method.config.num_classes).astype(np.int16)
    return resample_like(pre.with_array(out), image, is_label=True)


def class_names_dict(method: FinetuneMethod) -> dict[int, str]:
    names = list(method.config.class_names)
    return {v: (names[v] if v < len(names) else f"label_{v}") for v in range(1, method.config.num_classes)}
