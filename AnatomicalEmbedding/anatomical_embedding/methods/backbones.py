"""Finetune backbones: pretrained networks turned into segmentation networks (``finetune --mode backbone``).

Registry: method name -> ``"module:function"`` (relative to this package). The function takes the
*pretrained* :class:`~.base.Method` instance (its weights already loaded) and the number of classes and
returns an ``nn.Module`` mapping ``(N, 1, k, j, i)`` preprocessed images to ``(N, n_classes, k, j, i)``
logits, built from the method's own layers (shared modules, so the pretrained weights are its initial
weights) plus a freshly initialised head. A method can instead define ``segmentation_network(n_classes)``
itself; that takes precedence. The AnatoMask and Adam/Eve methods plug in by adding one line here.

Every network sets ``size_multiple``: spatial input sizes (training patches, sliding windows) must be
multiples of it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import nn

from anatomical_embedding.nets.aefm_unet import AEFMUNet, SegmentationHead
from anatomical_embedding.nets.blocks import AxisLayout, FPN3d, upsample_to

#: method name -> "module:function(method, n_classes, hidden) -> nn.Module".
FINETUNE_BACKBONES: dict[str, str] = {
    "aefm": ".backbones:aefm_segmentation_network",
    "hdssl": ".backbones:hdssl_segmentation_network",
}


def available_backbones() -> list[str]:
    return sorted(FINETUNE_BACKBONES)


def segmentation_network(method: nn.Module, n_classes: int, hidden: int = 64) -> nn.Module:
    """The segmentation network of a pretrained method (ValueError naming the supported methods otherwise)."""
    own = getattr(method, "segmentation_network", None)
    if callable(own):
        return own(n_classes)
    name = getattr(method, "name", type(method).__name__)
    target = FINETUNE_BACKBONES.get(name)
    if target is None:
        raise ValueError(f"method {name!r} provides no finetune backbone; backbone finetuning supports "
                         f"{', '.join(available_backbones())} (or use --mode embedding / scratch)")
    module, func = target.split(":")
    builder: Callable = getattr(importlib.import_module(module, __package__), func)
    return builder(method, n_classes, hidden)


class AEFMSegmentationNet(nn.Module):
    """AEFM's U-Net M_F (pretrained) with the light head M_S (two 1x1x1 layers) on its local map."""

    def __init__(self, unet: AEFMUNet, n_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.unet = unet
        self.head = SegmentationHead(unet.feature_dim, n_classes, hidden)
        self.size_multiple = unet.size_multiple

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, local = self.unet(x)
        return self.head(local)


def aefm_segmentation_network(method, n_classes: int, hidden: int = 64) -> nn.Module:
    return AEFMSegmentationNet(method.encoder, n_classes, hidden)


class FPNSegmentationNet(nn.Module):
    """An FPN backbone with vox2vec's non-linear FPN head: per-level 1x1x1 convs, upsampled and summed,
    then norm-ReLU-1x1x1 to the classes. Input is moved to the backbone's pretraining axis layout and the
    logits moved back, so the pretrained filters see the orientation they were trained on."""

    def __init__(self, backbone: FPN3d, n_classes: int, hidden: int = 64, layout: AxisLayout | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.lateral = nn.ModuleList(nn.Conv3d(c, hidden, kernel_size=1) for c in backbone.level_channels)
        self.head = nn.Sequential(nn.InstanceNorm3d(hidden, affine=True), nn.ReLU(),
                                  nn.Conv3d(hidden, n_classes, kernel_size=1))
        self.layout = layout or AxisLayout((0, 1, 2), (False, False, False))
        self.size_multiple = 2 ** (backbone.num_scales - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.layout.to_network(x)
        size = tuple(xn.shape[-3:])
        pyramid = self.backbone(xn)
        total = None
        for level, (lat, fmap) in enumerate(zip(self.lateral, pyramid)):
            up = upsample_to(lat(fmap), 2**level, size)
            total = up if total is None else total + up
        return self.layout.from_network(self.head(total))


def hdssl_segmentation_network(method, n_classes: int, hidden: int = 64) -> nn.Module:
    # The same layout HDSSLMethod feeds its patches in (an identity-direction LPS volume -> RAS).
    return FPNSegmentationNet(method.net.backbone, n_classes, hidden, layout=method.layout)
