"""AnatoMask (Li et al.): reconstruction-guided self-masking MIM with an EMA teacher, on STU-Net.

* Network: :class:`~anatomical_embedding.nets.spark.SparKSTUNet`, the STU-Net encoder (B widths 32..512 by
  default; ``widths``/``depths`` give S, L, H or tiny test nets) run sparsely on the masked input, densified
  with learned mask tokens and decoded by SparK's hierarchical light decoder (paper Sec. 3.2).
* Masks: the patch is divided into a grid at 1/16 resolution (the encoder's stride); gamma = 0.6 of the grid
  cells are masked (``len_keep = round(L (1 - gamma))`` visible, as published).
* Teacher (Sec. 3.1, eq. 1): an EMA copy of the whole student, updated after every optimiser step; the decay
  rises linearly from 0.999 to 0.9999 over the first quarter of training, then stays (published script).
  The teacher reconstructs the input under a random initial mask and scores every masked patch.
* Final mask (Algorithm 1): the ``int(r_t * n_masked)`` highest-loss masked patches of the teacher, then the
  rest of the gamma budget drawn uniformly from all other patches. ``r_t = r0 + (t / T)(rT - r0)`` (eq. 3),
  r0 = 0, rT = 0.5 (easy to hard).
* Loss (eq. 2 as implemented): per-patch normalised MSE on the student's masked patches only
  (:func:`~anatomical_embedding.losses.masked_patch_loss`).
* Data: 1.5 mm isotropic, z-score (``ct_zscore``), random 112 x 112 x 128 crops with random flips only.

Dense embedding (:class:`AnatoMaskEmbedder`): the dense (all-visible) student; with a stride-16 encoder the
layers are

* ``coarse`` (stride 8): the densified 1/16 bottleneck (decoder input 0, encoder stage 4, nearest x2) and
  decoder block 0's output (1/8);
* ``fine`` (input resolution): the outputs of decoder blocks 0..3 (1/8, 1/4, 1/2, 1/1), nearest-upsampled.

Each layer is L2-normalised per voxel (so every scale weighs the same, HDSSL's "balanced" idea), the
concatenation is multiplied by a fixed orthonormal random projection to ``coarse_dim``/``fine_dim`` channels
(a Johnson-Lindenstrauss map: cosine similarities are kept approximately; reconstruction gives no signal to
train a learned projection) and L2-normalised. ``*_dim = 0`` keeps the plain concatenation.

Readings and deviations (all configurable):

* Teacher score: the paper applies eq. (2) ("reconstruction loss ... by subtracting with input"); the
  published script instead compares the teacher's output with the *raw* (unnormalised) patches.
  ``teacher_loss = "normalized"`` (default, the paper) or ``"raw"`` (published script).
* Algorithm 1 writes ``p = ceil(r_t n)`` over all n regions while the text selects ``r_t gamma V`` voxels; we
  follow the text and the published ``int((L - len_keep) r_t)``: r_t is a share of the *masked* patches.
* Eq. (2) as printed averages the raw squared error over all H W D voxels (target ``(1 - M) V``); the
  issue and the published SparK code use the per-patch normalised MSE over masked patches, which we use.
* ``t / T`` counts optimiser steps (the published script counts epochs, a staircase of the same line); the
  EMA ramp likewise runs over the first ``ema_ramp`` share of the steps.
* Published ``SparseInstanceNorm`` pools the visible voxels of the whole batch into one instance; we use
  per-sample statistics (see ``nets/stunet.py``). The published pretraining encoder has STU-Net stages 0..4
  (the stride-1 stage 5 is left out), kept here; the segmentation STU-Net (``segmentation_network``, used by
  ``finetune --mode backbone``) gets stages 0..4 from the student, stage 5 and its decoder start fresh.
* The published script also applies nnU-Net's rotation (+-30 deg) and scaling (0.7-1.4), each with p = 0.2,
  despite "random cropping and flipping only" in the paper; we follow the paper. It excludes the mask tokens
  from weight decay; the engine decays every parameter (wd = 1e-5, negligible). Teacher BatchNorm running
  statistics are copied from the student (timm's ModelEma averages them). The published teacher runs in eval
  mode, i.e. its decoder BatchNorm uses running statistics gathered with the *student's* weights; with the
  lagging EMA weights that mismatch made the teacher worse than predicting zero in our short runs (held-out
  eq. (2) 1.07 vs 0.86 with batch statistics, student 0.82), so ``teacher_bn = "batch"`` (default) normalises
  the teacher with its own batch statistics; ``"running"`` is the published behaviour.
* Schedule: the published script defines a 20-epoch warm-up but runs plain per-epoch cosine; we warm up
  (``train.warmup_steps`` in the TOML, 20 epochs of TotalSegmentator's training split) then cosine, per step.
* Dense BatchNorm calibration (ours, ``bn_calibration_samples``): the published code exports the decoder with
  the running statistics of masked training inputs; we re-estimate them on dense inputs before the final
  checkpoint (phantoms: held-out landmarks 78.5 -> 76.2 mm; see ``calibrate_for_inference``).
* z-score: per volume (``ct_zscore``); nnU-Net's CT scheme (dataset percentiles, mean, std) would need
  dataset statistics the cache does not keep.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn

from anatomical_embedding.io.settings import ranged
from anatomical_embedding.nets.blocks import upsample_to
from anatomical_embedding.losses import masked_patch_loss
from anatomical_embedding.nets.spark import SparKSTUNet, patchify
from anatomical_embedding.nets.stunet import STUNET_SIZES, STUNET_STRIDES, STUNet, STUNetConfig
from anatomical_embedding.methods.momentum import make_momentum_copy, momentum_update
from anatomical_embedding.methods.base import Method, Preprocessing, StepContext
from anatomical_embedding.nets.embedder import Embedder


@dataclass
class AnatoMaskConfig:
    # Network: STU-Net B (published widths); stages 0..4 are pretrained (published).
    widths: tuple[int, ...] = ranged(STUNET_SIZES["B"][0], 1)
    depths: tuple[int, ...] = ranged(STUNET_SIZES["B"][1], 1)
    # Data (paper Sec. 4.1).
    spacing: tuple[float, float, float] = ranged((1.5, 1.5, 1.5), 1e-06)  # mm along (i, j, k)
    preset: str = "ct_zscore"
    # Voxels along (i, j, k), multiples of 16. The published (112, 112, 128) is in nnU-Net array order; we read
    # the 128 as the cranio-caudal k axis (ambiguous in the paper).
    patch_size: tuple[int, int, int] = ranged((112, 112, 128), 1)
    flip_prob: float = ranged(0.5, 0.0, 1.0)  # per axis (nnU-Net MirrorTransform)
    # Masking (Sec. 3.2, 3.3).
    mask_ratio: float = ranged(0.6, 0.0, 1.0)  # gamma
    r0: float = ranged(0.0, 0.0, 1.0)
    rT: float = ranged(0.5, 0.0, 1.0)
    teacher_loss: str = "normalized"  # normalized (paper, eq. 2) | raw (published script)
    teacher_bn: str = "batch"  # batch: teacher BatchNorm on batch statistics | running: eval mode (published)
    # EMA teacher (published script: 0.999 -> 0.9999 over the first quarter of training).
    ema_start: float = ranged(0.999, 0.0, 1.0)
    ema_end: float = ranged(0.9999, 0.0, 1.0)
    ema_ramp: float = ranged(0.25, 0.0, 1.0)
    # Dense embedding (fixed random projections; 0 = plain concatenation).
    coarse_dim: int = ranged(128, 0)
    fine_dim: int = ranged(128, 0)
    proj_seed: int = 0
    # Ours: training patches whose dense (all-visible) forward passes re-estimate the decoder's BatchNorm
    # statistics before the final checkpoint (0 = keep the masked-input statistics of training).
    bn_calibration_samples: int = ranged(32, 0)


def masking_ratio_rt(step: int, total_steps: int, r0: float = 0.0, rT: float = 0.5) -> float:
    """Eq. (3): ``r_t = r0 + (t / T)(rT - r0)`` with t the step and T the total steps (t / T clipped to 1)."""
    frac = min(1.0, max(0.0, step / max(1, total_steps)))
    return float(r0 + frac * (rT - r0))


def ema_decay(step: int, total_steps: int, start: float = 0.999, end: float = 0.9999, ramp: float = 0.25) -> float:
    """Teacher decay: linear from ``start`` to ``end`` over the first ``ramp`` share of training, then ``end``."""
    ramp_steps = ramp * max(1, total_steps)
    if ramp_steps <= 0 or step >= ramp_steps:
        return float(end)
    return float(start + (step / ramp_steps) * (end - start))


def n_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample (published ``len_keep = round(L (1 - gamma))``)."""
    return round(num_patches * (1.0 - mask_ratio))


