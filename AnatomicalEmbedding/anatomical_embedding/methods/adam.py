"""Adam/Eve (Hosseinzadeh Taher et al.): hierarchical coarse-to-fine MoCo v2 with an Anatomy Decomposer and a
Purposive Pruner; Eve is the dense embedding of the pretrained model (Adam).

As published (2D, ``dims = 2``, the dataclass defaults):

* Twin ResNet-50 backbones ``f_theta``/``f_xi`` and two-layer MLP heads ``h_theta``/``h_xi`` (MoCo v2); the key
  encoder and head follow by EMA (momentum 0.999). Memory bank K = 65536, temperature 0.2, embedding 128-d.
* Anatomy Decomposer (:func:`decompose`): split the image vertically in two, then alternate horizontal and
  vertical splits until there are ``2**n`` parts; one part, drawn uniformly, is the anchor ``x``. Two
  augmented views ``x_q``, ``x_k`` of the anchor (random resized crop, intensity jitter, Gaussian blur, rotation;
  MoCo v2's probabilities; :func:`~anatomical_embedding.data.augment_adam.make_view`) are resized to the
  network input (paper: 224 x 224).
* Purposive Pruner (:func:`~anatomical_embedding.losses.purposive_prune_mask`, supplementary Algorithm 1): for
  ``n > 0`` every bank key with cosine similarity >= gamma = 0.8 to the anchor's query is removed; InfoNCE over
  the pruned bank (:func:`~anatomical_embedding.losses.pruned_info_nce`).
* Staged training: granularity ``levels`` (paper: even n up to 4, i.e. 0, 2, 4), ``epochs_per_level`` epochs each
  (paper: 200). Each stage starts from the previous stage's weights: in one run the networks simply carry on at
  the stage boundary; a stage can also be its own run started from a previous run's checkpoint (``init_from``).
  Memory bank at a stage boundary (the paper is silent): we keep it. Its keys come from the same momentum
  encoder a few hundred steps earlier (MoCo's bank is always that stale), they are pruned like any other key,
  and the FIFO replaces them within K / batch steps. ``init_from`` loads the bank too when its size matches,
  so a stage run from a checkpoint equals the continued single run (up to the optimiser state and schedule).
* Optimiser (``[train]`` in ``Resources/configs/adam.toml``): SGD lr 0.03, weight decay 1e-4, momentum 0.9,
  cosine schedule, batch 256.

Our 3D generalisation (``dims = 3``, not in the paper): the same decomposer on volumes, splitting along
alternating axes i (left/right, the "vertical" split), k (head/foot, "horizontal"), j (front/back), i, ... to
``2**n`` sub-volumes; a 3D ResNet (MONAI ``ResNet``, ``depth`` 10..152) and 3D views (in-plane rotation about k).
Pruner, loss and staged schedule are unchanged.

Other choices and deviations (all configurable):

* MoCo's shuffling BatchNorm is not implemented (the engine's DDP converts BatchNorm to SyncBatchNorm instead);
  the key encoder runs in train mode as in MoCo. ``norm = "instance"`` is available for tiny 3D batches.
* The bank starts empty and only real keys are used (``methods.momentum.FeatureQueue``; MoCo starts from random
  unit vectors).
* The paper gives no augmentation magnitudes; we use MoCo v2's (crop scale 0.2-1, aspect 3/4-4/3, jitter 0.4 with
  p = 0.8, blur sigma 0.1-2 with p = 0.5) and +-10 degree rotation (the supplement's dense-correspondence views).
  Colour jitter becomes brightness and contrast jitter on the grey-level image.
* 2D data: single-slice volumes (PNG, X-ray DICOM, or any 2D file) are squeezed to 2D images along their flat axis.
  ``dims = 0`` picks 2 or 3 from the training images' headers.
* Eve (:class:`~anatomical_embedding.nets.adam_resnet.AdamEveEmbedder`): the paper embeds grid patches resized to
  224; we use the backbone's dense stage maps instead (coarse: layer4; fine: FPN-style fusion of layers 1-4).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from anatomical_embedding.io.settings import ranged
from anatomical_embedding.losses import pruned_info_nce
from anatomical_embedding.nets.adam_resnet import AdamEveEmbedder, ProjectionHead, ResNetBackbone, ResNetUNet
from anatomical_embedding.methods.momentum import FeatureQueue, make_momentum_copy, momentum_update
from anatomical_embedding.data.augment_adam import Box, make_view
from anatomical_embedding.methods.base import DataInfo, Method, Preprocessing, StepContext, resolve_preprocessing

log = logging.getLogger(__name__)

#: Split order of the decomposer per array layout: 2D arrays are (rows, cols), the first split is vertical (it
#: cuts the columns, axis 1), then horizontal (axis 0). 3D arrays are (k, j, i): i, then k, then j.
SPLIT_AXES: dict[int, tuple[int, ...]] = {2: (1, 0), 3: (2, 0, 1)}

#: dims -> (default spacing along (i, j, k) in mm, default intensity preset); 0 (from the data) takes the 2D row.
DIMS_DEFAULTS: dict[int, Preprocessing] = {2: ((1.0, 1.0, 1.0), "xray_minmax"), 3: ((2.0, 2.0, 2.0), "ct_hdssl"),
                                           0: ((1.0, 1.0, 1.0), "xray_minmax")}


@dataclass
class AdamEveConfig:
    dims: int = ranged(2, 0, 3)  # 2 (paper: radiographs) | 3 (our generalisation to volumes) | 0 = from the training images
    # Backbone (paper: ResNet-50) and MoCo v2 head.
    depth: int = ranged(50, 1)  # ResNet depth: 10, 18, 34 (basic blocks), 50, 101, 152 (bottlenecks)
    widths: tuple[int, int, int, int] = ranged((64, 128, 256, 512), 1)  # stage widths (x4 for bottlenecks)
    conv1_stride: int = ranged(2, 1)
    max_pool: bool = True
    norm: str = "batch"  # batch | instance
    proj_hidden: int = ranged(0, 0)  # MLP hidden width; 0 = the backbone's output channels (MoCo v2: 2048)
    proj_dim: int = ranged(128, 1)
    # MoCo v2 (paper F.1).
    bank_size: int = ranged(65536, 1)
    temperature: float = ranged(0.2, 1e-06)
    momentum: float = ranged(0.999, 0.0, 1.0)
    # Purposive Pruner and Anatomy Decomposer.
    gamma: float = ranged(0.8, -1.0, 1.0)
    levels: tuple[int, ...] = ranged((0, 2, 4), 0)  # granularity n of each stage (paper: even n up to 4)
    epochs_per_level: int = ranged(200, 0)  # paper
    # Paper (supplementary): each stage n trains 200 epochs with MoCo's cosine schedule, so every stage has its own
    # cosine from the base rate; False = one cosine over all stages (stage n=4 then trains at <= 25 % of the rate).
    stage_schedule: bool = True
    init_from: str = ""  # start from a previous (Adam) run folder's checkpoint: a stage run
    init_checkpoint: str = "last"
    # Data.
    # Preprocessing is fixed before the data are read: dims = 0 uses the 2D defaults.
    spacing: tuple[float, ...] = ranged((), 1e-06)  # mm along (i, j, k); () = 1 mm (2D, 0) / 2 mm (3D)
    preset: str = ""  # intensity preset; "" = xray_minmax (2D, 0) / ct_hdssl (3D)
    input_size: tuple[int, ...] = ranged((224, 224), 1)  # network input along (i, j[, k]); views are resized to it
    # Augmentations (MoCo v2 magnitudes; paper: random crop, colour jitter, Gaussian blur, rotation).
    crop_scale: tuple[float, float] = ranged((0.2, 1.0), 1e-06, 1.0)  # view area (volume) / anchor area
    crop_ratio: tuple[float, float] = ranged((0.75, 1.3333333), 1e-06)
    jitter_prob: float = ranged(0.8, 0.0, 1.0)
    brightness: float = ranged(0.4, 0)
    contrast: float = ranged(0.4, 0)
    blur_prob: float = ranged(0.5, 0.0, 1.0)
    blur_sigma: tuple[float, float] = ranged((0.1, 2.0), 0)  # voxels of the view
    rotation_deg: float = ranged(10.0, 0.0, 180.0)
    # Dense embedding (Eve).
    coarse_stride: int = ranged(8, 1)
    coarse_dim: int = ranged(128, 0)  # fixed orthonormal projections; 0 = no reduction
    fine_dim: int = ranged(128, 0)
    fine_stages: tuple[int, ...] = ranged((1, 2, 3, 4), 1)
    proj_seed: int = 0
    # Finetuning U-Net decoder widths: layer3, layer2, layer1[, stem, full resolution] (() = half the skip widths).
    decoder_widths: tuple[int, ...] = ranged((), 1)


# ---------------------------------------------------------------------------------------------- decomposer
def decompose(shape: Sequence[int], n: int, axes: Sequence[int] | None = None) -> list[Box]:
    """The Anatomy Decomposer's ``2**n`` parts of an array of ``shape``: boxes ``((start, stop), ...)`` per axis.

    Split ``t`` (t = 0..n-1) halves every part along ``axes[t % len(axes)]`` (default :data:`SPLIT_AXES`): for 2D
    vertical, horizontal, vertical, ...; for 3D i, k, j, i, ... The parts tile the array exactly (an odd side
    gives halves that differ by one voxel). Parts are listed in splitting order.
    """
    shape = tuple(int(s) for s in shape)
    axes = tuple(axes if axes is not None else SPLIT_AXES[len(shape)])
    if n < 0:
        raise ValueError(f"granularity level n must be >= 0, got {n}")
    boxes: list[Box] = [tuple((0, s) for s in shape)]
    for t in range(n):
        ax = axes[t % len(axes)]
        out = []
        for box in boxes:
            lo, hi = box[ax]
            if hi - lo < 2:
                raise ValueError(f"image {shape} is too small for granularity level {n}: a part of side {hi - lo} "
                                 f"cannot be split along axis {ax}; use a lower level or a finer spacing")
            mid = lo + (hi - lo) // 2
            out.append(box[:ax] + ((lo, mid),) + box[ax + 1:])
            out.append(box[:ax] + ((mid, hi),) + box[ax + 1:])
        boxes = out
    return boxes


def squeeze_2d(image: torch.Tensor) -> torch.Tensor:
    """A single-slice volume (k, j, i) as a 2D image (its two non-flat axes, in order)."""
    flat = [a for a, s in enumerate(image.shape) if s == 1]
    if image.dim() == 2:
        return image
    if not flat:
        raise ValueError(f"Adam/Eve dims=2 trains on 2D images (single-slice volumes) but got a volume of "
                         f"{tuple(image.shape)} voxels; set method.dims=3 for volumes")
    return image.squeeze(flat[0]) if image.dim() == 3 else image


# ---------------------------------------------------------------------------------------------- method
class AdamEveMethod(Method):
    name = "adam"
    Config = AdamEveConfig
    compile_targets = ("encoder",)

    def __init__(self, config: AdamEveConfig) -> None:
        super().__init__(config)
        c = config
        if c.dims not in (2, 3):
            raise ValueError(f"Adam/Eve dims must be 2 or 3 when the method is built (0 is resolved from the data), "
                             f"got {c.dims}")
        if len(c.input_size) != c.dims:
            raise ValueError(f"Adam/Eve input_size {list(c.input_size)} needs {c.dims} values (i, j[, k]) for "
                             f"dims={c.dims}")
        if not c.levels or any(int(n) < 0 for n in c.levels) or list(c.levels) != sorted(c.levels):
            raise ValueError(f"Adam/Eve levels must be non-negative and increasing (coarse to fine), "
                             f"got {list(c.levels)}")
        if not 0.0 < c.gamma <= 1.0:
            raise ValueError(f"Adam/Eve gamma must be in (0, 1], got {c.gamma}")
        self.encoder = ResNetBackbone(c.dims, c.depth, c.widths, c.conv1_stride, c.max_pool, c.norm)
        ch = self.encoder.out_channels
        self.head = ProjectionHead(ch, c.proj_hidden or ch, c.proj_dim)
        self.key_encoder = make_momentum_copy(self.encoder)
        self.key_head = make_momentum_copy(self.head)
        self.bank = FeatureQueue(c.bank_size, c.proj_dim)
        multiple = self.encoder.total_stride
        if any(int(s) % multiple for s in c.input_size):
            raise ValueError(f"Adam/Eve input_size {list(c.input_size)} must be multiples of the ResNet stride "
                             f"{multiple}")
        self._pending: torch.Tensor | None = None

    # ----------------------------------------------------------------- data
    @classmethod
    def resolved_preprocessing(cls, config: AdamEveConfig) -> Preprocessing:
        if config.dims not in DIMS_DEFAULTS:
            raise ValueError(f"Adam/Eve dims must be 0, 2 or 3, got {config.dims}")
        return resolve_preprocessing(DIMS_DEFAULTS[config.dims], config.spacing, config.preset, "Adam/Eve", (1, 2, 3))

    @classmethod
    def accepts_2d(cls, config: AdamEveConfig) -> bool:
        return config.dims in (0, 2)

    @classmethod
    def min_image_size(cls, config: AdamEveConfig) -> tuple[int, int, int]:
        if config.dims != 3:  # the flat axis of a 2D image may be any of i, j, k; decompose() checks sizes
            return (1, 1, 1)
        side = 2 ** ((max(config.levels) + 2) // 3) if config.levels else 1  # every part keeps >= 1 voxel per axis
        return (side, side, side)

    @classmethod
    def configure_from_data(cls, config: AdamEveConfig, info: DataInfo) -> AdamEveConfig:
        if config.dims == 0 or config.dims == 2:
            from anatomical_embedding.data.datasets import DatasetSpec

            dims = data_dims(DatasetSpec.from_path(info.source)) if info.source else config.dims
            if config.dims == 2 and dims == 3:
                raise ValueError(f"Adam/Eve dims=2 trains on 2D images but {info.source} holds 3D volumes; "
                                 "set method.dims=3 (our 3D generalisation) or method.dims=0 (automatic)")
            if config.dims == 0:
                config.dims = dims
                if len(config.input_size) != dims:
                    side = int(config.input_size[0]) if config.input_size else 224
                    config.input_size = (side,) * dims
                log.info("Adam/Eve: %dD mode from the training images", dims)
        return config

    def default_epochs(self) -> int:
        return self.config.epochs_per_level * len(self.config.levels)

    def stage_starts(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        c = self.config
        if not c.stage_schedule:
            return [0]
        return [n * c.epochs_per_level * steps_per_epoch for n in range(len(c.levels))]

    def level_for_epoch(self, epoch: int) -> int:
        """Granularity n of the stage that ``epoch`` belongs to (the last stage continues past its end)."""
        c = self.config
        return int(c.levels[min(epoch // max(1, c.epochs_per_level), len(c.levels) - 1)])

    def network_size(self) -> tuple[int, ...]:
        """View size in array order ((j, i) or (k, j, i))."""
        return tuple(int(s) for s in self.config.input_size[::-1])

    def make_sample(self, item: dict, rng: np.random.Generator, epoch: int) -> dict:
        image = item["image"]
        image = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
        image = squeeze_2d(image) if self.config.dims == 2 else image
        level = self.level_for_epoch(epoch)
        parts = decompose(tuple(image.shape), level)
        part = int(rng.integers(len(parts)))
        size = self.network_size()
        return {
            "view_q": make_view(image, parts[part], size, rng, self.config)[None],
            "view_k": make_view(image, parts[part], size, rng, self.config)[None],
            "level": torch.tensor(level, dtype=torch.long),
            "part": torch.tensor(part, dtype=torch.long),
        }

    # ----------------------------------------------------------------- training
    def query(self, views: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(views)), dim=1)  # forward = pooled (what compile targets)

    @torch.no_grad()
    def key(self, views: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_head(self.key_encoder(views)), dim=1)

    def forward(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        q = self.query(batch["view_q"])
        k = self.key(batch["view_k"])
        level = int(batch["level"].max())  # every sample of a step is drawn at the same level
        loss, keep = pruned_info_nce(q, k.detach(), self.bank.negatives(), self.config.temperature,
                                     self.config.gamma, level)
        self._pending = k.detach()
        kept = keep.float().mean() if keep.numel() else torch.ones(())
        return loss, {"level": torch.tensor(float(level)), "bank_kept": kept.detach()}

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = self.config.momentum
        momentum_update(self.encoder, self.key_encoder, m)
        momentum_update(self.head, self.key_head, m)
        if self._pending is not None:
            self.bank.enqueue(ctx.all_gather(self._pending.float().contiguous()))
        self._pending = None

    # ----------------------------------------------------------------- stages
    def load_initial_weights(self) -> None:
        """``init_from``: start this run (a later stage) from a previous Adam run's checkpoint.

        Loads the online and key networks exactly; the memory bank too when its size matches (see the module
        docstring), otherwise it starts empty.
        """
        c = self.config
        if not c.init_from:
            return
        from anatomical_embedding.methods.runs import load_checkpoint, read_method_run, resolve_checkpoint

        run = Path(c.init_from)
        if not (run / "config.toml").is_file():
            raise FileNotFoundError(f"init_from {run} is not a training run folder (no config.toml); pass the run "
                                    "folder of the previous Adam stage")
        prev_method, prev_config = read_method_run(run / "config.toml")
        if prev_method != self.name:
            raise ValueError(f"init_from {run} is a {prev_method!r} run; an Adam stage starts from an Adam run")
        state = dict(load_checkpoint(resolve_checkpoint(run, c.init_checkpoint))["model"])
        own = self.state_dict()
        if tuple(state.get("bank.features", torch.zeros(0)).shape) != tuple(own["bank.features"].shape):
            log.warning("init_from %s: memory bank size differs (%s vs %s); starting with an empty bank", run,
                        tuple(state.get("bank.features", torch.zeros(0)).shape), tuple(own["bank.features"].shape))
            state = {k: v for k, v in state.items() if not k.startswith("bank.")}
            state.update({k: v for k, v in own.items() if k.startswith("bank.")})
        try:
            self.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"init_from {run}: its networks differ from this configuration "
                             f"({str(exc).splitlines()[0]}); keep depth, widths, dims and the head as in the "
                             "previous stage") from None
        log.info("Adam/Eve: started from %s (levels %s -> %s)", run, list(prev_config.levels), list(c.levels))

    # ----------------------------------------------------------------- export / finetune
    def embedder(self) -> AdamEveEmbedder:
        c = self.config
        return AdamEveEmbedder(self.encoder, c.coarse_stride, c.coarse_dim, c.fine_dim, c.fine_stages, c.proj_seed)

    def segmentation_network(self, n_classes: int) -> ResNetUNet:
        """``finetune --mode backbone``: a U-Net whose encoder is the pretrained online ResNet ``f_theta``."""
        net = ResNetUNet(self.encoder, n_classes, tuple(self.config.decoder_widths) or None)
        return net.to(next(self.encoder.parameters()).device)

    def model_modality(self) -> str:
        return "X-ray" if self.config.dims == 2 else "CT"

    def model_patch_size(self) -> list[int]:
        size = self.config.input_size  # a 2D network's input gets a flat third axis
        return [int(s) for s in size] + [1] * (3 - len(size))

    def model_extras(self) -> dict:
        c = self.config
        return {"dims": int(c.dims), "backbone": f"ResNet-{c.depth} ({c.dims}D)", "levels": [int(n) for n in c.levels]}


def data_dims(spec) -> int:
    """2 when every training image is a single-slice volume (2D), 3 when none is; mixed data is an error."""
    import SimpleITK as sitk

    flat = []
    for case in spec.cases:
        if case.image.is_dir():
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.image))
            flat.append(len(files) == 1)
            continue
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(case.image))
        reader.ReadImageInformation()
        size = list(reader.GetSize()) + [1] * (3 - reader.GetDimension())
        flat.append(min(size[:3]) == 1)
    if all(flat):
        return 2
    if not any(flat):
        return 3
    raise ValueError(f"{spec.source} mixes 2D images and 3D volumes; Adam/Eve trains on one kind (set method.dims)")


__all__ = ["SPLIT_AXES", "AdamEveConfig", "AdamEveMethod", "data_dims", "decompose", "squeeze_2d"]
