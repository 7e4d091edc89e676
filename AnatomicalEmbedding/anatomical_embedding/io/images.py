"""Reading and writing images (NIfTI, NRRD, MHA, PNG, DICOM files and series) as :class:`Volume`."""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from anatomical_embedding.io.geometry import Volume

log = logging.getLogger(__name__)

#: File name endings SimpleITK reads as single images.
IMAGE_SUFFIXES = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm",
)


def is_image_path(path: Path) -> bool:
    """True for a file with a known image ending, or a folder holding a DICOM series."""
    path = Path(path)
    if path.is_dir():
        return bool(dicom_series_ids(path))
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def dicom_series_ids(folder: Path) -> list[str]:
    import SimpleITK as sitk

    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])


def check_finite(volume: Volume, name: str, replace: bool = False) -> Volume:
    """Refuse a volume with NaN or infinite voxels (one NaN turns every embedding window into NaN), or,
    with ``replace``, set them to the smallest finite value (the background) with a warning."""
    arr = np.asarray(volume.array)
    if not np.issubdtype(arr.dtype, np.floating):
        return volume
    bad = ~np.isfinite(arr)
    n = int(bad.sum())
    if n == 0:
        return volume
    if not replace:
        raise ValueError(f"{name}: {n} of {arr.size} voxels are NaN or infinite; fix the image or pass "
                         f"--replace-nonfinite to set them to the image minimum")
    finite = arr[~bad]
    fill = float(finite.min()) if finite.size else 0.0
    log.warning("%s: replaced %d NaN/infinite voxel(s) of %d by %g (--replace-nonfinite)", name, n, arr.size, fill)
    return volume.with_array(np.where(bad, fill, arr).astype(arr.dtype))


def read_image(path: str | os.PathLike, series_id: str | None = None, replace_nonfinite: bool = False) -> Volume:
    """Read a file or a DICOM series folder into a :class:`Volume` (LPS world frame).

    2D images (PNG, a single X-ray DICOM) become single-slice volumes, as Slicer shows them.
    RGB images are converted to luminance. NaN/infinite voxels are refused (ValueError counting them)
    unless ``replace_nonfinite`` (see :func:`check_finite`).
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if path.is_dir():
        ids = dicom_series_ids(path)
        if not ids:
            raise ValueError(f"{path} is a folder without a DICOM series; pass an image file or a DICOM folder")
        if series_id is None:
            if len(ids) > 1:
                log.warning("%s holds %d DICOM series; reading the first (%s)", path, len(ids), ids[0])
            series_id = ids[0]
        elif series_id not in ids:
            raise ValueError(f"series {series_id} not in {path}; available: {ids}")
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series_id))
        image = reader.Execute()
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise ValueError(f"cannot read {path} as an image ({exc.args[0].splitlines()[0]})") from exc
    if image.GetNumberOfComponentsPerPixel() in (3, 4):
        channels = [sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32) for c in range(3)]
        image = 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    return check_finite(Volume.from_sitk(image), str(path), replace_nonfinite)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return s
    raise ValueError(f"unknown image file ending for {path}; use one of {', '.join(IMAGE_SUFFIXES)}")


def atomic_write(path: Path, write, overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` and move the result into place; never leaves a half-written file.

    Refuses to replace an existing file unless ``overwrite`` is set, so no user file is lost.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_image(volume: Volume, path: str | os.PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Write a :class:`Volume` atomically; the format follows the file ending."""
    import SimpleITK as sitk

    path = Path(path)
    _suffix(path)
    image = volume.to_sitk()
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, str(tmp), compress), overwrite)


def write_dicom_series(volume: Volume, folder: str | os.PathLike, rescale_hu: bool = True) -> list[Path]:
    """Write a CT-like DICOM series (one file per slice) with full geometry tags.

    Used by tests and the phantom tools to exercise DICOM reading; values are stored as int16 HU.
    """
    import time

    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    d = volume.direction
    series_uid = "1.2.826.0.1.3680043.2.1125." + time.strftime("%Y%m%d%H%M%S") + f".{os.getpid()}"
    orientation = "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # otherwise every slice gets its own new series UID
    paths = []
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        pos = volume.index_to_world(np.array([0.0, 0.0, float(k)]))
        tags = {
            "0008|0060": "CT",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".1",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in pos),
            "0020|0013": str(k + 1),
            "0028|0030": f"{volume.spacing[1]:.10f}\\{volume.spacing[0]:.10f}",
            "0018|0050": f"{volume.spacing[2]:.10f}",
            "0028|1052": "0",
            "0028|1053": "1",
        }
        for key, value in tags.items():
            sl.SetMetaData(key, value)
        out = folder / f"slice_{k:04d}.dcm"
        sl.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(out))
        writer.Execute(sl)
        paths.append(out)
    return paths
