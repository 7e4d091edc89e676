"""The default models shipped with the engine (``anatomical_embedding/models/*.aemodel``) and which one suits
an image: used by ``embed``, ``match``, ``fewshot train`` and the viewer when no model is given."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

#: modality -> (package file, display name). Recipes: Resources/configs/default_{ct,mr}.toml.
DEFAULT_MODELS: dict[str, tuple[str, str]] = {
    "CT": ("default_ct.aemodel", "Default CT model (shipped)"),
    "MR": ("default_mr.aemodel", "Default MR model (shipped)"),
}

#: Below this 1st-percentile intensity an image is taken for a CT in Hounsfield units (air is -1000 HU).
_CT_AIR_HU = -500.0


def guess_modality(array: np.ndarray) -> str:
    """``"CT"`` when the image holds air in Hounsfield units, else ``"MR"`` (a heuristic; pass --model to choose)."""
    flat = np.asarray(array).ravel()
    sample = flat[:: max(1, flat.size // 200_000)]
    finite = sample[np.isfinite(sample)]
    return "CT" if finite.size and float(np.percentile(finite, 1)) < _CT_AIR_HU else "MR"


def default_model_path(modality: str) -> Path:
    """The shipped package for ``modality`` (``CT`` or ``MR``); FileNotFoundError if this install lacks it."""
    key = modality.upper()
    if key not in DEFAULT_MODELS:
        raise ValueError(f"no default model for modality {modality!r}; choose one of {', '.join(DEFAULT_MODELS)}")
    path = MODELS_DIR / DEFAULT_MODELS[key][0]
    if not path.is_file():
        raise FileNotFoundError(f"the default {key} model {path} is missing from this install; pass --model")
    return path


def resolve_model(model: str | None, image: np.ndarray) -> str:
    """``model`` if given, else the shipped default for the image's modality (logged, so the user sees it)."""
    if model:
        return model
    modality = guess_modality(image)
    path = default_model_path(modality)
    log.info("no --model given: using the shipped default %s model %s", modality, path.name)
    return str(path)


def builtin_entries() -> list[dict]:
    """Registry-style entries (``name``, ``path``, ``method``, ``builtin``) of the shipped packages present."""
    return [{"name": name, "path": str(MODELS_DIR / file), "method": "aefm", "builtin": True}
            for file, name in DEFAULT_MODELS.values() if (MODELS_DIR / file).is_file()]
