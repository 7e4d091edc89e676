"""SparK-style masked image modelling around the STU-Net encoder (as in AnatoMask's published ``ssl_pretrain``).

* Sparse encoder: :class:`~.stunet.STUNetEncoder` stages 0..4 (the published pretraining drops the stride-1
  bottleneck stage 5), run with the mask grid at 1/16 (``active``, True = visible) on the zero-masked input.
* Densify (per decoder input level, coarsest first): masked instance norm over visible positions, the learned
  mask token at masked positions, then a projection to the decoder width (identity at 1/16 when the widths
  match, 3x3 convs elsewhere) -- SparK's ``densify_norms`` / ``mask_tokens`` / ``densify_projs``.
* Light decoder (SparK ``LightDecoder``): four ``UNetBlock`` s (transposed conv x2, conv-BN-ReLU6-conv-BN),
  widths halving from the encoder's 1/16 width; the densified level at the block's input resolution is added
  before each block; a 1x1 conv gives the reconstruction at input resolution. The encoder's full-resolution
  stage feeds no decoder block (published: its densify output is computed and never used; we skip it).

Only the dense path (``active=None``, every position visible) is used by the embedder and export.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from anatomical_embedding.nets.stunet import MaskedInstanceNorm3d, STUNetConfig, STUNetEncoder, init_he, mask_at


class UNetBlock(nn.Module):
    """SparK decoder block: 2x transposed-conv upsampling, then conv-BN-ReLU6-conv-BN (published layout)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up_sample = nn.ConvTranspose3d(cin, cin, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv3d(cin, cin, kernel_size=3, padding=1, bias=False), nn.BatchNorm3d(cin), nn.ReLU6(),
            nn.Conv3d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm3d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """``n_blocks`` UNetBlocks from ``width`` halving each time, plus the 1x1 output projection."""

    def __init__(self, width: int, n_blocks: int = 4, out_channels: int = 1) -> None:
        super().__init__()
        chans = [max(1, width // 2**i) for i in range(n_blocks + 1)]
        self.width, self.channels = width, chans
        self.dec = nn.ModuleList(UNetBlock(a, b) for a, b in itertools.pairwise(chans))
        self.proj = nn.Conv3d(chans[-1], out_channels, kernel_size=1)
        for m in self.modules():  # published initialise(): trunc-normal convs, Kaiming transposed convs
            if isinstance(m, nn.Conv3d):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, to_dec: list[torch.Tensor], n_blocks: int | None = None) -> list[torch.Tensor]:
        """Outputs of the first ``n_blocks`` decoder blocks (strides 8, 4, 2, 1 for a stride-16 encoder)."""
        x, outs = None, []
        for i, block in enumerate(self.dec[: n_blocks or len(self.dec)]):
            x = to_dec[i] if x is None else x + to_dec[i]
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        return self.proj(self.forward_features(to_dec)[-1])


class SparKSTUNet(nn.Module):
    """STU-Net encoder + densify + light decoder; ``forward(x, active)`` -> reconstruction (N, 1, *x.shape)."""

    def __init__(self, config: STUNetConfig | None = None, encoder_stages: int = 5, in_channels: int = 1) -> None:
        super().__init__()
        c = config or STUNetConfig()
        self.encoder = STUNetEncoder(c, num_stages=encoder_stages)
        init_he(self.encoder)
        self.downsample_ratio = self.encoder.total_stride
        n_up = round(math.log2(self.downsample_ratio))
        if 2**n_up != self.downsample_ratio or n_up < 1 or n_up > encoder_stages - 1:
            raise ValueError(f"SparK needs a power-of-two encoder stride with one stage per 2x step; got stride "
                             f"{self.downsample_ratio} from {encoder_stages} stages with strides {list(c.strides)}")
        # Decoder input levels, coarsest first: the last stage of each resolution 1/16, 1/8, 1/4, 1/2.
        res = [int(math.prod(s[0] for s in self.encoder.strides[: d + 1])) for d in range(encoder_stages)]
        self.levels = [max(d for d in range(encoder_stages) if res[d] == self.downsample_ratio // 2**i)
                       for i in range(n_up)]
        e_widths = [self.encoder.widths[d] for d in self.levels]
        width = e_widths[0]
        self.decoder = LightDecoder(width, n_up, in_channels)
        self.densify_norms = nn.ModuleList(MaskedInstanceNorm3d(w, eps=1e-6) for w in e_widths)
        self.mask_tokens = nn.ParameterList()
        projs = []
        for i, w in enumerate(e_widths):
            token = nn.Parameter(torch.zeros(1, w, 1, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            d_width = self.decoder.channels[i]
            if i == 0 and w == d_width:
                projs.append(nn.Identity())
            else:
                k = 1 if i == 0 else 3
                projs.append(nn.Conv3d(w, d_width, kernel_size=k, padding=k // 2))
        self.densify_projs = nn.ModuleList(projs)

    def densified(self, x: torch.Tensor, active: torch.Tensor | None = None, n_levels: int | None = None
                  ) -> list[torch.Tensor]:
        """Decoder inputs, coarsest first. ``active`` (N, 1, *grid) bool or None (all visible, dense)."""
        if active is not None:
            x = x * mask_at(active, x.shape[-3:])
        feats = self.encoder(x, active)
        out = []
        for i, level in enumerate(self.levels[: n_levels or len(self.levels)]):
            f = feats[level]
            m = mask_at(active, f.shape[-3:])
            f = self.densify_norms[i](f, m)
            if m is not None:
                f = torch.where(m > 0, f, self.mask_tokens[i].to(f.dtype).expand_as(f))
            out.append(self.densify_projs[i](f))
        return out

    def forward(self, x: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(self.densified(x, active))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, a, b, c) -> (N, L, p^3 C), patches in row-major grid order (SparK ``patchify``)."""
    n, ch, a, b, c = x.shape
    x = x.reshape(n, ch, a // p, p, b // p, p, c // p, p)
    x = torch.einsum("ncxpyqzr->nxyzpqrc", x)
    return x.reshape(n, (a // p) * (b // p) * (c // p), p**3 * ch)


__all__ = ["LightDecoder", "SparKSTUNet", "UNetBlock", "patchify"]
