"""The published checkpoints we import (AEFM, vox2vec, HDSSL): their names, where each project publishes
them, and their caveats. Torch-free, so the CLI help and the Slicer dialog can show them cheaply."""
from __future__ import annotations

from typing import Literal

Kind = Literal["aefm", "vox2vec", "hdssl"]
FORMATS: tuple[str, ...] = ("aefm", "vox2vec", "hdssl")

#: Where each project publishes its checkpoint (shown by the CLI help and the Slicer dialog). Nothing is fetched.
PUBLISHED_SOURCES: dict[str, str] = {
    "aefm": "AEFM (Zhuang et al.): abdomen_foundation.pth, linked (OneDrive) from the README of "
            "https://github.com/DlutMedimgGroup/Anatomy-Embedding-Foundation-Model",
    "vox2vec": "vox2vec (Goncharov et al., MICCAI 2023): vox2vec_contrastive.pt / vox2vec_vicreg.pt on Hugging Face "
               "https://huggingface.co/mishgon/vox2vec, or vox2vec.pt (Google Drive) from https://github.com/mishgon/vox2vec",
    "hdssl": "HDSSL (Kats et al.): CT and MRI .ckpt files, linked (Google Drive) from the README of "
             "https://github.com/multimodallearning/hierarchical-dense-ssl",
}

HDSSL_CAVEAT = (
    "The published HDSSL checkpoints lack the per-scale projection layers (scale_proj): upstream kept them in a "
    "plain Python list, so they were never registered, trained or saved. This model therefore uses the backbone "
    "pyramid levels directly (992-d), not the paper's 160-d hierarchical embedding."
)
