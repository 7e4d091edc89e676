"""Training data from the scene: a volume (and segmentation) written as one case of a training folder."""
from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import tempfile


def isValidCaseName(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name or ""))


def casePaths(outputDirectory, caseName: str) -> dict:
    """Where a case goes: ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` and the label names beside it."""
    from anatomical_embedding.io.labelmaps import sidecar_path

    folder = pathlib.Path(outputDirectory)
    label = folder / "labels" / f"{caseName}.nii.gz"
    return {"image": folder / "images" / f"{caseName}.nii.gz", "label": label, "names": sidecar_path(label)}


def _temporaryPath(final: pathlib.Path) -> pathlib.Path:
    # Hidden (the engine skips names starting with "."), in the final folder (so the rename is atomic), ending
    # like the final file (the writers pick the format from it).
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name[:-len('.nii.gz')]}.", suffix=".nii.gz", dir=final.parent)
    os.close(fd)
    return pathlib.Path(tmp)


def exportCase(volumeNode, segmentationNode, outputDirectory, caseName: str, overwrite: bool = False) -> dict:
    """Write ``images/<case>.nii.gz`` and, with a segmentation, ``labels/<case>.nii.gz`` (+ names).

    The label map is rasterised on the volume's grid, segments numbered 1..n in segment order.
    Returns ``{"image": path, "label": path or None, "names": {value: name}}``.

    The engine pairs images and labels by name, so a case is written as a whole: nothing is written if any file
    of the case exists (unless ``overwrite``: then a label of the case that the new export has none for is removed,
    or the new image would be paired with it); the files are written under temporary names and renamed into place
    only when all are written, so a failure leaves none of the new files.
    """
    from anatomical_embedding import io, mrml
    from anatomical_embedding.io.labelmaps import sidecar_path, write_labelmap

    if volumeNode is None:
        raise ValueError("no volume selected")
    if not isValidCaseName(caseName):
        raise ValueError(f"invalid case name {caseName!r}: use letters, digits, '-', '_' and '.'")
    folder = pathlib.Path(outputDirectory)
    paths = casePaths(folder, caseName)
    existing = [p for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"case {caseName!r} exists in {folder} ("
                              + ", ".join(str(p.relative_to(folder)) for p in existing)
                              + "); choose another case name or allow overwriting")
    # Everything that can fail without writing comes first: the image and the rasterised label map, the folders.
    image = mrml.node_to_volume(volumeNode)
    label, names = None, {}
    if segmentationNode is not None:
        label, names = mrml.segmentation_node_to_labelmap(segmentationNode, image)
    staged: list[tuple[pathlib.Path, pathlib.Path]] = []  # (temporary, final)
    moved: list[pathlib.Path] = []
    # Folders made here are removed again on failure: an empty labels/ would fail the engine ("no label maps found").
    created: list[pathlib.Path] = []
    try:
        for sub in ("images",) + (("labels",) if label is not None else ()):
            if not (folder / sub).is_dir():
                (folder / sub).mkdir(parents=True)
                created.append(folder / sub)
        tmp = _temporaryPath(paths["image"])
        staged.append((tmp, paths["image"]))
        io.write_image(image, tmp, overwrite=True)
        if label is not None:
            tmp = _temporaryPath(paths["label"])
            staged += [(tmp, paths["label"]), (sidecar_path(tmp), paths["names"])]
            write_labelmap(label, names, tmp, overwrite=True)
        for tmp, final in staged:
            os.replace(tmp, final)
            moved.append(final)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for final in moved:  # a rename failed half way (rare): no new image beside an old label, or the reverse
            final.unlink(missing_ok=True)
        for sub in reversed(created):
            with contextlib.suppress(OSError):
                sub.rmdir()
        raise
    if label is None and overwrite:
        for stale in (paths["label"], paths["names"]):
            if stale.exists():
                logging.warning("Removed %s: the replaced case %s has no segmentation", stale, caseName)
                stale.unlink()
        with contextlib.suppress(OSError):
            (folder / "labels").rmdir()  # only if that left it empty (see above)
    logging.info("Exported %s to %s", caseName, folder)
    return {"image": paths["image"], "label": paths["label"] if label is not None else None, "names": names}
