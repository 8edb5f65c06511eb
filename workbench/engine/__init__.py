"""The steering engine: ``SteerModel``, the ``Backend`` contract, and its engines (``hf``, ``vllm``).

Names load on first use, so importing a backend's light parts (vLLM's processes import
``workbench.engine.vllm.worker``) does not import the engine.
"""

from __future__ import annotations

import importlib

_LAZY = {"SteerModel": ".base", "Backend": ".base", "Capabilities": ".base", "EngineBase": ".base",
         "Request": ".base", "load": ".loading"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value
