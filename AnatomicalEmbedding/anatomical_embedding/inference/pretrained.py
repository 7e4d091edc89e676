"""Published checkpoints -> our networks (AEFM ``abdomen_foundation.pth``, vox2vec ``*.pt``, HDSSL ``.ckpt``).

Each published file has its own container and key prefix (see ``/work/shared/reference-networks/*/NOTES.md``):

=========  ==============================================  ==================================================
kind       container                                       keys kept
=========  ==============================================  ==================================================
aefm       ``ckpt['net']``                                 ``sam.*`` with the prefix stripped; others ignored
           (the segmentation head ``fullconn_head.*`` etc.)
vox2vec    the bare FPN3d state_dict                       all, no prefix
hdssl      ``ckpt['state_dict']`` (else the dict itself)   if any key starts with ``backbone.``: only those,
                                                           stripped; ``proj_head.*``/``rest_head.*`` ignored
=========  ==============================================  ==================================================

Loading is strict: a file whose keys or shapes do not match the requested network raises ``ValueError``
listing the missing / unexpected / mis-shaped keys and, where recognisable, what the file looks like instead.
Files are read with ``torch.load(weights_only=True)``: no code in a checkpoint is ever executed.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from anatomical_embedding.inference.published import FORMATS as KINDS
from anatomical_embedding.inference.published import Kind

log = logging.getLogger(__name__)

#: Published FPN shapes, used to recognise a file given under the wrong kind.
_PUBLISHED_FPN = {"vox2vec": (16, 6), "hdssl": (32, 5)}
_LIST_LIMIT = 8


def _read(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors have several types; report them uniformly
        raise ValueError(
            f"cannot read {path} as a weights-only torch checkpoint ({type(exc).__name__}: {exc}). "
            "Only plain tensor dictionaries are accepted; re-save the weights with "
            "torch.save(model.state_dict())"
        ) from exc


def _tensor_items(obj: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def _fpn_shape(state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(base_channels, num_scales) of an FPN3d state dict, or None if it is not one."""
    weight = state.get("first_conv.weight")
    levels = {int(m.group(1)) for k in state if (m := re.match(r"left_blocks\.(\d+)\.", k))}
    if weight is None or not levels:
        return None
    return int(weight.shape[0]), max(levels) + 2


