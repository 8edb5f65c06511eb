"""Shared-memory transfer between vLLM's workers and the kernel (all on this machine).

- ``ship`` / ``unship``: fetched captures go from the step buffers into one mapped file in
  ``/dev/shm`` (one copy), not through vLLM's RPC pickling and msgpack;
- ``FaultCounter``: a word the workers bump when they fail a request, polled after every step;
- ``Board``: probe values of watched requests, written by the workers after each forward.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

def shm_file(prefix: str, suffix: str, size: int) -> str:
    """A new file of ``size`` zero bytes in shared memory (``/dev/shm``; the temp folder elsewhere)."""
    import tempfile

    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.ftruncate(fd, size)
    os.close(fd)
    return path


def ship(stores: dict, extra: dict) -> dict:
    """Write fetched captures to one shared-memory file the kernel maps: ``{"file", "index"}``.

    ``index[key][layer] = (shape, byte offset)``. The kernel is always on this machine (it started
    these processes), so rows go straight from the step buffers into a mapped file in ``/dev/shm``
    (one copy), not through vLLM's RPC pickling and msgpack. Per layer, the chunks of all keys are
    concatenated in one call, which is what keeps fetching 30 layers x 32 requests fast.
    """
    index = {key: {} for key in stores}
    plan, total = [], 0  # (layer, [(key, chunks)], offset, rows)
    layers = sorted({layer for parts in stores.values() for layer in parts})
    for layer in layers:
        members = [(key, parts[layer]) for key, parts in stores.items() if layer in parts]
        rows = 0
        for key, chunks in members:
            n = positions(chunks)
            hidden = chunks[0][1].shape[1]
            index[key][layer] = ((n, hidden), total + rows * hidden * 4)
            rows += n
        plan.append((layer, members, total, rows, hidden))
        total += rows * hidden * 4
    for key, parts in extra.items():
        for name, t in parts.items():
            index.setdefault(key, {})[name] = (tuple(t.shape), total)
            plan.append((name, [(key, [(0, t.reshape(1, -1))])], total, 1, t.numel()))
            total += t.numel() * 4
    if total == 0:
        return {"file": None, "index": index}
    path = shm_file("workbench-capture-", ".f32", total)
    mapped = torch.from_file(path, shared=True, size=total // 4, dtype=torch.float32)
    for _, members, offset, rows, width in plan:
        target = mapped[offset // 4: offset // 4 + rows * width].view(rows, width)
        if all(in_order(chunks) for _, chunks in members):
            torch.cat([t for _, chunks in members for _, t in chunks], out=target)
        else:
            at = 0
            for _, chunks in members:
                block = assemble(chunks)
                target[at:at + block.shape[0]] = block
                at += block.shape[0]
    del mapped
    return {"file": path, "index": index}


def unship(reply: dict) -> dict:
    """Map the shared-memory file a worker wrote (``ship``) and delete its name.

    The tensors are views of one private mapping: no copy is made, and the memory goes when the
    last of them does.
    """
    path = reply["file"]
    if path is None:
        return {key: {} for key in reply["index"]}
    try:
        size = os.path.getsize(path) // 4
        data = torch.from_file(path, shared=False, size=size, dtype=torch.float32)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    out = {}
    for key, parts in reply["index"].items():
        out[key] = {}
        for name, (shape, offset) in parts.items():
            out[key][name] = data[offset // 4: offset // 4 + math.prod(shape)].view(*shape)
    return out


def in_order(chunks) -> bool:
    expected = 0
    for start, rows in chunks:
        if start != expected:
            return False
        expected += rows.shape[0]
    return True


def nbytes(parts: dict) -> int:
    """Bytes held by one request's captured chunks (``{layer: [(start, rows)]}``)."""
    return sum(rows.numel() * rows.element_size() for chunks in parts.values() for _, rows in chunks)


def positions(chunks) -> int:
    return max(start + rows.shape[0] for start, rows in chunks)


def trim() -> None:
    """Give freed capture memory back to the OS (glibc keeps it in its arenas otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc: nothing to do
        pass


def assemble(parts) -> torch.Tensor:
    """Rows by position; a recomputed position (after preemption) overwrites the earlier copy."""
    if in_order(parts):  # the usual case: chunks in order, each where the last one ended
        return torch.cat([rows for _, rows in parts])
    end = positions(parts)
    out = torch.empty(end, parts[0][1].shape[1], dtype=torch.float32)
    seen = torch.zeros(end, dtype=torch.bool)
    for start, rows in parts:
        out[start:start + rows.shape[0]] = rows
        seen[start:start + rows.shape[0]] = True
    if not bool(seen.all()):
        first = int((~seen).nonzero()[0])
        raise RuntimeError(f"workbench: capture is missing position {first} of {end}")
    return out


class FaultCounter:
    """An int64 in a shared-memory file: the workers count requests they failed, the engine thread polls it.

    Reading a mapped word after each step costs nothing; an RPC per step to ask would cost a
    round trip through the engine core even when nothing failed.
    """

    def __init__(self):
        import numpy as np

        self.path = shm_file("workbench-faults-", ".i64", 8)
        self._word = np.memmap(self.path, dtype=np.int64, mode="r+", shape=(1,))
        self._seen = 0

    def moved(self) -> bool:
        now = int(self._word[0])
        if now == self._seen:
            return False
        self._seen = now
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


class Board:
    """Probe values of watched requests: ``[rows, max_model_len, width]`` float32 in a shared-memory file.

    The workers write a request's values at its positions right after each forward; this side
    reads them after the step. A mapped file, not RPC results: reading costs nothing per step,
    which is what keeps monitoring cheap inside a busy batch. The last column is the steered flag.
    """

    def __init__(self, rows: int, length: int, width: int):
        import numpy as np

        self.shape = (int(rows), int(length), int(width))
        self.path = shm_file("workbench-board-", ".f32", 4 * rows * length * width)
        self._data = np.memmap(self.path, dtype=np.float32, mode="r+", shape=self.shape)
        self._free = list(range(rows))
        self._cooling: list = []

    def acquire(self) -> int | None:
        return self._free.pop(0) if self._free else None

    def release(self, row: int | None, now: bool = False) -> None:
        if row is None:
            return
        (self._free if now else self._cooling).append(row)

    def step_done(self) -> None:
        """Rows released before this step are free again (their requests ran no forward in it)."""
        if self._cooling:
            self._free.extend(self._cooling)
            self._cooling = []

    def read(self, row: int, start: int, end: int, count: int, steered: bool):
        block = torch.from_numpy(self._data[row, start:end].copy())
        return block[:, :count], ([bool(x) for x in (block[:, -1] > 0.5).tolist()] if steered else None)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
