"""STU-Net (Huang et al.): the scalable nnU-Net-style residual U-Net, with a masked (sparse) encoder path.

Published architecture (``uni-medical/STU-Net``, ``network_architecture/STUNet.py``), module names kept so that
``state_dict()`` keys equal the published ones (``conv_blocks_context.{stage}.{block}.conv1.weight``, ...):

* ``BasicResBlock``: conv3x3 -> InstanceNorm(affine) -> LeakyReLU -> conv3x3 -> InstanceNorm, plus the
  (1x1, strided) ``conv3`` shortcut when the width or resolution changes, then LeakyReLU.
* Encoder ``conv_blocks_context``: six stages, ``depths[d]`` blocks each, the first block of stages 1..5
  strided by ``strides[d - 1]`` (published: 2 x 2 x 2 four times, then 1 x 1 x 1, i.e. total stride 16).
* Decoder: nearest upsampling + 1x1 conv (``upsample_layers``), concatenation with the skip, one stage of
  residual blocks (``conv_blocks_localization``), a 1x1 segmentation output per stage (``seg_outputs``).
* Sizes: S (16..256, depth 1), **B (32..512, depth 1; the default)**, L (64..1024, depth 2), H (96..1536, depth 3).

Sparse (SparK-style) encoding, used by AnatoMask pretraining: ``STUNetEncoder.forward(x, active)`` takes a
boolean mask grid ``active`` (N, 1, g, g, g) at the coarsest resolution (True = visible). Every convolution's
output and every normalisation's output is multiplied by the mask at its own resolution, and the instance
norm statistics are computed over visible positions only (:class:`MaskedInstanceNorm3d`). Together with a
zeroed input this makes the features at visible positions independent of the masked content: zero
neighbours are all a convolution sees of a masked region, and no statistic mixes masked values in.
With ``active=None`` the very same modules are a plain dense STU-Net (ONNX-exportable).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Published STU-Net sizes: (widths, depth per stage).
STUNET_SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "S": ((16, 32, 64, 128, 256, 256), (1,) * 6),
    "B": ((32, 64, 128, 256, 512, 512), (1,) * 6),
    "L": ((64, 128, 256, 512, 1024, 1024), (2,) * 6),
    "H": ((96, 192, 384, 768, 1536, 1536), (3,) * 6),
}
#: Published pooling: four 2x downsamplings, then a stride-1 bottleneck stage (total stride 16).
STUNET_STRIDES: tuple[tuple[int, int, int], ...] = ((2, 2, 2),) * 4 + ((1, 1, 1),)


def mask_at(active: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor | None:
    """The mask grid (N, 1, g0, g1, g2) block-upsampled to ``size`` as float (1 = visible); None stays None.

    Every level of a stride-16 net with the mask grid at 1/16 is an integer multiple of the grid, so nearest
    upsampling is the exact block repetition (``repeat_interleave``) of the published code.
    """
    if active is None:
        return None
    size = tuple(int(s) for s in size)
    m = active.to(torch.float32)
    if tuple(m.shape[-3:]) != size:
        if any(s % g for s, g in zip(size, m.shape[-3:])):
            raise ValueError(f"feature size {size} is not a multiple of the mask grid {tuple(m.shape[-3:])}")
        m = F.interpolate(m, size=size, mode="nearest")
    return m


class MaskedInstanceNorm3d(nn.Module):
    """Instance norm with affine parameters whose statistics use the visible positions only.

    ``forward(x, mask)``: ``mask`` is (N, 1, *spatial) float (1 = visible) or None. Per sample and channel,
    ``mean`` and the biased ``var`` are taken over visible voxels; the output is zero at masked voxels. With
    ``mask=None`` this is exactly ``nn.InstanceNorm3d(affine=True)``. (The published SparK ``SparseInstanceNorm``
    pools the visible voxels of the *whole batch* into one instance; we keep per-sample statistics, which is
    what instance norm means and what the dense STU-Net computes at fine-tuning time.)
    Parameter names ``weight``/``bias`` equal ``nn.InstanceNorm3d``'s, so published checkpoints load.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        dims = (2, 3, 4)
        xf, mf = x.float(), mask.float()  # statistics in float32 also under bf16/fp16 autocast
        count = mf.sum(dim=dims, keepdim=True).clamp_min(1.0)
        mean = (xf * mf).sum(dim=dims, keepdim=True) / count
        var = (((xf - mean) * mf) ** 2).sum(dim=dims, keepdim=True) / count
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        y = y * self.weight.float().view(1, -1, 1, 1, 1) + self.bias.float().view(1, -1, 1, 1, 1)
        return (y * mf).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, masked statistics"


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class BasicResBlock(nn.Module):
    """STU-Net's residual block (published names: conv1, norm1, act1, conv2, norm2, act2, conv3)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: Sequence[int] | int = 1,
                 use_1x1conv: bool = False) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv3d(cin, cout, kernel_size, stride=stride, padding=pad)
        self.norm1 = MaskedInstanceNorm3d(cout)
        self.act1 = nn.LeakyReLU(0.01)
        self.conv2 = nn.Conv3d(cout, cout, kernel_size, padding=pad)
        self.norm2 = MaskedInstanceNorm3d(cout)
        self.act2 = nn.LeakyReLU(0.01)
        self.conv3 = nn.Conv3d(cin, cout, kernel_size=1, stride=stride) if use_1x1conv else None

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        y = self.conv1(x)
        m = mask_at(active, y.shape[-3:])
        # Re-mask after every conv (its bias and its reach into masked zeros) and every norm (its shift);
        # LeakyReLU(0) = 0 keeps masked positions at zero.
        y = self.act1(self.norm1(_masked(y, m), m))
        y = self.norm2(_masked(self.conv2(y), m), m)
        skip = _masked(self.conv3(x), m) if self.conv3 is not None else x
        return self.act2(y + skip)


def _stage(cin: int, cout: int, depth: int, stride) -> nn.ModuleList:
    # A ModuleList (not Sequential: blocks take the mask too); indices give the published keys.
    blocks = [BasicResBlock(cin, cout, 3, stride, use_1x1conv=True)]
    blocks += [BasicResBlock(cout, cout, 3) for _ in range(depth - 1)]
    return nn.ModuleList(blocks)


def init_he(module: nn.Module, neg_slope: float = 1e-2) -> None:
    """nnU-Net's ``InitWeights_He(1e-2)`` (STU-Net's initialisation): Kaiming normal convs, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@dataclass
