"""The vLLM engine's life in a Jupyter kernel: start from a cell, use, shut down, start again, and
leave no process behind when the kernel is killed."""

from __future__ import annotations

import os
import signal
import time

import nbformat
import psutil
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

CELLS = [
    # no `if __name__ == "__main__":` guard is possible in a notebook cell
    "import os, psutil, workbench as wb\n"
    "model = wb.load('default', backend='vllm', enforce_eager=True, kv_cache_gb=1)\n"
    "chat = [{'role': 'user', 'content': 'Tell me about Tokyo in two sentences.'}]",
    "[reply] = await model.chat(chat, temperature=0, max_tokens=12)\n"
    "first = reply.token_ids\n"
    "print('FIRST', reply.generated)",
    "def engine_procs():  # multiprocessing's resource tracker is the kernel's helper, not the engine's\n"
    "    return [p for p in psutil.Process().children(recursive=True) if 'resource_tracker' not in ' '.join(p.cmdline())]\n"
    "engine_pids = [p.pid for p in engine_procs()]\n"
    "print('ENGINE PROCESSES', len(engine_pids))\n"
    "model.close()\n"
    "left = [p for p in engine_pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]\n"
    "print('LEFT AFTER CLOSE', len(left))",
    "model = wb.load('default', backend='vllm', enforce_eager=True, kv_cache_gb=1)\n"
    "[again] = await model.chat(chat, temperature=0, max_tokens=12)\n"
    "print('SAME AFTER RESTART', again.token_ids == first)",
    "print('PIDS', ' '.join(str(p.pid) for p in psutil.Process().children(recursive=True)))",  # all: none may survive
]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_engine_lifecycle_in_a_kernel_and_no_orphans_after_a_kill(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        kernel_pid = client.km.provisioner.process.pid
        os.kill(kernel_pid, signal.SIGKILL)  # the harshest stop: no atexit, no finalizers
        text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
        pids = [int(p) for p in text.split("PIDS")[1].split()]
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.5)
        survivors = [p for p in pids if _alive(p)]
        for p in survivors:  # do not leave them to the next test
            os.kill(p, signal.SIGKILL)
    assert "FIRST " in text and "ENGINE PROCESSES 0" not in text
    assert "LEFT AFTER CLOSE 0" in text
    assert "SAME AFTER RESTART True" in text
    assert len(pids) >= 2  # engine core + worker
    assert not survivors, f"engine processes left after the kernel was killed: {survivors}"
