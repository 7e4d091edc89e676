"""HDSSL (Kats et al.): balanced hierarchical dense SSL, a vox2vec-style FPN trained contrastively + restoratively.

* Network: :class:`~anatomical_embedding.nets.hdssl.HDSSLNet`, a vox2vec FPN3d (published HDSSL: base 32
  channels, 5 scales; vox2vec: 16 channels, 6 scales; ``base_channels``/``num_scales``) whose levels are each
  projected by a registered 1x1x1 conv (``scale_proj``) to ``scale_proj_channels`` (Sec. 2.2, "balanced":
  every level the same share of the 5 x 32 = 160-d voxel vector).
* Samples: two overlapping patches per image (``data.patches``), ``n_pos`` positive voxel pairs in the
  overlap (paper: 1000 per pair, 10 pairs per batch). Each patch gets its own Models-Genesis appearance
  augmentation (:mod:`~anatomical_embedding.data.augment_hdssl`, Sec. 2.1); the reconstruction target is the
  un-augmented patch.
* Loss (Sec. 2.3): voxel vector -> 3-layer MLP -> 128-d, L2-normalised; InfoNCE with tau = 0.1 (eq. 1,
  ``losses.hdssl_info_nce``) plus ``rest_weight`` (lambda = 10) times the MSE of a reconstruction head on the
  finest level (eq. 2).
* Dense embedding: the balanced concatenated voxel vector (``HDSSLEmbedder(features="scale_proj")``),
  L2-normalised; fine = all levels at full resolution, coarse = levels ``>= coarse_level`` at stride
  ``2**coarse_level``. The linear-evaluation head (one 1x1x1 conv per level, upsampled and summed) and the
  finetuning schedule need the backbone pyramid: ``embedder().net.backbone`` / ``embedder().pyramid(x)``.

Paper readings and deviations (all configurable):

* Eq. (1) sums over anchors i of one view with denominator ``d(z_A^i, z_B^i) + sum_{j != i} sum_{l in A, B}
  d(z_k^i, z_l^j)``. We read k as the anchor's own view and average the loss over all anchors of both views
  (the published code's ``(info_nce_1 + info_nce_2) / 2`` with means): a constant 1/(2n) times the paper's
  sum. ``negatives="pair"`` (default) takes negatives from the anchor's own patch pair, as eq. (1) and the
  issue say; ``"batch"`` takes all sampled voxels of the whole batch, as the published code does.
* Reconstruction head: the paper says "two convolution layers"; the published code uses one 1x1x1 conv (the
  two-layer version is commented out there). ``rest_head="two_conv"`` (default) is that commented-out head
  (BN-ReLU-Conv3x3(c0 -> c0/2)-BN-ReLU-Conv1x1(-> 1)); ``"linear"`` is the published single conv.
  Eq. (2) is read as the voxel-mean squared error averaged over both views (published code).
* The published ``scale_proj`` convs are an unregistered Python list (never trained or saved); ours are
  registered and trained (see ``nets/hdssl.py``).
* Patches: the published code crops fixed-size integer boxes around a shared anchor voxel; we use the shared
  overlapping-box sampler with ``patch_scale=(1, 1)`` (no rescaling) and a per-axis overlap drawn from
  ``overlap``; its continuous box starts mean trilinear resampling and positives agreeing to half a voxel.
  Positives are drawn without repetition and preferably inside the body (clean intensity >= ``body_threshold``
  on the [0, 1] scale), like the published body-mask sampling; patches with too few distinct overlap voxels
  mask the missing points out of the loss. The published batch holds 10 pairs from one image; our engine
  draws each pair's image independently.
* Patches enter the network in the embedder's RAS-canonical layout (``blocks.AxisLayout``), the layout
  ``HDSSLEmbedder`` feeds it at inference, so training and inference see the same orientation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anatomical_embedding.io.settings import ranged
from anatomical_embedding.data.augment_hdssl import GenesisConfig, genesis_augment
from anatomical_embedding.nets.blocks import AxisLayout, layout_for_direction
from anatomical_embedding.nets.hdssl import HDSSLConfig, HDSSLEmbedder, HDSSLNet
from anatomical_embedding.data.patches import PatchPairConfig, sample_patch_pair
from anatomical_embedding.losses import hdssl_info_nce
from anatomical_embedding.methods.base import Method, Preprocessing, StepContext, patch_min_size, resolve_preprocessing

#: modality -> (spacing along (i, j, k) in mm, intensity preset), paper Sec. 3.1.
MODALITY_DEFAULTS: dict[str, Preprocessing] = {
    "ct": ((1.0, 1.0, 2.0), "ct_hdssl"),  # 1 x 1 x 2 mm, [-1350, 1000] HU -> [0, 1]
    "mri": ((1.5, 1.5, 1.5), "mri_percentile"),  # 1.5 mm isotropic, 0.01/99.9 percentiles -> [0, 1]
}


@dataclass
class HDSSLMethodConfig:
    modality: str = "ct"  # ct | mri: default spacing and intensity preset (paper Sec. 3.1)
    spacing: tuple[float, ...] = ranged((), 1e-06)  # mm along (i, j, k); () = the modality's default
    preset: str = ""  # intensity preset name; "" = the modality's default
    # §3.1: each CT is cropped to the box of its voxels above body_crop_hu (-500 HU: the body) before
    # resampling. Applies to modality "ct" only (MR intensities have no absolute scale).
    body_crop: bool = True
    body_crop_hu: float = -500.0
    # Network (published: 32 channels, 5 scales = vox2vec's 16 x 6 one level shallower with doubled widths).
    base_channels: int = ranged(32, 1)
    num_scales: int = ranged(5, 1)
    scale_proj_channels: int = ranged(32, 1)
    proj_dim: int = ranged(128, 1)
    rest_head: str = "two_conv"  # two_conv (paper) | linear (published code)
    coarse_level: int = ranged(3, 0)  # coarse embedding = levels coarse_level.. at stride 2**coarse_level
    # Sampling.
    patch_size: tuple[int, int, int] = ranged((128, 128, 32), 1)  # voxels along (i, j, k) (published (x, y, z) patch)
    patch_scale: tuple[float, float] = ranged((1.0, 1.0), 1e-06)  # no rescaling (published crops)
    overlap: tuple[float, float] = ranged((0.2, 1.0), 0.0, 1.0)  # per-axis overlap / patch side
    n_pos: int = ranged(1000, 1)  # positive pairs per patch pair (paper)
    body_threshold: float = ranged(0.17, 0.0, 1.0)  # prefer positives with clean intensity >= this ([0, 1]; CT ~ -950 HU)
    # Loss.
    temperature: float = ranged(0.1, 1e-06)  # paper
    rest_weight: float = ranged(10.0, 0)  # lambda (paper)
    negatives: str = "pair"  # pair (eq. 1) | batch (published code)
    # Appearance augmentation (Models Genesis; probabilities as published, see data/augment_hdssl.py).
    augment: bool = True
    shuffle_prob: float = ranged(0.8, 0.0, 1.0)
    shuffle_block_fraction: float = ranged(0.05, 0.0, 1.0)
    shuffle_coverage: float = ranged(0.3, 0.0, 1.0)
    nonlinear_prob: float = ranged(0.9, 0.0, 1.0)
    nonlinear_invert_prob: float = ranged(0.0, 0.0, 1.0)
    paint_prob: float = ranged(0.9, 0.0, 1.0)
    outpaint_share: float = ranged(0.2, 0.0, 1.0)


class ReconstructionHead(nn.Sequential):
    """The paper's two-convolution head (the published code's commented-out ``rest_head``)."""

    def __init__(self, channels: int) -> None:
        hidden = max(1, channels // 2)
        super().__init__(
            nn.BatchNorm3d(channels), nn.ReLU(), nn.Conv3d(channels, hidden, kernel_size=3, padding=1),
            nn.BatchNorm3d(hidden), nn.ReLU(), nn.Conv3d(hidden, 1, kernel_size=1),
        )


def points_to_layout(points: np.ndarray, size_kji: tuple[int, int, int], layout: AxisLayout) -> np.ndarray:
    """(P, 3) voxel indices (k, j, i) of a patch -> indices in ``layout`` (as ``layout.to_network`` moves voxels)."""
    out = np.empty_like(points)
    for n, (src, flip) in enumerate(zip(layout.perm, layout.flips)):
        out[:, n] = size_kji[src] - 1 - points[:, src] if flip else points[:, src]
    return out


def select_points(points_a: np.ndarray, points_b: np.ndarray, clean_a: np.ndarray, n: int, threshold: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` distinct positive pairs out of the candidates, body voxels first; returns (a, b, valid mask)."""
    order = rng.permutation(len(points_a))
    pa, pb = points_a[order], points_b[order]

    def first_occurrence(p: np.ndarray) -> np.ndarray:
        keep = np.zeros(len(p), dtype=bool)
        keep[np.unique(np.ravel_multi_index(p.T, clean_a.shape), return_index=True)[1]] = True
        return keep

    distinct = first_occurrence(pa) & first_occurrence(pb)
    body = clean_a[pa[:, 0], pa[:, 1], pa[:, 2]] >= threshold
    ranked = np.concatenate([np.flatnonzero(distinct & body), np.flatnonzero(distinct & ~body)])[:n]
    valid = np.zeros(n, dtype=bool)
    valid[: len(ranked)] = True
    out_a, out_b = np.zeros((n, 3), dtype=np.int64), np.zeros((n, 3), dtype=np.int64)
    out_a[: len(ranked)], out_b[: len(ranked)] = pa[ranked], pb[ranked]
    return out_a, out_b, valid


