"""The thin API: schemas, transports and clients shared by the widgets and plain notebook code.

``from workbench.api import AsyncClient`` stays light (no torch): ``Service`` (the handlers, which
run the engine) and ``InProcessTransport`` load on first use (PEP 562).
"""

from __future__ import annotations

import importlib

_LAZY = {"AsyncClient": ".client", "Client": ".client", "InProcessTransport": ".transports", "ROUTES": ".transports",
         "Service": ".handlers"}

__all__ = ["AsyncClient", "Client", "InProcessTransport", "ROUTES", "Service"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
