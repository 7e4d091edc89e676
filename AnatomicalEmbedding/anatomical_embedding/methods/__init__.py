"""Training methods: a registry from method name to :class:`~.base.Method` subclass.

Methods are imported lazily so that importing the package stays cheap and a broken optional method
cannot break the others. Other methods add one line to ``_REGISTRY``.
"""
from __future__ import annotations

import importlib

#: name -> "module:Class" (relative to this package).
_REGISTRY: dict[str, str] = {
    "adam": ".adam:AdamEveMethod",
    "aefm": ".aefm:AEFMMethod",
    "anatomask": ".anatomask:AnatoMaskMethod",
    "hdssl": ".hdssl:HDSSLMethod",
}

#: Supervised tasks the engine also runs (``get_method`` finds them), but which are not embedding methods:
#: ``available_methods()`` (pretraining choices, the demo, the Trainer's list) leaves them out.
_TASKS: dict[str, str] = {
    "finetune": ".finetune:FinetuneMethod",
}


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def get_method(name: str) -> type:
    """The method class registered under ``name`` (ValueError naming the choices otherwise)."""
    try:
        target = _REGISTRY[name] if name in _REGISTRY else _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(available_methods())}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module, __package__), cls)
