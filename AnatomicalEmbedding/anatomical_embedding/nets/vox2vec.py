"""vox2vec (Goncharov et al., MICCAI 2023): the published FPN3d backbone and its dense embedder.

The backbone reproduces ``mishgon/vox2vec@734e757`` ``vox2vec/nn/fpn.py: FPN3d(1, 16, 6)`` exactly (parity
tests against the reference outputs in ``Testing/test_reference_networks.py``), so the published
``vox2vec_contrastive.pt`` / ``vox2vec_vicreg.pt`` / ``vox2vec.pt`` load into it strictly
(``anatomical_embedding.inference.pretrained.load_published_checkpoint(path, "vox2vec")``).

Array layout: the network was trained on nibabel-order (x, y, z) arrays in **RAS-canonical** orientation (axes
increase toward R, A, S), i.e. flipped on x and y relative to the LPS identity-direction layout; the embedder
converts our ``[k, j, i]`` tensors (see ``blocks.AxisLayout``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from anatomical_embedding.nets.blocks import AxisLayout, FPN3d, PyramidEmbedder

#: Model card of the published weights; ``intensity_preset`` is an ``io.get_preset`` name.
PUBLISHED_MODEL_INFO: dict = {
    "method": "vox2vec",
    "modality": "CT",
    "network": "FPN3d(in_channels=1, base_channels=16, num_scales=6)",
    "input_layout": "RAS",  # array axes (x, y, z) increasing toward R, A, S
    # Along the network axes (x, y, z), which are (i, j, k) of an identity-direction (axial LPS) volume;
    # otherwise map with AxisLayout.network_spacing_to_ijk. Same for patch_size.
    "spacing": (1.0, 1.0, 2.0),
    "intensity_preset": "ct_hdssl",  # clip [-1350, 1000] HU -> [0, 1], identical to the repo's recipe
    "body_crop_hu": -500.0,  # the repo crops to the bounding box of image >= -500 HU before resampling
    "patch_size": (128, 128, 32),  # along (x, y, z)
    "embedding_dim": 1008,  # 16 + 32 + ... + 512, the concatenated pyramid vector
    "checkpoints": ("vox2vec_contrastive.pt", "vox2vec_vicreg.pt", "vox2vec.pt"),
    "checkpoint_format": "bare FPN3d state_dict, no key prefix",
    "source": "https://github.com/mishgon/vox2vec",
    "source_commit": "734e757b91295a24486fc4ee06568bca91846928",
    "weights": "https://huggingface.co/mishgon/vox2vec (revision 29dfa9718434a58b3241af3c43dca90c867bea15)",
    "paper": "M. Goncharov et al., vox2vec: A Framework for Self-supervised Contrastive Learning of "
    "Voxel-level Representations in Medical Images, MICCAI 2023",
    "license_note": "check the upstream repository's license before redistributing the weights",
}


class Vox2VecFPN(FPN3d):
    """The vox2vec backbone with the published constructor's defaults (``vox2vec/default_params.py``;
    ``deep=False``); ``forward`` returns the raw pyramid (finest first)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 16, num_scales: int = 6) -> None:
        super().__init__(in_channels, base_channels, num_scales)


class Vox2VecEmbedder(PyramidEmbedder):
    """vox2vec as a dense :class:`~anatomical_embedding.nets.embedder.Embedder`.

    Published configuration: ``fine`` = the full 1008-d vox2vec voxel vector (all six levels) at input
    resolution; ``coarse`` = levels 3..5 (128 + 256 + 512 = 896 channels) at stride 8; inputs padded to
    multiples of 32 (the coarsest level's stride; training patches were 128 x 128 x 32). The 1008-channel
    fine map costs 4 KB per voxel: pass ``fine_levels=(0, 1, 2)`` (112 channels) where memory is tight.
    """

    input_layout = "RAS"
    coarse_stride = 8
    size_multiple = 32
    coarse_channels = 896
    fine_channels = 1008

    def __init__(
        self,
        backbone: FPN3d | None = None,
        coarse_level: int = 3,
        fine_levels: Sequence[int] | None = None,
        layout: AxisLayout | None = None,
    ) -> None:
        backbone = backbone if backbone is not None else Vox2VecFPN()
        super().__init__(backbone.level_channels, coarse_level, fine_levels, layout)
        self.backbone = backbone

    def pyramid(self, image_network_layout: torch.Tensor, min_level: int = 0) -> dict[int, torch.Tensor]:
        maps = self.backbone.forward_levels(image_network_layout, min_level)
        return {min_level + i: m for i, m in enumerate(maps)}
