"""The ``vllm.general_plugins`` entry point, run at start-up in every vLLM process.

Light on purpose: it imports the worker half of the backend (torch, numpy, ``opmath``) and not the
workbench engine, features or API, which vLLM's processes never use.
"""

from __future__ import annotations


def register() -> None:
    """Patch the decoder layers of this process; start the orphan watchdog."""
    from .supervision import start_watchdog
    from .worker import patch_decoder_layers

    patch_decoder_layers()
    start_watchdog()
