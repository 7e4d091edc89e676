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
  of the cached data; ``min_image_size(config)``: smallest usable volume (i, j, k voxels), checked
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
  ``model_info()``: method-specific model-card fields (spacing, preset, patch size, channels).

How the other methods fit: Adam/Eve keeps a momentum encoder plus a memory bank (buffers; keys enqueued in
``after_optimizer_step``, pruned per query in ``forward``) and draws a decomposer part of one image and two
views of it in ``make_sample``; AnatoMask keeps
an EMA teacher (``after_optimizer_step``) whose reconstruction error guides the mask drawn in
``forward``; HDSSL samples overlapping patch pairs (``data.patches``) and returns the contrastive
and restorative terms in ``terms``. None needs an engine special case.
"""
from __future__ import annotations

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
    def preprocess_config(cls, config: Any):  # -> data.PreprocessConfig
        raise NotImplementedError

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

    def embedder(self) -> Embedder:
        raise NotImplementedError

    def model_info(self) -> dict:
        return {}
