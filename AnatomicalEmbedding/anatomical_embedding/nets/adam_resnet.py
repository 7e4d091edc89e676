"""Adam/Eve networks: a 2D or 3D ResNet backbone (MONAI ``ResNet``), the MoCo-v2 projection head, the dense
embedder (Eve) and a ResNet-encoder U-Net for finetuning.

* :class:`ResNetBackbone`: MONAI's ResNet without its classifier; ``stages(x)`` returns the stage outputs
  ``{1: layer1, 2: layer2, 3: layer3, 4: layer4}`` (strides ``s1 s1 2 s1 4 s1 8 s1`` with ``s1 = conv1_stride x
  2`` when the max-pool is on), ``pooled(x)`` the global average of layer4 (the MoCo feature ``f(x)``).
  Depths 10/18/34 use basic blocks, 50/101/152 bottlenecks (expansion 4: ResNet-50's layer4 has 2048 channels).
  Every depth uses convolutional shortcuts (type "B", torchvision's ResNets).
* :class:`ProjectionHead`: MoCo v2's two-layer MLP ``Linear(C, H) - ReLU - Linear(H, 128)``.
* :class:`AdamEveEmbedder`: the dense embedding, see its docstring.
* :class:`ResNetUNet`: the U-Net with the pretrained ResNet as encoder (paper F.2: "U-Net network with a
  ResNet-50 encoder, where the encoder is initialized with the pretrained backbone"), decoded to full
  resolution with the stem and the image as the last skips.

2D networks take ``(N, 1, H, W)``; the embedder and the U-Net always take the project's ``(N, 1, k, j, i)`` and,
in 2D, run the network on every k-slice (the slices are folded into the batch).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anatomical_embedding.nets.embedder import Embedder

#: depth -> (block, blocks per stage), as MONAI's / torchvision's ResNets.
RESNET_LAYERS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)), 101: ("bottleneck", (3, 4, 23, 3)), 152: ("bottleneck", (3, 8, 36, 3)),
}


def _norm(name: str):
    if name == "batch":
        return "batch"
    if name == "instance":
        return ("instance", {"affine": True})
    raise ValueError(f"Adam/Eve norm must be 'batch' or 'instance', got {name!r}")


class ResNetBackbone(nn.Module):
    """MONAI ``ResNet`` (``feed_forward=False``) with access to its four stage outputs."""

    def __init__(self, dims: int = 2, depth: int = 50, widths: Sequence[int] = (64, 128, 256, 512),
                 conv1_stride: int = 2, max_pool: bool = True, norm: str = "batch") -> None:
        super().__init__()
        from monai.networks.nets import ResNet

        if dims not in (2, 3):
            raise ValueError(f"Adam/Eve dims must be 2 or 3, got {dims}")
        if depth not in RESNET_LAYERS:
            raise ValueError(f"Adam/Eve ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}")
        if len(widths) != 4:
            raise ValueError(f"Adam/Eve needs four ResNet stage widths, got {list(widths)}")
        block, layers = RESNET_LAYERS[depth]
        self.dims, self.depth = dims, depth
        self.net = ResNet(block, list(layers), [int(w) for w in widths], spatial_dims=dims, n_input_channels=1,
                          conv1_t_size=7, conv1_t_stride=int(conv1_stride), no_max_pool=not max_pool,
                          shortcut_type="B", feed_forward=False, norm=_norm(norm))
        expansion = 4 if block == "bottleneck" else 1
        self.stage_channels = {s + 1: int(w) * expansion for s, w in enumerate(widths)}
        first = int(conv1_stride) * (2 if max_pool else 1)
        self.stage_strides = {1: first, 2: first * 2, 3: first * 4, 4: first * 8}
        self.out_channels = self.stage_channels[4]

    @property
    def total_stride(self) -> int:
        return self.stage_strides[4]

    def stages(self, x: torch.Tensor, last: int = 4, with_stem: bool = False) -> dict[int, torch.Tensor]:
        """Stage outputs ``{1: layer1, ..., last}``; ``with_stem`` adds ``0``: conv1's output before the max-pool."""
        n = self.net
        x = n.act(n.bn1(n.conv1(x)))
        out = {0: x} if with_stem else {}
        if not n.no_max_pool:
            x = n.maxpool(x)
        for s, layer in enumerate((n.layer1, n.layer2, n.layer3, n.layer4)[:last], 1):
            x = layer(x)
            out[s] = x
        return out

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)``: global average of layer4, (N, C)."""
        return self.stages(x)[4].flatten(2).mean(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(x)


class ProjectionHead(nn.Sequential):
    """MoCo v2's projection head: two linear layers with a ReLU between (no BatchNorm)."""

    def __init__(self, in_channels: int, hidden: int, out_channels: int = 128) -> None:
        super().__init__(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_channels))