class STUNetConfig:
    widths: tuple[int, ...] = STUNET_SIZES["B"][0]
    depths: tuple[int, ...] = STUNET_SIZES["B"][1]
    strides: tuple[tuple[int, int, int], ...] = STUNET_STRIDES
    in_channels: int = 1

    def check(self) -> None:
        if len(self.widths) != len(self.depths) or len(self.strides) != len(self.widths) - 1:
            raise ValueError(f"STU-Net needs len(widths) == len(depths) == len(strides) + 1, got widths "
                             f"{list(self.widths)}, depths {list(self.depths)}, strides {list(self.strides)}")
        if any(d < 1 for d in self.depths) or any(w < 1 for w in self.widths):
            raise ValueError(f"STU-Net widths and depths must be >= 1, got {list(self.widths)}, {list(self.depths)}")


class STUNetEncoder(nn.Module):
    """The encoder stages ``conv_blocks_context`` (all of them, or the first ``num_stages``).

    ``forward(x, active=None)`` returns every stage's output, finest first. ``active`` switches on the sparse
    path (see module docstring); the input must then already be zero at masked positions.
    """

    def __init__(self, config: STUNetConfig | None = None, num_stages: int | None = None) -> None:
        super().__init__()
        c = config or STUNetConfig()
        c.check()
        n = len(c.widths) if num_stages is None else int(num_stages)
        if not 1 <= n <= len(c.widths):
            raise ValueError(f"num_stages must be in [1, {len(c.widths)}], got {n}")
        self.widths = tuple(int(w) for w in c.widths[:n])
        strides = [(1, 1, 1)] + [tuple(s) for s in c.strides]
        self.strides = tuple(strides[:n])
        cins = [c.in_channels] + list(c.widths[:-1])
        self.conv_blocks_context = nn.ModuleList(
            _stage(cins[d], c.widths[d], c.depths[d], strides[d]) for d in range(n))

    @property
    def total_stride(self) -> int:
        s = 1
        for st in self.strides:
            s *= int(st[0])
        return s

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> list[torch.Tensor]:
        feats = []
        for stage in self.conv_blocks_context:
            for block in stage:
                x = block(x, active)
            feats.append(x)
        return feats