def _describe(obj: Any) -> str:
    """A guess at what a checkpoint holds, for error messages."""
    if isinstance(obj, Mapping) and isinstance(obj.get("net"), Mapping):
        if any(str(k).startswith("sam.") for k in obj["net"]):
            return "an AEFM checkpoint (weights in ['net'] with 'sam.' keys): use kind='aefm'"
    state = (
        _tensor_items(obj.get("state_dict"))
        if isinstance(obj, Mapping) and "state_dict" in obj
        else _tensor_items(obj)
    )
    if any(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    shape = _fpn_shape(state)
    if shape is not None:
        known = [kind for kind, pub in _PUBLISHED_FPN.items() if pub == shape]
        what = f"an FPN3d with base_channels={shape[0]}, num_scales={shape[1]}"
        if known:
            return f"{what}, the published {known[0]} configuration: use kind={known[0]!r}"
        return (
            f"{what} (published vox2vec: 16/6, HDSSL: 32/5); pass config={{'base_channels': {shape[0]}, "
            f"'num_scales': {shape[1]}}} if that is intended"
        )
    if state:
        return f"a state dict whose first keys are {sorted(state)[:3]}"
    keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
    return f"no tensor state dict (top level: {keys})"


def extract_state_dict(obj: Any, kind: Kind) -> dict[str, torch.Tensor]:
    """Apply the published container/prefix rules of ``kind`` (table in the module doc)."""
    if kind == "aefm":
        net = obj.get("net") if isinstance(obj, Mapping) else None
        if not isinstance(net, Mapping):
            raise ValueError(
                f"not an AEFM checkpoint: expected a dict with the weights under 'net'; "
                f"the file looks like {_describe(obj)}"
            )
        # The reference filters with `'sam.' in k` and `k.replace('sam.', '')`; a prefix test is the same on
        # its keys and cannot mangle a key that merely contains 'sam.' further in.
        state = {k[4:]: v for k, v in _tensor_items(net).items() if k.startswith("sam.")}
        if not state:
            raise ValueError(
                f"AEFM checkpoint has no 'sam.' keys under 'net'; it looks like {_describe(obj)}"
            )
        return state
    if kind == "vox2vec":
        state = _tensor_items(obj)
        if not state:
            raise ValueError(
                f"not a vox2vec checkpoint (a bare FPN3d state_dict); the file holds {_describe(obj)}"
            )
        return state
    if kind == "hdssl":
        inner = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
        state = _tensor_items(inner)
        if not state:
            raise ValueError(
                f"not an HDSSL checkpoint (weights in ['state_dict']); the file holds {_describe(obj)}"
            )
        if any(k.startswith("backbone.") for k in state):  # raw Lightning checkpoint
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        # Pretraining heads are not part of the published backbone (scale_proj never is: nets/hdssl.py).
        return {
            k: v for k, v in state.items() if not k.startswith(("proj_head.", "rest_head.", "scale_proj."))
        }
    raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")


def build_network(kind: Kind, config: Mapping[str, Any] | None = None) -> nn.Module:
    """The network a ``kind`` checkpoint loads into; ``config`` overrides constructor arguments."""
    config = dict(config or {})
    if kind == "vox2vec":
        from anatomical_embedding.nets.vox2vec import Vox2VecFPN

        return Vox2VecFPN(**config)
    if kind == "hdssl":
        from anatomical_embedding.nets.hdssl import HDSSLFPN

        return HDSSLFPN(**config)
    if kind == "aefm":
        try:  # imported lazily: AEFM's network lives in its own module
            from anatomical_embedding.nets.aefm_unet import AEFMUNet
        except ImportError as exc:  # pragma: no cover - depends on the AEFM module being present
            raise ValueError(f"the AEFM network is not available ({exc})") from exc
        return AEFMUNet(**config)
    raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")


def _shorten(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else "")


def load_state_dict_strict(
    net: nn.Module, state: Mapping[str, torch.Tensor], kind: str, hint: str = ""
) -> None:
    """``net.load_state_dict(state)`` that reports every mismatch at once as a ValueError."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"checkpoint does not match the {kind} network ({type(net).__name__})"]
        if missing:
            parts.append(f"missing keys: {_shorten(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_shorten(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_shorten(shapes)}")
        if hint:
            parts.append(f"the file looks like {hint}")
        raise ValueError("; ".join(parts))
    # num_batches_tracked etc. may come as another dtype; copy_ in load_state_dict casts.
    net.load_state_dict(state, strict=True)


def load_published_checkpoint(
    path: str | Path, kind: Kind, config: Mapping[str, Any] | None = None
) -> nn.Module:
    """Load a published checkpoint into our network, in eval mode, on CPU.

    ``kind``: ``"aefm"`` (-> ``nets.aefm_unet.AEFMUNet``), ``"vox2vec"`` (-> ``nets.vox2vec.Vox2VecFPN``) or
    ``"hdssl"`` (-> ``nets.hdssl.HDSSLFPN``, backbone only: the published files hold no usable heads).
    ``config`` overrides the published constructor arguments (e.g. ``{"base_channels": 1}`` for a test net).
    BatchNorm running statistics are part of the vox2vec/HDSSL weights, hence eval mode.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; use one of {', '.join(KINDS)}")
    obj = _read(path)
    state = extract_state_dict(obj, kind)
    net = build_network(kind, config)
    load_state_dict_strict(net, state, kind, hint=_describe(obj))
    log.info("loaded %s checkpoint %s (%d tensors)", kind, path, len(state))
    return net.eval()


def load_published_embedder(
    path: str | Path,
    kind: Literal["vox2vec", "hdssl"],
    config: Mapping[str, Any] | None = None,
    **embedder_kwargs: Any,
) -> nn.Module:
    """A published vox2vec/HDSSL checkpoint as a dense Embedder (eval mode); kwargs go to the embedder."""
    net = load_published_checkpoint(path, kind, config)
    if kind == "vox2vec":
        from anatomical_embedding.nets.vox2vec import Vox2VecEmbedder

        return Vox2VecEmbedder(net, **embedder_kwargs).eval()
    if kind == "hdssl":
        from anatomical_embedding.nets.hdssl import HDSSLEmbedder

        return HDSSLEmbedder(net, **embedder_kwargs).eval()
    raise ValueError(f"load_published_embedder supports 'vox2vec' and 'hdssl', got {kind!r}")


def published_model_info(kind: Literal["vox2vec", "hdssl"], modality: str = "ct") -> dict:
    """Model card of a published network (copy; see ``PUBLISHED_MODEL_INFO`` in the network modules)."""
    if kind == "vox2vec":
        from anatomical_embedding.nets.vox2vec import PUBLISHED_MODEL_INFO

        if modality.lower() != "ct":
            raise ValueError("vox2vec was published for CT only")
        return dict(PUBLISHED_MODEL_INFO)
    if kind == "hdssl":
        from anatomical_embedding.nets.hdssl import PUBLISHED_MODEL_INFO as HDSSL_INFO

        if modality.lower() not in HDSSL_INFO:
            raise ValueError(f"HDSSL was published for {', '.join(HDSSL_INFO)}, not {modality!r}")
        return dict(HDSSL_INFO[modality.lower()])
    raise ValueError(f"no published model info for {kind!r}; use 'vox2vec' or 'hdssl'")
