"""Image geometry and file I/O. World coordinates in a Volume are LPS; see ``geometry``."""
from anatomical_embedding.io.geometry import (
    LPS_TO_RAS,
    Frame,
    Volume,
    convert_matrix,
    convert_points,
    crop,
    crop_or_pad,
    pad,
    pad_to_multiple,
    resample_like,
    reorient_to_canonical,
    resample_to_spacing,
)
from anatomical_embedding.io.images import atomic_write, check_finite, is_image_path, read_image, write_dicom_series, write_image
from anatomical_embedding.io.intensity import PRESETS, IntensityPreset, get_preset
from anatomical_embedding.io.markups import PointList, read_points, write_points

__all__ = [
    "LPS_TO_RAS", "Frame", "Volume", "convert_matrix", "convert_points", "crop", "crop_or_pad", "pad",
    "pad_to_multiple", "reorient_to_canonical", "resample_like", "resample_to_spacing", "atomic_write", "check_finite", "is_image_path", "read_image",
    "write_dicom_series", "write_image", "PRESETS", "IntensityPreset", "get_preset",
    "PointList", "read_points", "write_points",
]