def random_mask(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """SparK's random mask from per-patch noise (N, *grid): the ``len_keep`` lowest-noise patches are visible.

    Returns ``active`` (N, 1, *grid) bool, True = visible.
    """
    n, grid = noise.shape[0], tuple(noise.shape[1:])
    flat = noise.reshape(n, -1)
    keep = flat.argsort(dim=1)[:, : n_visible(flat.shape[1], mask_ratio)]
    active = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, keep, True)
    return active.view(n, 1, *grid)


def anatomask_mask(teacher_loss: torch.Tensor, initial_active: torch.Tensor, fill_noise: torch.Tensor,
                   mask_ratio: float, r_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1: the final mask from the teacher's per-patch losses.

    ``teacher_loss`` (N, L) per patch (only patches masked in ``initial_active`` are ranked);
    ``fill_noise`` (N, *grid) uniform noise for the random fill. Of ``n_mask = L - len_keep`` masked patches,
    ``int(r_t * n_mask)`` are the teacher's highest-loss masked patches (``M_top``); the remaining budget takes
    the lowest-noise patches among all others (``M_random``). Returns ``(active, top)``: ``active`` (N, 1, *grid)
    bool (True = visible) and ``top`` (N, n_top) flat indices of ``M_top``.
    """
    n, grid = fill_noise.shape[0], tuple(fill_noise.shape[1:])
    num = int(np.prod(grid))
    n_mask = num - n_visible(num, mask_ratio)
    n_top = min(n_mask, int(r_t * n_mask + 1e-9))  # published int(); the epsilon absorbs float error
    was_masked = ~initial_active.reshape(n, -1)
    score = teacher_loss.reshape(n, -1).float().masked_fill(~was_masked, float("-inf"))
    top = score.argsort(dim=1, descending=True)[:, :n_top]
    fill = fill_noise.reshape(n, -1).float().clone()
    fill.scatter_(1, top, float("-inf"))  # M_top first, then the lowest-noise others
    masked = fill.argsort(dim=1)[:, :n_mask]
    active = torch.ones(n, num, dtype=torch.bool, device=fill.device).scatter_(1, masked, False)
    return active.view(n, 1, *grid), top


def _orthonormal_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor:
    """(out_dim, in_dim) with orthonormal rows; numpy PCG64 + sign-fixed QR, so every platform builds the same."""
    g = np.random.default_rng([seed, in_dim, out_dim]).standard_normal((in_dim, out_dim))
    q, r = np.linalg.qr(g)
    q = q * np.sign(np.diag(r))[None, :]
    return torch.from_numpy(np.ascontiguousarray(q.T, dtype=np.float32))


class AnatoMaskEmbedder(Embedder):
    """Dense embedder from the (all-visible) SparK STU-Net; see the module docstring for the layers."""

    def __init__(self, net: SparKSTUNet, coarse_dim: int = 128, fine_dim: int = 128, seed: int = 0) -> None:
        super().__init__()
        self.net = net
        ds = net.downsample_ratio
        dec_ch = net.decoder.channels  # [1/16 input, block0 out (1/8), block1 (1/4), ...]
        self.size_multiple = ds
        self.coarse_stride = ds // 2
        # (channels, stride) of the layers: coarse = densified 1/16 input + block 0; fine = all blocks.
        self._coarse_layers = [(dec_ch[0], ds), (dec_ch[1], ds // 2)]
        self._fine_layers = [(c, ds // 2 ** (i + 1)) for i, c in enumerate(dec_ch[1:])]
        for name, layers, dim in (("coarse", self._coarse_layers, coarse_dim), ("fine", self._fine_layers, fine_dim)):
            total = sum(c for c, _ in layers)
            out = total if dim <= 0 or dim >= total else int(dim)
            setattr(self, f"{name}_channels", out)
            proj = _orthonormal_projection(total, out, seed) if out < total else torch.zeros(0)
            self.register_buffer(f"{name}_proj", proj, persistent=False)
            setattr(self, f"_{name}_projected", out < total)  # a Python bool: no tensor test while tracing

    def _embed(self, maps: list[torch.Tensor], layers, proj: torch.Tensor, projected: bool, out_stride: int,
               size: tuple[int, ...]) -> torch.Tensor:
        grid = tuple(s // out_stride for s in size)
        parts, offset = [], 0
        for fmap, (ch, stride) in zip(maps, layers):
            f = F.normalize(fmap.float(), dim=1)
            if projected:  # project at the layer's own resolution (commutes with nearest upsampling)
                w = proj[:, offset: offset + ch]
                f = F.conv3d(f, w[:, :, None, None, None])
            offset += ch
            parts.append(upsample_to(f, stride // out_stride, grid))
        out = torch.stack(parts).sum(0) if projected else torch.cat(parts, dim=1)
        return F.normalize(out, dim=1)

    def _check(self, image: torch.Tensor) -> tuple[int, ...]:
        size = tuple(image.shape[-3:])
        if not torch.jit.is_tracing() and any(s % self.size_multiple for s in size):
            raise ValueError(f"input size {size} must be a multiple of {self.size_multiple} per axis; "
                             "pad it first (io.pad_to_multiple)")
        return size

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self._check(image)
        to_dec = self.net.densified(image)
        blocks = self.net.decoder.forward_features(to_dec)
        coarse = self._embed([to_dec[0], blocks[0]], self._coarse_layers, self.coarse_proj, self._coarse_projected,
                             self.coarse_stride, size)
        fine = self._embed(blocks, self._fine_layers, self.fine_proj, self._fine_projected, 1, size)
        return coarse, fine

    def forward_coarse(self, image: torch.Tensor) -> torch.Tensor:
        """Coarse output alone: the decoder stops after block 0 (export uses it for coarse.onnx)."""
        size = self._check(image)
        to_dec = self.net.densified(image, n_levels=1)
        block0 = self.net.decoder.forward_features(to_dec, n_blocks=1)[0]
        return self._embed([to_dec[0], block0], self._coarse_layers, self.coarse_proj, self._coarse_projected,
                           self.coarse_stride, size)


class _DenseDecoder(torch.nn.Module):
    """The student's decoder features on an all-visible input: the path the embedder runs."""

    def __init__(self, net: SparKSTUNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.net.decoder.forward_features(self.net.densified(image.float()))


class AnatoMaskMethod(Method):
    name = "anatomask"
    Config = AnatoMaskConfig
    compile_targets = ("student",)

    def __init__(self, config: AnatoMaskConfig) -> None:
        super().__init__(config)
        c = config
        if not 0.0 < c.mask_ratio < 1.0:
            raise ValueError(f"AnatoMask mask_ratio (gamma) must be in (0, 1), got {c.mask_ratio}")
        if not (0.0 <= c.r0 <= 1.0 and 0.0 <= c.rT <= 1.0):
            raise ValueError(f"AnatoMask r0 and rT must be in [0, 1], got {c.r0}, {c.rT}")
        if c.teacher_loss not in ("normalized", "raw"):
            raise ValueError(f"AnatoMask teacher_loss must be 'normalized' or 'raw', got {c.teacher_loss!r}")
        if c.teacher_bn not in ("batch", "running"):
            raise ValueError(f"AnatoMask teacher_bn must be 'batch' or 'running', got {c.teacher_bn!r}")
        if len(c.widths) != 6 or len(c.depths) != 6:
            raise ValueError(f"AnatoMask needs six STU-Net widths and depths (published layout), got "
                             f"{list(c.widths)} and {list(c.depths)}")
        self.student = SparKSTUNet(STUNetConfig(tuple(c.widths), tuple(c.depths), STUNET_STRIDES), encoder_stages=5)
        self.patch = self.student.downsample_ratio
        if any(int(p) % self.patch for p in c.patch_size):
            raise ValueError(f"AnatoMask patch_size {list(c.patch_size)} must be multiples of {self.patch} "
                             "(the mask grid is at 1/16 resolution)")
        self.teacher = make_momentum_copy(self.student)
        self.teacher.eval()

    def train(self, mode: bool = True) -> AnatoMaskMethod:
        super().train(mode)
        self.teacher.eval()  # BatchNorm mode of the teacher is set per call (``teacher_bn``)
        return self

    # ----------------------------------------------------------------- data
    @classmethod
    def resolved_preprocessing(cls, config: AnatoMaskConfig) -> Preprocessing:
        return tuple(float(s) for s in config.spacing), config.preset

    @classmethod
    def preprocess_min_size(cls, config: AnatoMaskConfig) -> tuple[int, ...]:
        return tuple(int(p) for p in config.patch_size)  # crops only: pad to one patch

    @classmethod
    def min_image_size(cls, config: AnatoMaskConfig) -> tuple[int, int, int]:
        return tuple(int(p) for p in config.patch_size)

    def default_epochs(self) -> int:
        return 1000  # paper: 1000 pretraining epochs

    def grid_size(self) -> tuple[int, int, int]:
        """Mask grid (k, j, i) of a training patch."""
        return tuple(int(p) // self.patch for p in self.config.patch_size[::-1])

    def make_sample(self, item: dict, rng: np.random.Generator, epoch: int) -> dict:
        """Random crop and random flips (the only augmentations), plus the noise that draws the masks."""
        image = item["image"]
        image = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        size = tuple(int(p) for p in self.config.patch_size[::-1])  # (k, j, i)
        if any(s < p for s, p in zip(image.shape, size)):
            raise ValueError(f"volume {tuple(image.shape)} (k, j, i) is smaller than the patch {size}; "
                             "preprocess with min_size = patch_size")
        starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape, size)]
        patch = image[tuple(slice(a, a + p) for a, p in zip(starts, size))]
        flips = [ax for ax in range(3) if rng.random() < self.config.flip_prob]
        if flips:
            patch = np.flip(patch, axis=flips)
        grid = self.grid_size()
        return {
            "image": torch.from_numpy(np.ascontiguousarray(patch, dtype=np.float32))[None],
            "noise_init": torch.from_numpy(rng.random(grid).astype(np.float32)),
            "noise_fill": torch.from_numpy(rng.random(grid).astype(np.float32)),
        }

    # ----------------------------------------------------------------- training
    def rt(self, ctx: StepContext) -> float:
        return masking_ratio_rt(ctx.step, ctx.total_steps, self.config.r0, self.config.rT)

    @torch.no_grad()
    def teacher_patch_loss(self, image: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """(N, L) the teacher's reconstruction error per patch under ``active`` (zero at visible patches)."""
        self.teacher.train(self.config.teacher_bn == "batch")
        try:
            rec = self.teacher(image, active)
        finally:
            self.teacher.eval()
        if self.config.teacher_loss == "normalized":
            return masked_patch_loss(image, rec, active, self.patch)[1]
        err = ((patchify(rec.float(), self.patch) - patchify(image.float(), self.patch)) ** 2).mean(-1)
        return err * (~active.reshape(active.shape[0], -1)).to(err.dtype)

    def final_mask(self, image: torch.Tensor, noise_init: torch.Tensor, noise_fill: torch.Tensor, r_t: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(final_active, top, teacher_losses)``: teacher scores under the initial random mask, Algorithm 1."""
        initial = random_mask(noise_init, self.config.mask_ratio)
        losses = self.teacher_patch_loss(image, initial)
        active, top = anatomask_mask(losses, initial, noise_fill, self.config.mask_ratio, r_t)
        return active, top, losses

    def forward(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = batch["image"]
        r_t = self.rt(ctx)
        active, _, t_losses = self.final_mask(image, batch["noise_init"], batch["noise_fill"], r_t)
        rec = self.student(image, active)
        loss, _ = masked_patch_loss(image, rec, active, self.patch)
        num = t_losses.shape[1]
        n_scored = t_losses.shape[0] * (num - n_visible(num, self.config.mask_ratio))
        return loss, {"teacher_rec": (t_losses.sum() / n_scored).detach(),
                      "r_t": torch.tensor(r_t, dtype=torch.float32)}

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        c = self.config
        momentum_update(self.student, self.teacher, ema_decay(ctx.step, ctx.total_steps, c.ema_start, c.ema_end,
                                                              c.ema_ramp))

    # ----------------------------------------------------------------- export
    @property
    def calibration_samples(self) -> int:
        return int(self.config.bn_calibration_samples)

    @torch.no_grad()
    def calibrate_for_inference(self, images: Iterable[torch.Tensor]) -> None:
        """Re-estimate the student decoder's BatchNorm statistics on dense inputs (what the embedder sees).

        Training feeds the decoder densified *masked* features, so its running statistics describe mask
        tokens, not anatomy. ``update_bn`` resets them and takes the cumulative average of the per-batch
        statistics (momentum None) over ``images``, in fp32. Only running statistics change: in training mode
        BatchNorm uses batch statistics, so a resumed run trains exactly as before.
        """
        dense = _DenseDecoder(self.student).train(self.student.training)  # update_bn restores this mode
        update_bn(images, dense)

    def embedder(self) -> AnatoMaskEmbedder:
        c = self.config
        return AnatoMaskEmbedder(self.student, c.coarse_dim, c.fine_dim, c.proj_seed)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The student's STU-Net encoder weights (``conv_blocks_context.*``) for segmentation fine-tuning."""
        return self.student.encoder.state_dict()

    def segmentation_network(self, n_classes: int) -> STUNet:
        """The full STU-Net for ``finetune --mode backbone``: stages 0..4 from the student, the stride-1 stage 5
        and the decoder freshly initialised (as the published fine-tuning loads SparK weights)."""
        c = self.config
        net = STUNet(n_classes, STUNetConfig(tuple(c.widths), tuple(c.depths), STUNET_STRIDES))
        loaded = set(net.load_pretrained_encoder(self.encoder_state_dict()))
        # The copied weights are new tensors: name them, so finetuning's freeze-then-ramp schedule finds them.
        net.pretrained_parameter_names = sorted(n for n, _ in net.named_parameters() if n in loaded)
        return net.to(next(self.student.parameters()).device)

    def model_extras(self) -> dict:
        c = self.config
        return {"widths": [int(w) for w in c.widths], "depths": [int(d) for d in c.depths], "backbone": "STU-Net"}


__all__ = [
    "AnatoMaskConfig",
    "AnatoMaskEmbedder",
    "AnatoMaskMethod",
    "anatomask_mask",
    "ema_decay",
    "masking_ratio_rt",
    "n_visible",
    "random_mask",
]
