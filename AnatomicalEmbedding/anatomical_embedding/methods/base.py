"""The method interface: everything that differs between AEFM, Adam/Eve, AnatoMask and HDSSL.

The training engine (``training/``) owns the loop, the optimiser, AMP, DDP, checkpoints, logging and
export; a method owns its networks and what one training step means. A method is an ``nn.Module``
(so its networks, momentum copies and queues/banks — as buffers — travel in one ``state_dict()``) and
the engine wraps it in DDP and calls it as ``loss, terms = model(batch, ctx)``.

Hooks, in the order the engine uses them:

* ``Config`` (class attribute): a dataclass with the paper's defaults (the ``[method]`` TOML table).
* ``configure_from_data(config, info)`` (classmethod): fill data-dependent settings (e.g. the number
  of label classes) before the networks are built.
* ``preprocess_config(config)`` -> ``data.PreprocessConfig`` (classmethod): spacing and intensity preset
  of the cached data (``resolved_preprocessing``) and the size small volumes are padded to
  (``preprocess_min_size``); ``min_image_size(config)``: smallest usable volume (i, j, k voxels), checked
  before training.
* ``accepts_2d(config)`` (classmethod): True when the method trains on 2D images (single-slice volumes);
  otherwise the engine refuses them up front.
* ``load_initial_weights()``: called once on a new run (not on resume) after the method is built, to start
  from another run's weights (Adam/Eve's staged training, ``init_from``); default: nothing.
* ``default_epochs()``; ``case_weights(labelled, epoch)``: optional case sampling weights (None = each
  epoch is a permutation of the cases).
* ``make_sample(item, rng, epoch)``: the sampler and augmentations for one preprocessed case; runs in
  DataLoader workers with a generator seeded by the global sample index, so DDP and resume see the
  same samples. ``collate(samples)``: batch them (default: ``torch.utils.data.default_collate``).
* ``forward(batch, ctx)`` -> ``(loss, terms)``: the differentiable part (online networks).
* ``after_optimizer_step(ctx)``: momentum/EMA updates and queue or bank updates; use
  ``ctx.all_gather`` so every rank enqueues the keys of the whole global batch (MoCo).
* ``eval_every`` / ``evaluate(dataset, labelled, ctx, device)``: optional validation; when ``eval_every > 0``
  the engine calls ``evaluate`` every that many steps and at the end (eval mode, no gradients, AMP), on every
  rank (split the work by ``ctx.rank``, combine with ``ctx.all_gather``); the returned metrics are logged as an
  ``eval`` event and can be ``train.best_metric`` (lower is better). The finetune task uses it.
* ``embedder()``: the dense :class:`~anatomical_embedding.nets.embedder.Embedder` used downstream;
  ``model_info()``: the model card (spacing, preset, patch size, channels); a method supplies what differs
  (``model_modality``, ``model_patch_size``, ``model_extras``).

How the other methods fit: Adam/Eve keeps a momentum encoder plus a memory bank (buffers; keys enqueued in
``after_optimizer_step``, pruned per query in ``forward``) and draws a decomposer part of one image and two
views of it in ``make_sample``; AnatoMask keeps
an EMA teacher (``after_optimizer_step``) whose reconstruction error guides the mask drawn in
``forward``; HDSSL samples overlapping patch pairs (``data.patches``) and returns the contrastive
and restorative terms in ``terms``. None needs an engine special case.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from anatomical_embedding.nets.embedder import Embedder


@dataclass
class DataInfo:
    """What the engine knows about the training data before the method is built."""

    n_cases: int
    n_labelled: int
    max_label: int = 0  # largest label value over the labelled cases (0 if none)
    source: str = ""


@dataclass
class StepContext:
    """Passed to ``forward`` and ``after_optimizer_step``."""

    step: int  # 0-based index of the optimiser step being taken
    epoch: int
    total_steps: int
    rank: int = 0
    world_size: int = 1
    #: Concatenate a tensor's first dimension across ranks, in rank order (identity on one process).
    all_gather: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)


#: (spacing along (i, j, k) in mm, intensity preset name) of the cached data.
Preprocessing = tuple[tuple[float, float, float], str]


def resolve_preprocessing(defaults: Preprocessing, spacing: Sequence[float], preset: str, what: str,
                          counts: tuple[int, ...] = (1, 3)) -> Preprocessing:
    """The config's ``spacing`` and ``preset`` where set, else ``defaults`` (a per-modality / per-dims table row).

    ``spacing`` may hold any of ``counts`` values: one is isotropic, fewer than three repeat the last one (Adam/Eve
    allows two for 2D images, whose flat axis keeps its own spacing anyway; HDSSL asks for one or three).
    """
    default_spacing, default_preset = defaults
    if not spacing:
        return tuple(default_spacing), (preset or default_preset)
    if len(spacing) not in counts:
        lo, hi = min(counts), max(counts)
        allowed = f"{lo} to {hi}" if tuple(counts) == tuple(range(lo, hi + 1)) else " or ".join(map(str, counts))
        raise ValueError(f"{what} spacing needs {allowed} values (mm along i, j, k), got {list(spacing)}")
    sp = [float(s) for s in spacing]
    sp = sp + [sp[-1]] * (3 - len(sp))
    return (sp[0], sp[1], sp[2]), (preset or default_preset)


def patch_min_size(patch_size: Sequence[int], patch_scale: Sequence[float]) -> tuple[int, ...]:
    """Largest patch side (voxels) the patch-pair sampler can draw: small volumes are padded up to it."""
    return tuple(int(np.ceil(p * patch_scale[1])) for p in patch_size)


class Method(nn.Module):
    """Base class of the training methods; subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    #: Set when some parameters get no gradient in some steps (DDP must then search for unused ones).
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: Attribute names of sub-networks worth ``torch.compile`` (compiled in place, keys unchanged).
    compile_targets: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def configure_from_data(cls, config: Any, info: DataInfo) -> Any:
        return config

    @classmethod
    def resolved_preprocessing(cls, config: Any) -> tuple[tuple[float, ...], str]:
        """(spacing, intensity preset) of the cached data; default: the config's own ``spacing`` and ``preset``."""
        return tuple(config.spacing), config.preset

    @classmethod
    def preprocess_min_size(cls, config: Any) -> tuple[int, ...]:
        """Small volumes are padded up to this size (voxels along i, j, k); 0 = no padding."""
        return (0, 0, 0)

    @classmethod
    def preprocess_config(cls, config: Any):  # -> data.PreprocessConfig
        from anatomical_embedding.data.datasets import PreprocessConfig

        spacing, preset = cls.resolved_preprocessing(config)
        return PreprocessConfig(spacing=spacing, preset=preset, min_size=cls.preprocess_min_size(config))

    @classmethod
    def min_image_size(cls, config: Any) -> tuple[int, int, int]:
        return (1, 1, 1)

    @classmethod
    def accepts_2d(cls, config: Any) -> bool:
        return False

    def load_initial_weights(self) -> None:
        return None

    def default_epochs(self) -> int:
        return 100

    def stage_starts(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        """Steps at which the learning-rate schedule restarts (a training stage of its own); ``[0]``: one
        schedule over the whole run. The engine's warm-up runs once, at the start."""
        return [0]

    def case_weights(self, labelled: np.ndarray, epoch: int) -> np.ndarray | None:
        return None

    def make_sample(self, item: dict, rng: np.random.Generator, epoch: int) -> dict:
        raise NotImplementedError

    def collate(self, samples: list[dict]) -> dict:
        return torch.utils.data.default_collate(samples)

    def forward(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def after_optimizer_step(self, ctx: StepContext) -> None:
        return None

    def param_groups(self) -> list[dict]:
        """Optimiser parameter groups: ``{"params": [...], "lr_factor": f(step) -> float or None}``.

        The engine multiplies its own schedule by ``lr_factor`` per group (e.g. a pretrained backbone that is
        frozen, then warmed up, during finetuning). Default: one group with every trainable parameter.
        """
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_factor": None}]

    @property
    def eval_every(self) -> int:
        """Steps between ``evaluate`` calls (0 = the method has no validation)."""
        return 0

    def evaluate(self, dataset: Any, labelled: np.ndarray, ctx: StepContext, device: torch.device) -> dict[str, float]:
        """Validation metrics; ``dataset[n]`` is preprocessed case ``n`` (see ``data.build_dataset``)."""
        return {}

    @property
    def calibration_samples(self) -> int:
        """Training samples the engine passes to :meth:`calibrate_for_inference` before the final checkpoint (a
        stop skips it, to stay fast); 0 = the method needs no calibration."""
        return 0

    def calibrate_for_inference(self, images: Iterable[torch.Tensor]) -> None:
        """Bring inference-only state (e.g. BatchNorm statistics) in line with the embedder's dense input.
        ``images`` yields per-rank batches of ``make_sample(...)["image"]``; every rank calls this together."""
        return None

    def embedder(self) -> Embedder:
        raise NotImplementedError

    def model_info(self) -> dict:
        """Model card: the fields every embedding method records (what ``inference`` reads), then its extras."""
        from anatomical_embedding.io import get_preset

        spacing, preset = self.resolved_preprocessing(self.config)
        emb = self.embedder()
        return {
            "method": self.name, "modality": self.model_modality(), "spacing": [float(s) for s in spacing],
            "intensity_preset": get_preset(preset).to_dict(), "patch_size": self.model_patch_size(),
            "coarse_channels": int(emb.coarse_channels), "fine_channels": int(emb.fine_channels),
            "coarse_stride": int(emb.coarse_stride), "size_multiple": int(emb.size_multiple),
            **self.model_extras(),
        }

    def model_modality(self) -> str:
        """``MR`` for an MRI intensity preset, else ``CT`` (methods with their own modality setting override it)."""
        return "MR" if self.resolved_preprocessing(self.config)[1].startswith("mri") else "CT"

    def model_patch_size(self) -> list[int]:
        """Training patch size along (i, j, k) (inference uses it as the default sliding window)."""
        return [int(p) for p in self.config.patch_size]

    def model_extras(self) -> dict:
        """Method-specific model-card fields (after the common ones)."""
        return {}
