"""Run a coroutine to completion from synchronous code, inside or outside a running event loop.

In a notebook cell the kernel's loop is already running, so ``asyncio.run`` is refused there; the
coroutine then runs on a private loop in a helper thread while the caller waits. This is safe for
the workbench because its engines and locks are not bound to any one event loop.
"""

from __future__ import annotations

import asyncio
import threading


def run(coro):
    """Return ``coro``'s result (or raise its exception), whatever loop is or is not running here.

    >>> run(asyncio.sleep(0, result=3))
    3
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="workbench-sync", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