class HDSSLMethod(Method):
    name = "hdssl"
    Config = HDSSLMethodConfig
    compile_targets = ("net",)

    #: Candidate positives drawn per wanted one (duplicates and background are dropped).
    oversample = 3

    def __init__(self, config: HDSSLMethodConfig) -> None:
        super().__init__(config)
        c = config
        if c.modality not in MODALITY_DEFAULTS:
            raise ValueError(f"HDSSL modality must be one of {sorted(MODALITY_DEFAULTS)}, got {c.modality!r}")
        if c.negatives not in ("pair", "batch"):
            raise ValueError(f"HDSSL negatives must be 'pair' or 'batch', got {c.negatives!r}")
        if c.rest_head not in ("two_conv", "linear"):
            raise ValueError(f"HDSSL rest_head must be 'two_conv' or 'linear', got {c.rest_head!r}")
        if not 0 <= c.coarse_level < c.num_scales:
            raise ValueError(f"HDSSL coarse_level must be in [0, {c.num_scales - 1}], got {c.coarse_level}")
        multiple = 2 ** (c.num_scales - 1)
        if any(int(p) % multiple for p in c.patch_size):
            raise ValueError(f"HDSSL patch_size {list(c.patch_size)} must be multiples of {multiple} "
                             f"(2 ** (num_scales - 1)) so that every pyramid level tiles the patch")
        self.net = HDSSLNet(HDSSLConfig(
            in_channels=1, base_channels=c.base_channels, num_scales=c.num_scales,
            scale_proj_channels=c.scale_proj_channels, proj_hidden=c.num_scales * c.scale_proj_channels,
            proj_out=c.proj_dim))
        if c.rest_head == "two_conv":
            self.net.rest_head = ReconstructionHead(c.base_channels)
        # The layout HDSSLEmbedder feeds the network at inference (identity-direction LPS volume -> RAS).
        self.layout = layout_for_direction(np.eye(3), HDSSLEmbedder.input_layout)
        self.genesis = GenesisConfig(
            shuffle_prob=c.shuffle_prob, shuffle_block_fraction=c.shuffle_block_fraction,
            shuffle_coverage=c.shuffle_coverage, nonlinear_prob=c.nonlinear_prob,
            nonlinear_invert_prob=c.nonlinear_invert_prob, paint_prob=c.paint_prob, outpaint_share=c.outpaint_share)

    # ----------------------------------------------------------------- data
    @classmethod
    def resolved_preprocessing(cls, config: HDSSLMethodConfig) -> Preprocessing:
        if config.modality not in MODALITY_DEFAULTS:
            raise ValueError(f"HDSSL modality must be one of {sorted(MODALITY_DEFAULTS)}, got {config.modality!r}")
        return resolve_preprocessing(MODALITY_DEFAULTS[config.modality], config.spacing, config.preset, "HDSSL")

    @classmethod
    def preprocess_min_size(cls, config: HDSSLMethodConfig) -> tuple[int, ...]:
        return patch_min_size(config.patch_size, config.patch_scale)

    @classmethod
    def preprocess_config(cls, config: HDSSLMethodConfig):
        from dataclasses import replace

        crop = float(config.body_crop_hu) if config.body_crop and config.modality == "ct" else None
        return replace(super().preprocess_config(config), body_crop_hu=crop)

    @classmethod
    def min_image_size(cls, config: HDSSLMethodConfig) -> tuple[int, int, int]:
        return tuple(config.patch_size)

    def default_epochs(self) -> int:
        return 200  # 50K steps (paper) at 2500 cases and 10 pairs per step

    def make_sample(self, item: dict, rng: np.random.Generator, epoch: int) -> dict:
        c = self.config
        size_kji = tuple(int(p) for p in c.patch_size[::-1])
        cfg = PatchPairConfig(size_kji, self.oversample * c.n_pos, tuple(c.patch_scale), tuple(c.overlap))
        pair = sample_patch_pair(item["image"], cfg, rng)
        clean_a, clean_b = pair["patch_a"][0].numpy(), pair["patch_b"][0].numpy()
        pa, pb, valid = select_points(pair["points_a"].numpy(), pair["points_b"].numpy(), clean_a, c.n_pos,
                                      c.body_threshold, rng)
        out = {"point_mask": torch.from_numpy(valid)}
        for key, clean, pts in (("a", clean_a, pa), ("b", clean_b, pb)):
            net_clean = self.layout.to_network(clean)
            aug = genesis_augment(net_clean, rng, self.genesis) if c.augment else net_clean
            out[f"patch_{key}"] = torch.from_numpy(np.ascontiguousarray(aug, dtype=np.float32))[None]
            out[f"clean_{key}"] = torch.from_numpy(np.ascontiguousarray(net_clean, dtype=np.float32))[None]
            out[f"points_{key}"] = torch.from_numpy(points_to_layout(pts, size_kji, self.layout))
        return out

    # ----------------------------------------------------------------- training
    @staticmethod
    def gather(levels: list[torch.Tensor], points: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Balanced voxel vectors: for sample ``first + s`` and point p, the concatenation over levels L of
        ``levels[L][first + s, :, v // 2**L]`` with ``v = points[s, p]``; (N, P, sum of channels)."""
        bidx = torch.arange(points.shape[0], device=points.device)[:, None] + first
        parts = []
        for level, fmap in enumerate(levels):
            v = torch.div(points, 2**level, rounding_mode="floor")
            parts.append(fmap[bidx, :, v[..., 0], v[..., 1], v[..., 2]])  # advanced indices first: (N, P, C)
        return torch.cat(parts, dim=-1)

    def _embed(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """proj_head on the valid rows only (its BatchNorm must not see padding); zeros elsewhere."""
        n, p, _ = vectors.shape
        flat_mask = mask.reshape(-1)
        z = self.net.project(vectors.reshape(n * p, -1)[flat_mask]).float()
        rows = torch.nonzero(flat_mask).squeeze(1)
        return z.new_zeros(n * p, z.shape[1]).index_put((rows,), z).reshape(n, p, -1)

    def forward(self, batch: dict, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        a, b = batch["patch_a"], batch["patch_b"]
        n = a.shape[0]
        pyramid = self.net(torch.cat([a, b]))  # both augmented views in one pass
        balanced = self.net.project_pyramid(pyramid)
        mask = batch["point_mask"].bool()
        z_a = self._embed(self.gather(balanced, batch["points_a"], 0), mask)
        z_b = self._embed(self.gather(balanced, batch["points_b"], n), mask)
        if self.config.negatives == "batch":
            z_a, z_b, mask = z_a.reshape(1, -1, z_a.shape[-1]), z_b.reshape(1, -1, z_b.shape[-1]), mask.reshape(1, -1)
        contrastive = hdssl_info_nce(z_a, z_b, mask, self.config.temperature)
        restored = self.net.reconstruct(pyramid).float()
        target = torch.cat([batch["clean_a"], batch["clean_b"]]).float()
        restorative = F.mse_loss(restored, target)  # both views have the same size: the mean of the two MSEs
        loss = contrastive + self.config.rest_weight * restorative
        return loss, {"contrastive": contrastive.detach(), "restorative": restorative.detach()}

    # ----------------------------------------------------------------- export
    def embedder(self) -> HDSSLEmbedder:
        return HDSSLEmbedder(self.net, features="scale_proj", coarse_level=self.config.coarse_level)

    def model_modality(self) -> str:
        return self.config.modality.upper()

    def model_extras(self) -> dict:
        c = self.config
        return {"features": "scale_proj", "base_channels": int(c.base_channels), "num_scales": int(c.num_scales),
                "input_layout": HDSSLEmbedder.input_layout}
