"""HDSSL (Kats et al., hierarchical dense SSL): FPN backbone, pretraining heads, dense embedder.

Reference: ``multimodallearning/hierarchical-dense-ssl@30f7f69``. The backbone (``hb_ssl/nn/fpn.py``) is a
verbatim copy of vox2vec's FPN3d (``blocks.FPN3d``), published as ``FPN3d(1, base_channels=32,
num_scales=5)``. The heads follow ``hb_ssl/pretrain/model.py: Vox2Vec`` with one deliberate fix: the reference
keeps ``scale_proj`` in a plain Python list, so those 1x1 convs are never registered, saved or optimised (and
are built with ``.cuda()``); here they are an ``nn.ModuleList`` and train with the rest. Consequently the
published checkpoints contain only the backbone, and only its pyramid is usable from them (the 160-d embedding
of the published models used random, unsaved projections).

Array layout: like vox2vec, RAS-canonical (x, y, z) arrays (see ``blocks.AxisLayout``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anatomical_embedding.io.intensity import IntensityPreset
from anatomical_embedding.nets.blocks import AxisLayout, FPN3d, PyramidEmbedder, select_from_pyramid

_COMMON_INFO: dict = {
    "method": "hdssl",
    "network": "FPN3d(in_channels=1, base_channels=32, num_scales=5)",
    "input_layout": "RAS",  # array axes (x, y, z) increasing toward R, A, S (repo's reorient_nii)
    "patch_size": (128, 128, 32),  # along (x, y, z), default_params.PATCH_SIZE
    "embedding_dim": 992,  # 32 + 64 + 128 + 256 + 512, the concatenated backbone pyramid
    "checkpoint_format": "Lightning-style dict; weights in ckpt['state_dict'], bare FPN3d keys "
    "(or 'backbone.'-prefixed in a raw Lightning checkpoint)",
    "source": "https://github.com/multimodallearning/hierarchical-dense-ssl",
    "source_commit": "30f7f69d1e96c89a0fdbee1a8b96d4b0870fa005",
    "paper": "E. Kats, J. G. Hirsch, M. P. Heinrich, Self-supervised Learning of Dense Hierarchical "
    "Representations for Medical Image Segmentation",
    "license_note": "check the upstream repository's license before redistributing the weights",
}

#: Model cards of the published CT and MRI weights. ``intensity_preset`` is what the paper states (an
#: ``io.get_preset`` name); ``intensity_preset_repo`` is what the repo's preprocessing scripts do (a preset
#: dict, also accepted by ``io.get_preset``). They disagree and the published weights cannot tell which one
#: was used: see the upstream NOTES.md ("Preprocessing in the repo") and the paper's Sec. 3.
PUBLISHED_MODEL_INFO: dict[str, dict] = {
    "ct": {
        **_COMMON_INFO,
        "modality": "CT",
        "spacing": (1.0, 1.0, 2.0),  # mm along (x, y, z) = (i, j, k) of an identity-direction volume
        "intensity_preset": "ct_hdssl",  # paper: clip [-1350, 1000] HU -> [0, 1]
        "intensity_preset_repo": IntensityPreset(
            name="ct_hdssl_repo", kind="window", lower=-175.0, upper=250.0,
            description="HDSSL repo preprocessing (preprocess_*_data.py): clip [-175, 250] HU -> [0, 1]",
        ).to_dict(),
        "body_crop": ">= 0.3 on the [0, 1] scale (repo); >= -500 HU (paper)",
    },
    "mri": {
        **_COMMON_INFO,
        "modality": "MRI",
        "spacing": (1.5, 1.5, 1.5),
        "intensity_preset": "mri_percentile",  # paper: clip to the 0.01 / 99.9 percentiles -> [0, 1]
        "intensity_preset_repo": IntensityPreset(
            name="mri_hdssl_repo", kind="percentile", lower=1.0, upper=99.99,
            description="HDSSL repo preprocessing: clip to the 1st / 99.99th percentiles -> [0, 1]",
        ).to_dict(),
        "body_crop": ">= 0.3 on the [0, 1] scale",
        "pretraining_data": "NAKO (default run name 'nako1000 ... 32x5')",
    },
}


@dataclass
class HDSSLConfig:
    """Published constructor (``hb_ssl/default_params.py``) and head sizes (``hb_ssl/pretrain/model.py``)."""

    in_channels: int = 1
    base_channels: int = 32
    num_scales: int = 5
    scale_proj_channels: int = 32  # per-level projection width ("balanced": every level gets the same share)
    # The reference hard-codes 160 (= 5 * 32); here it must equal num_scales * scale_proj_channels.
    proj_hidden: int = 160
    proj_out: int = 128


class HDSSLFPN(FPN3d):
    """The HDSSL backbone with the published defaults (identical architecture to vox2vec's FPN3d)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 32, num_scales: int = 5) -> None:
        super().__init__(in_channels, base_channels, num_scales)


class L2Normalize(nn.Module):
    """Parameter-free stand-in for the reference's ``Lambda(F.normalize)`` (index 7 of ``proj_head``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class HDSSLNet(nn.Module):
    """Backbone + pretraining heads, with the LightningModule's key names (``backbone.*``, ``proj_head.*``,
    ``rest_head.*``) plus ``scale_proj.{L}.*`` (absent from the reference checkpoints, see module doc).

    * ``scale_proj[L]``: Conv3d(c_L -> 32, 1x1x1), bias only at level 0 (the reference's pattern, inherited
      from vox2vec's FPNLinearHead);
    * ``proj_head``: Linear(160,160)-BN-ReLU-Linear(160,160)-BN-ReLU-Linear(160,128)-L2 normalise;
    * ``rest_head``: Conv3d(c0 -> 1, 1x1x1) on level 0, reconstructing the non-augmented patch (MSE term).
    """

    def __init__(self, config: HDSSLConfig | None = None) -> None:
        super().__init__()
        cfg = config or HDSSLConfig()
        if cfg.proj_hidden != cfg.num_scales * cfg.scale_proj_channels:
            raise ValueError(
                f"proj_hidden ({cfg.proj_hidden}) must equal num_scales * scale_proj_channels "
                f"({cfg.num_scales} * {cfg.scale_proj_channels})"
            )
        self.config = cfg
        self.backbone = HDSSLFPN(cfg.in_channels, cfg.base_channels, cfg.num_scales)
        self.scale_proj = nn.ModuleList(
            nn.Conv3d(c, cfg.scale_proj_channels, kernel_size=1, bias=(level == 0))
            for level, c in enumerate(self.backbone.level_channels)
        )
        h = cfg.proj_hidden
        self.proj_head = nn.Sequential(
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.ReLU(),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.ReLU(),
            nn.Linear(h, cfg.proj_out),
            L2Normalize(),
        )
        self.rest_head = nn.Conv3d(cfg.base_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw backbone pyramid, finest first."""
        return self.backbone(x)

    def project_pyramid(self, pyramid: list[torch.Tensor]) -> list[torch.Tensor]:
        """``scale_proj[L](pyramid[L])`` for every level (each ``scale_proj_channels`` wide)."""
        return [proj(level_map) for proj, level_map in zip(self.scale_proj, pyramid)]

    def voxel_vectors(self, pyramid: list[torch.Tensor], voxels: torch.Tensor) -> torch.Tensor:
        """Hierarchical 160-d vectors of ``voxels`` (V, 3), rows ordered sample-major: (N * V, 160)."""
        vectors = select_from_pyramid(self.project_pyramid(pyramid), voxels)
        return vectors.reshape(-1, vectors.shape[-1])

    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """Contrastive embeddings (N, 128), unit norm."""
        return self.proj_head(vectors)

    def reconstruct(self, pyramid: list[torch.Tensor]) -> torch.Tensor:
        return self.rest_head(pyramid[0])


class HDSSLEmbedder(PyramidEmbedder):
    """HDSSL as a dense :class:`~anatomical_embedding.nets.embedder.Embedder`.

    ``features="backbone"`` (default; the only option for the published weights): the raw pyramid
    concatenation, ``fine`` = all five levels (992 channels), ``coarse`` = levels 3..4 (256 + 512 = 768) at
    stride 8. ``features="scale_proj"`` (a net trained here, with its projections): the method's hierarchical
    vector, ``fine`` = 5 x 32 = 160 channels, ``coarse`` = levels 3..4 projected (64) at stride 8.
    Inputs are padded to multiples of 16 (the coarsest stride).
    """

    input_layout = "RAS"
    coarse_stride = 8
    size_multiple = 16
    coarse_channels = 768
    fine_channels = 992

    def __init__(
        self,
        net: HDSSLNet | FPN3d | None = None,
        features: Literal["backbone", "scale_proj"] = "backbone",
        coarse_level: int = 3,
        fine_levels: Sequence[int] | None = None,
        layout: AxisLayout | None = None,
    ) -> None:
        net = net if net is not None else HDSSLFPN()
        backbone = net.backbone if isinstance(net, HDSSLNet) else net
        if features == "scale_proj":
            if not isinstance(net, HDSSLNet):
                raise ValueError(
                    "features='scale_proj' needs an HDSSLNet (backbone + scale_proj heads); the "
                    "published checkpoints hold only the backbone, use features='backbone'"
                )
            channels = [net.config.scale_proj_channels] * backbone.num_scales
        elif features == "backbone":
            channels = backbone.level_channels
        else:
            raise ValueError(f"features must be 'backbone' or 'scale_proj', got {features!r}")
        super().__init__(channels, coarse_level, fine_levels, layout)
        self.features = features
        self.net = net

    def pyramid(self, image_network_layout: torch.Tensor, min_level: int = 0) -> dict[int, torch.Tensor]:
        backbone = self.net.backbone if isinstance(self.net, HDSSLNet) else self.net
        maps = {
            min_level + i: m for i, m in enumerate(backbone.forward_levels(image_network_layout, min_level))
        }
        if self.features == "scale_proj":
            return {level: self.net.scale_proj[level](m) for level, m in maps.items()}
        return maps


__all__ = ["HDSSLConfig", "HDSSLFPN", "HDSSLNet", "HDSSLEmbedder", "L2Normalize", "PUBLISHED_MODEL_INFO"]
