"""Training data from the scene: a volume (and segmentation) written as one case of a training folder."""
from __future__ import annotations

import logging
import pathlib
import re


def isValidCaseName(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""))


def exportCase(volumeNode, segmentationNode, outputDirectory, caseName: str, overwrite: bool = False) -> dict:
    """Write ``images/<case>.nii.gz`` and, with a segmentation, ``labels/<case>.nii.gz`` (+ names).

    The label map is rasterised on the volume's grid, segments numbered 1..n in segment order.
    Returns ``{"image": path, "label": path or None, "names": {value: name}}``.
    """
    from anatomical_embedding import io, mrml
    from anatomical_embedding.io.labelmaps import write_labelmap

    if volumeNode is None:
        raise ValueError("no volume selected")
    if not isValidCaseName(caseName):
        raise ValueError(f"invalid case name {caseName!r}: use letters, digits, '-', '_' and '.'")
    folder = pathlib.Path(outputDirectory)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    image = mrml.node_to_volume(volumeNode)
    imagePath = io.write_image(image, folder / "images" / f"{caseName}.nii.gz", overwrite=overwrite)
    labelPath, names = None, {}
    if segmentationNode is not None:
        (folder / "labels").mkdir(parents=True, exist_ok=True)
        label, names = mrml.segmentation_node_to_labelmap(segmentationNode, image)
        labelPath = write_labelmap(label, names, folder / "labels" / f"{caseName}.nii.gz", overwrite=overwrite)
    logging.info("Exported %s to %s", caseName, folder)
    return {"image": imagePath, "label": labelPath, "names": names}