class UpsampleLayer(nn.Module):
    """Published ``Upsample_Layer_nearest``: nearest upsampling by the pooling kernel, then a 1x1 conv."""

    def __init__(self, cin: int, cout: int, scale: Sequence[int]) -> None:
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=1)
        self.scale = tuple(int(s) for s in scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s != 1 for s in self.scale):
            x = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.conv(x)


class STUNet(nn.Module):
    """The full (dense) STU-Net for segmentation fine-tuning; ``forward(x)`` -> logits at input resolution
    (or the deep-supervision list, finest first, with ``deep_supervision=True``)."""

    def __init__(self, num_classes: int, config: STUNetConfig | None = None, deep_supervision: bool = False) -> None:
        super().__init__()
        c = config or STUNetConfig()
        c.check()
        self.config, self.num_classes, self.deep_supervision = c, int(num_classes), deep_supervision
        enc = STUNetEncoder(c)
        self.conv_blocks_context = enc.conv_blocks_context
        w, n_pool = list(c.widths), len(c.strides)
        self.upsample_layers = nn.ModuleList(
            UpsampleLayer(w[-1 - u], w[-2 - u], c.strides[-1 - u]) for u in range(n_pool))
        self.conv_blocks_localization = nn.ModuleList(
            nn.ModuleList([BasicResBlock(2 * w[-2 - u], w[-2 - u], 3, 1, use_1x1conv=True)]
                          + [BasicResBlock(w[-2 - u], w[-2 - u], 3) for _ in range(c.depths[-2 - u] - 1)])
            for u in range(n_pool))
        self.seg_outputs = nn.ModuleList(nn.Conv3d(w[-2 - u], self.num_classes, kernel_size=1) for u in range(n_pool))
        init_he(self)

    @property
    def size_multiple(self) -> int:
        s = 1
        for st in self.config.strides:
            s *= int(max(st))
        return s

    def forward(self, x: torch.Tensor):
        skips = []
        for stage in self.conv_blocks_context:
            for block in stage:
                x = block(x)
            skips.append(x)
        x = skips.pop()
        outs = []
        for u, (up, stage, head) in enumerate(zip(self.upsample_layers, self.conv_blocks_localization, self.seg_outputs)):
            x = torch.cat([up(x), skips[-1 - u]], dim=1)
            for block in stage:
                x = block(x)
            outs.append(head(x))
        return outs[::-1] if self.deep_supervision else outs[-1]

    def load_pretrained_encoder(self, encoder_state: dict[str, torch.Tensor]) -> list[str]:
        """Copy pretrained ``conv_blocks_context.*`` weights (e.g. AnatoMask's student encoder) into this net.

        Returns the names loaded. Stages the pretraining lacked (AnatoMask pretrains stages 0..4 as published)
        and the decoder keep their initialisation. Shape mismatches raise with the offending key.
        """
        own = self.state_dict()
        loaded = []
        for key, value in encoder_state.items():
            if not key.startswith("conv_blocks_context."):
                continue
            if key not in own:
                raise ValueError(f"pretrained key {key} does not exist in this STU-Net; check the widths and depths")
            if tuple(own[key].shape) != tuple(value.shape):
                raise ValueError(f"pretrained {key} has shape {tuple(value.shape)}, this STU-Net expects "
                                 f"{tuple(own[key].shape)}; build the STU-Net with the pretraining widths")
            own[key] = value.detach().clone()
            loaded.append(key)
        self.load_state_dict(own)
        return loaded
