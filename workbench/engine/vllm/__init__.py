"""The ``vllm`` backend, a package by concern (see ``engine``'s docstring for how it works):

- ``engine``: the kernel side, ``VLLMEngine`` (admission, steps, outputs, captures, monitoring);
- ``worker``: what runs in vLLM's processes (patched decoder layers, ``WorkbenchWorker``);
- ``tables``: spec -> op tables, and the slots holding them; the op math is ``workbench.opmath``;
- ``shm``: shared-memory transfer (captures, fault counter, monitoring board);
- ``supervision``: starting, watching and stopping vLLM's processes;
- ``plugin``: the light ``vllm.general_plugins`` entry point;
- ``_compat``: every vLLM internal used, and the tested vLLM range.

Names load on first use, so vLLM's processes (which import ``worker``) never import the engine.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "VLLMSteerModel": ".engine", "VLLMEngine": ".engine", "VLLMSteeringConfig": ".engine", "RemoteCaptureHandle": ".engine",
    "load_vllm": ".engine", "vllm_available": ".engine",
    "pack_spec": ".tables", "Slots": ".tables",
    "WorkbenchWorker": ".worker", "CONFIG_KEY": ".worker",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value
