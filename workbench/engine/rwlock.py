"""A writer-preferring readers-writer lock for asyncio that works from any event loop.

Written by hand because the asyncio locks (and ``aiorwlock``) bind to the first event loop that
uses them, while a model in a notebook kernel is driven from the kernel's loop, from
``asyncio.run`` in scripts, and from the server's loop in turn.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import asynccontextmanager


class AsyncRWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    >>> lock = AsyncRWLock()
    >>> async with lock.reading(): ...  # doctest: +SKIP
    """

    def __init__(self):
        self._mutex = threading.Lock()
        self._readers = 0
        self._writer = False
        self._waiting: deque = deque()  # [kind, loop, future]

    @property
    def readers(self) -> int:
        return self._readers

    @property
    def writer_waiting(self) -> bool:
        return any(entry[0] == "w" for entry in self._waiting)

    async def acquire(self, kind: str) -> None:
        loop = asyncio.get_running_loop()
        with self._mutex:
            if self._can_grant(kind, queue_empty=not self._waiting):
                self._take(kind)
                return
            entry = [kind, loop, loop.create_future()]
            self._waiting.append(entry)
        try:
            await entry[2]
        except asyncio.CancelledError:
            with self._mutex:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                    self._wake()
                    raise
            if entry[2].done() and not entry[2].cancelled():
                self.release(kind)  # granted just as we were cancelled: hand it back
            raise  # else the grant in flight finds the future cancelled and releases it

    def release(self, kind: str) -> None:
        with self._mutex:
            if kind == "w":
                self._writer = False
            else:
                self._readers -= 1
            self._wake()

    def _can_grant(self, kind: str, queue_empty: bool) -> bool:
        if kind == "w":
            return not self._writer and self._readers == 0 and queue_empty
        return not self._writer and (queue_empty or not self.writer_waiting)

    def _take(self, kind: str) -> None:
        if kind == "w":
            self._writer = True
        else:
            self._readers += 1

    def _wake(self) -> None:
        while self._waiting:
            kind, loop, fut = self._waiting[0]
            if kind == "w":
                if self._writer or self._readers:
                    return
            elif self._writer:
                return
            self._waiting.popleft()
            self._take(kind)
            try:
                loop.call_soon_threadsafe(self._grant, kind, fut)
            except RuntimeError:  # that loop is closed: nobody will use the grant
                self._writer = False if kind == "w" else self._writer
                self._readers -= kind == "r"
            if kind == "w":
                return

    def _grant(self, kind: str, fut: asyncio.Future) -> None:
        if fut.cancelled():  # cancelled while the grant travelled
            self.release(kind)
        else:
            fut.set_result(None)

    @asynccontextmanager
    async def reading(self):
        await self.acquire("r")
        try:
            yield
        finally:
            self.release("r")

    @asynccontextmanager
    async def writing(self):
        await self.acquire("w")
        try:
            yield
        finally:
            self.release("w")
