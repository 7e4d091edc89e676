"""Training data sets: which cases exist (``DatasetSpec``) and their cached, preprocessed arrays.

A data set is a folder of images (NIfTI, NRRD, MHA or DICOM series sub-folders), optionally with a
folder of label maps whose file names match, or a manifest JSON (the phantom cohort's
``manifest.json``, or ``{"cases": [{"id": ..., "image": ..., "label": ...}]}``).

Preprocessing (read, resample to the method's spacing, apply its intensity preset) runs once per
case and is cached on disk by MONAI's ``PersistentDataset``; the cache key contains the file path,
size and modification time and the preprocessing configuration, so an edited file or a new spacing
never reuses a stale entry. Cached items are tensors, loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

try:
    from monai.transforms import Transform
except ImportError:  # a Slicer with only ONNX Runtime lists and checks data sets (Trainer module) without MONAI
    Transform = object

from anatomical_embedding.data.preprocess import PreprocessConfig, body_crop, preprocess_volume  # noqa: F401 (re-exported)
from anatomical_embedding.io import read_image
from anatomical_embedding.io.images import IMAGE_SUFFIXES, dicom_series_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseRecord:
    id: str
    image: Path
    label: Path | None = None


def case_id_from_path(path: Path) -> str:
    """File name without its image ending(s): ``ct_01.nii.gz`` -> ``ct_01``; a DICOM folder -> its name."""
    name = path.name
    low = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if low.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _list_images(folder: Path) -> list[Path]:
    items = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES):
            items.append(p)
        elif p.is_dir() and dicom_series_ids(p):
            items.append(p)
    return items


def _detected_labels(folder: Path) -> Path | None:
    """The ``labels/`` of a cohort-like layout, or None when it is absent or holds no label map.

    An empty one (made ahead of time, or a Trainer training folder with unlabelled cases only) means no labels:
    pretraining needs none, so it must not fail on it. A labels folder given explicitly that is empty stays an
    error (:meth:`DatasetSpec.from_folder`): the user asked for labels."""
    if not folder.is_dir():
        return None
    if not _list_images(folder):
        log.info("%s holds no label maps: the data set has no labels", folder)
        return None
    return folder


@dataclass
class DatasetSpec:
    """The cases of a data set; built by :meth:`from_path` with all input checks done up front."""

    cases: list[CaseRecord]
    source: str = ""

    @property
    def labelled(self) -> list[CaseRecord]:
        return [c for c in self.cases if c.label is not None]

    @property
    def unlabelled(self) -> list[CaseRecord]:
        return [c for c in self.cases if c.label is None]

    def summary(self) -> dict:
        return {"n_cases": len(self.cases), "n_labelled": len(self.labelled), "source": self.source}

    @classmethod
    def from_path(cls, images: str | Path, labels: str | Path | None = None) -> "DatasetSpec":
        """A folder of images (plus optional label folder), or a manifest ``.json``."""
        images = Path(images)
        if not images.exists():
            raise FileNotFoundError(f"data path {images} does not exist")
        if images.is_file() and images.suffix == ".json":
            if labels is not None:
                raise ValueError("give labels inside the manifest, not with a separate labels folder")
            return cls.from_manifest(images)
        if images.is_dir() and (images / "manifest.json").is_file() and labels is None:
            return cls.from_manifest(images / "manifest.json")
        if images.is_dir() and (images / "images").is_dir() and labels is None:
            # A cohort-like layout without manifest: DIR/images and DIR/labels.
            return cls.from_folder(images / "images", _detected_labels(images / "labels"))
        return cls.from_folder(images, labels)

    @classmethod
    def from_folder(cls, images_dir: Path, labels_dir: Path | None = None) -> "DatasetSpec":
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise ValueError(f"{images_dir} is not a folder; pass a folder of images or a manifest .json")
        image_paths = _list_images(images_dir)
        if not image_paths:
            raise ValueError(
                f"no images found in {images_dir}; expected files ending in {', '.join(IMAGE_SUFFIXES)} "
                "or sub-folders holding a DICOM series"
            )
        by_id = {case_id_from_path(p): p for p in image_paths}
        label_by_id: dict[str, Path] = {}
        if labels_dir is not None:
            labels_dir = Path(labels_dir)
            if not labels_dir.is_dir():
                raise ValueError(f"labels folder {labels_dir} does not exist")
            label_by_id = {case_id_from_path(p): p for p in _list_images(labels_dir)}
            if not label_by_id:
                raise ValueError(f"no label maps found in {labels_dir}")
            orphans = sorted(set(label_by_id) - set(by_id))
            if orphans:
                raise ValueError(
                    f"{len(orphans)} label map(s) in {labels_dir} match no image in {images_dir} "
                    f"(e.g. {orphans[:3]}); label files must have the same name as their image"
                )
        cases = [CaseRecord(cid, p, label_by_id.get(cid)) for cid, p in by_id.items()]
        return cls(cases, source=str(images_dir))

    @classmethod
    def from_manifest(cls, manifest: Path) -> "DatasetSpec":
        manifest = Path(manifest)
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{manifest} is not valid JSON: {exc}") from exc
        entries = data.get("subjects", data.get("cases"))
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{manifest} lists no cases; expected a 'cases' (or 'subjects') list")
        root = manifest.parent
        cases = []
        for n, entry in enumerate(entries):
            if "image" not in entry:
                raise ValueError(f"case {n} in {manifest} has no 'image'")
            image = (root / entry["image"]).resolve()
            label = (root / entry["label"]).resolve() if entry.get("label") else None
            for p in (image, label):
                if p is not None and not p.exists():
                    raise FileNotFoundError(f"{p} (listed in {manifest}) does not exist")
            cases.append(CaseRecord(str(entry.get("id", case_id_from_path(image))), image, label))
        return cls(cases, source=str(manifest))

    def check_volumes(self, min_size_ijk: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                      allow_2d: bool = False) -> None:
        """Read each header and fail early on 2D images or volumes smaller than a patch.

        ``min_size_ijk`` is in voxels at ``spacing`` (the training grid); sizes are estimated from the
        header's physical extent, so no voxel data is read.
        """
        import SimpleITK as sitk

        for case in self.cases:
            if case.image.is_dir():
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(case.image))
                reader = sitk.ImageFileReader()
                reader.SetFileName(files[0])
                reader.ReadImageInformation()
                size = list(reader.GetSize()[:2]) + [len(files)]
                sp = list(reader.GetSpacing()[:2])
                sp.append(float(reader.GetSpacing()[2]) if reader.GetDimension() > 2 else 1.0)
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(case.image))
                reader.ReadImageInformation()
                size = list(reader.GetSize()) + [1] * (3 - reader.GetDimension())
                sp = list(reader.GetSpacing()) + [1.0] * (3 - reader.GetDimension())
            size, sp = np.asarray(size[:3], float), np.asarray(sp[:3], float)
            if (reader.GetDimension() == 2 or size[2] == 1) and not allow_2d:
                raise ValueError(
                    f"{case.image} is a 2D image; this method trains on 3D volumes "
                    "(use the Adam/Eve 2D mode for radiographs, or remove the file)"
                )
            if min_size_ijk is not None and spacing is not None:
                grid = size * sp / np.broadcast_to(np.asarray(spacing, float), (3,))
                if np.any(grid + 1e-6 < np.asarray(min_size_ijk)):
                    raise ValueError(
                        f"{case.image} is {np.round(grid).astype(int).tolist()} voxels at {list(spacing)} mm, "
                        f"smaller than the patch {list(min_size_ijk)}; use a smaller patch_size or larger images"
                    )


class LoadPreprocessd(Transform):
    """MONAI dictionary transform: ``{"image": path, "label": path|None, ...}`` -> tensors.

    Deterministic and a MONAI ``Transform``, so ``PersistentDataset`` caches its output (it caches
    up to the first random or non-MONAI transform).
    """

    def __init__(self, config: PreprocessConfig):
        self.config = config

    def __call__(self, item: dict) -> dict:
        import torch

        image = read_image(item["image"])
        label = read_image(item["label"]) if item.get("label") else None
        if label is not None and (label.array.shape != image.array.shape):
            raise ValueError(
                f"label {item['label']} has shape {label.array.shape} but image {item['image']} has "
                f"{image.array.shape}; a label map must share its image's voxel grid"
            )
        if label is not None:
            # Trust the image geometry; label files written by other tools often differ by rounding.
            label = image.with_array(label.array)
        vol, lab = preprocess_volume(image, self.config, label)
        out = {
            "id": item["id"],
            "image": torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32)),
            "ijk_to_lps": torch.from_numpy(vol.ijk_to_world("LPS")),
            "spacing": torch.from_numpy(vol.spacing.copy()),
        }
        if lab is not None:
            out["label"] = torch.from_numpy(np.ascontiguousarray(lab.array, dtype=np.int16))
        return out


def _file_stamp(path: Path) -> list:
    """Path, size and mtime (for DICOM folders: of every file), so edited inputs change the cache key."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return [str(path.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def build_dataset(spec: DatasetSpec, config: PreprocessConfig, cache_dir: str | Path | None = None,
                  transform=None, cases: Sequence[CaseRecord] | None = None):
    """A MONAI dataset of preprocessed cases.

    Items: ``{"id": str, "image": float32 tensor [k, j, i], "label": int16 tensor [k, j, i]`` (only for
    labelled cases) ``, "ijk_to_lps": float64 4x4 tensor, "spacing": float64 (3,) tensor}``.
    ``transform`` (optional) runs after the cached preprocessing, e.g. random augmentation.
    With ``cache_dir`` the preprocessing runs once per case and configuration (a sub-folder per
    configuration), otherwise on every access.
    """
    from monai.data import Dataset, PersistentDataset
    from monai.transforms import Compose

    chosen = list(spec.cases if cases is None else cases)
    items = [
        {"id": c.id, "image": str(c.image), "label": str(c.label) if c.label else None,
         "stamp": json.dumps(_file_stamp(c.image) + (_file_stamp(c.label) if c.label else []))}
        for c in chosen
    ]
    steps = [LoadPreprocessd(config)]
    if transform is not None:
        steps.append(transform)
    pipeline = Compose(steps)
    if cache_dir is None:
        return Dataset(items, pipeline)
    folder = Path(cache_dir) / f"preprocessed-{config.key()}"
    return PersistentDataset(items, pipeline, cache_dir=folder)