def random_projection(c_in: int, c_out: int, seed: int) -> torch.Tensor | None:
    """A fixed (c_out, c_in) matrix with orthonormal rows (Johnson-Lindenstrauss: cosines are roughly kept);
    ``None`` when no reduction is asked for (``c_out <= 0`` or ``c_out >= c_in``)."""
    if c_out <= 0 or c_out >= c_in:
        return None
    g = np.random.default_rng(seed).standard_normal((c_in, c_out))
    q, _ = np.linalg.qr(g)
    return torch.from_numpy(q.T.astype(np.float32).copy())


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    if factor == 1:
        return x
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    return F.interpolate(x, scale_factor=float(factor), mode=mode, align_corners=False)


class AdamEveEmbedder(Embedder):
    """Eve: dense embeddings of the pretrained Adam backbone (the online encoder ``f_theta``).

    * ``coarse`` (stride ``coarse_stride``): the last stage (layer4), L2-normalised per voxel, optionally reduced
      to ``coarse_dim`` channels by a fixed orthonormal random projection, interpolated (bi/trilinear) from the
      stage's stride to ``coarse_stride`` and L2-normalised;
    * ``fine`` (input resolution): an FPN-style fusion of ``fine_stages`` (default layers 1-4): each stage
      L2-normalised per voxel (every scale weighs the same), projected by its block of a fixed orthonormal
      random projection to ``fine_dim`` channels (0: plain concatenation), interpolated to input resolution and
      summed (projection and interpolation are both linear, so this equals projecting the concatenation), then
      L2-normalised.

    2D networks (``dims=2``) embed every k-slice independently (slices folded into the batch); the coarse map's
    k axis is then averaged over blocks of ``coarse_stride`` slices. For a single 2D image, ``embedding.py``
    replicates the slice along its flat axis; the 2D embedder treats k as that axis (PNGs and radiographs
    without a patient orientation), see the README.
    """

    def __init__(self, backbone: ResNetBackbone, coarse_stride: int = 8, coarse_dim: int = 128, fine_dim: int = 128,
                 fine_stages: Sequence[int] = (1, 2, 3, 4), seed: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.dims = backbone.dims
        stride4 = backbone.stage_strides[4]
        if coarse_stride < 1 or coarse_stride > stride4 or stride4 % coarse_stride:
            raise ValueError(f"coarse_stride {coarse_stride} must divide the last stage's stride {stride4}")
        bad = [s for s in fine_stages if s not in backbone.stage_channels]
        if bad or not fine_stages:
            raise ValueError(f"fine_stages must be a non-empty subset of 1..4, got {list(fine_stages)}")
        self.fine_stages = tuple(sorted(int(s) for s in fine_stages))
        self.coarse_stride = int(coarse_stride)
        self.size_multiple = int(stride4)
        c4 = backbone.stage_channels[4]
        cp = random_projection(c4, coarse_dim, seed)
        self.coarse_channels = c4 if cp is None else int(coarse_dim)
        self._coarse_projected, self._fine_projected = cp is not None, False  # Python flags: ONNX tracing
        self.register_buffer("coarse_proj", cp if cp is not None else torch.zeros(0), persistent=False)
        c_fine = sum(backbone.stage_channels[s] for s in self.fine_stages)
        fp = random_projection(c_fine, fine_dim, seed + 1)
        self.fine_channels = c_fine if fp is None else int(fine_dim)
        self._fine_projected = fp is not None
        self.register_buffer("fine_proj", fp if fp is not None else torch.zeros(0), persistent=False)

    def _check(self, image: torch.Tensor) -> None:
        size = tuple(image.shape[-3:])
        if not torch.jit.is_tracing() and any(s % self.size_multiple for s in size):
            raise ValueError(f"input size {size} must be a multiple of {self.size_multiple} per axis; "
                             "pad it first (io.pad_to_multiple)")

    def _stages(self, image: torch.Tensor, last: int = 4) -> tuple[dict[int, torch.Tensor], tuple]:
        if self.dims == 3:
            return self.backbone.stages(image, last), ()
        n, _, k, j, i = image.shape
        return self.backbone.stages(image.reshape(n * k, 1, j, i), last), (n, k)

    def _unfold(self, x: torch.Tensor, nk: tuple) -> torch.Tensor:
        """2D: (N * K, C, j, i) -> (N, C, K, j, i)."""
        if not nk:
            return x
        n, k = nk
        return x.reshape(n, k, x.shape[1], x.shape[2], x.shape[3]).transpose(1, 2)

    def _coarse(self, f4: torch.Tensor, nk: tuple) -> torch.Tensor:
        f = F.normalize(f4, dim=1)
        if self._coarse_projected:
            f = torch.einsum("oc,nc...->no...", self.coarse_proj, f)
        f = _upsample(f, self.backbone.stage_strides[4] // self.coarse_stride)
        f = self._unfold(f, nk)
        if nk and self.coarse_stride > 1:  # 2D: average blocks of coarse_stride slices along k
            n, c, k, j, i = f.shape
            f = f.reshape(n, c, k // self.coarse_stride, self.coarse_stride, j, i).mean(3)
        return F.normalize(f, dim=1)

    def _fine(self, stages: dict[int, torch.Tensor], nk: tuple) -> torch.Tensor:
        parts, offset = [], 0
        for s in self.fine_stages:
            f = F.normalize(stages[s], dim=1)
            ch = f.shape[1]
            if self._fine_projected:
                f = torch.einsum("oc,nc...->no...", self.fine_proj[:, offset: offset + ch], f)
            offset += ch
            parts.append(_upsample(f, self.backbone.stage_strides[s]))
        out = torch.stack(parts).sum(0) if self._fine_projected else torch.cat(parts, dim=1)
        return F.normalize(self._unfold(out, nk), dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(image)
        stages, nk = self._stages(image)
        return self._coarse(stages[4], nk), self._fine(stages, nk)

    def forward_coarse(self, image: torch.Tensor) -> torch.Tensor:
        """The coarse output alone (export writes it as ``coarse.onnx``)."""
        self._check(image)
        stages, nk = self._stages(image)
        return self._coarse(stages[4], nk)


class _DecoderBlock(nn.Module):
    """Up-sample ``x`` by ``factor`` (1: none), concatenate the skip, two conv-norm-ReLU layers."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, dims: int, factor: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.factor = int(factor)
        self.block = nn.Sequential(conv(in_ch + skip_ch, out_ch, 3, padding=1, bias=False), norm(out_ch),
                                   nn.ReLU(inplace=True), conv(out_ch, out_ch, 3, padding=1, bias=False),
                                   norm(out_ch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = _upsample(x, self.factor)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.block(x)


class ResNetUNet(nn.Module):
    """U-Net with a (pretrained) ResNet encoder, decoded to full resolution.

    Decoder blocks up-sample x2 and fuse layer3, layer2 and layer1; a fourth block fuses the stem (conv1's
    output, before the max-pool; with the max-pool off it is at layer1's resolution and fused there without
    up-sampling); a last block up-samples from the stem's stride to the input and fuses the image itself, then a
    1x1 conv gives the class logits. Every layer of the path to the logits is learnt at full resolution, so thin
    structures (ribs, clavicles: among the paper's tasks) are not limited by a bilinear x4 up-sampling.
    ``decoder_widths``: 5 widths (layer3, layer2, layer1, stem, full-resolution blocks); 3 widths give the first
    three and the last two default to half the stem's width (at least 8).

    Takes ``(N, 1, k, j, i)`` and returns ``(N, n_classes, k, j, i)``; 2D encoders run slice by slice.
    """

    def __init__(self, backbone: ResNetBackbone, n_classes: int, decoder_widths: Sequence[int] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dims = backbone.dims
        self.size_multiple = backbone.total_stride
        ch = backbone.stage_channels
        stem_ch = int(backbone.net.bn1.num_features)
        widths = list(decoder_widths or [max(8, ch[3] // 2), max(8, ch[2] // 2), max(8, ch[1] // 2)])
        if len(widths) == 3:
            widths += [max(8, stem_ch // 2)] * 2
        if len(widths) != 5:
            raise ValueError(f"Adam/Eve decoder_widths needs 3 or 5 widths, got {list(widths)}")
        self.up3 = _DecoderBlock(ch[4], ch[3], widths[0], self.dims)
        self.up2 = _DecoderBlock(widths[0], ch[2], widths[1], self.dims)
        self.up1 = _DecoderBlock(widths[1], ch[1], widths[2], self.dims)
        stem_stride = backbone.stage_strides[1] // (2 if not backbone.net.no_max_pool else 1)
        self.up0 = _DecoderBlock(widths[2], stem_ch, widths[3], self.dims,
                                 factor=backbone.stage_strides[1] // stem_stride)
        self.full = _DecoderBlock(widths[3], 1, widths[4], self.dims, factor=stem_stride)
        conv = nn.Conv2d if self.dims == 2 else nn.Conv3d
        self.head = conv(widths[4], n_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 2:
            n, _, k, j, i = x.shape
            x = x.reshape(n * k, 1, j, i)
        s = self.backbone.stages(x, with_stem=True)
        y = self.up3(s[4], s[3])
        y = self.up2(y, s[2])
        y = self.up1(y, s[1])
        y = self.up0(y, s[0])
        y = self.head(self.full(y, x))
        if self.dims == 2:
            y = y.reshape(n, k, y.shape[1], j, i).transpose(1, 2)
        return y


__all__ = ["RESNET_LAYERS", "AdamEveEmbedder", "ProjectionHead", "ResNetBackbone", "ResNetUNet", "random_projection"]
