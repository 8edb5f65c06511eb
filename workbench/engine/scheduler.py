"""The scheduler-thread life cycle both backends share: a request queue, one thread, a clean close.

An engine subclasses :class:`ThreadedEngine`, calls ``_init_queue()``, starts its thread with
``_start_thread(target)`` and implements ``_running_count()``; its thread waits with
``_wait_for_work(has_work)`` and, when that returns False (closed), ends with
``_fail_on_close(running)``. ``submit``, ``cancel``, ``active_requests`` and ``close`` (the
:class:`~workbench.engine.base.Backend` contract's life cycle) are here, once.
"""

from __future__ import annotations

import threading
from collections import deque

from ..errors import EngineError
from .base import EngineBase, ErrorEvent, Request


class ThreadedEngine(EngineBase):
    """An engine whose requests run on one scheduler thread it owns."""

    _join_timeout: float = 30.0  # seconds close() waits for the thread

    def _init_queue(self) -> None:
        self._cond = threading.Condition()
        self._pending: deque = deque()
        self._closed = False

    def _start_thread(self, target, kind: str) -> None:
        self._thread = threading.Thread(target=target, name=f"workbench-{kind}-{self.model_name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the Backend contract
    def _refusal(self) -> str | None:
        """Why new requests are refused (None: accepted); called under the lock."""
        return "closed" if self._closed else None

    def submit(self, request: Request) -> None:
        """Queue ``request``; its events come through ``request.emit`` (an ``ErrorEvent`` if refused)."""
        with self._cond:
            reason = self._refusal()
            if reason is not None:
                request.emit(ErrorEvent(self._refused(reason)))
                return
            self._pending.append(request)
            self._cond.notify()

    def _refused(self, reason: str) -> EngineError:
        return EngineError(f"the {self.backend} engine of {self.model_name!r} is {reason}; load the model again")

    def cancel(self, request: Request) -> None:
        """Stop ``request``: dropped from the queue or from the running batch at the next step."""
        with self._cond:
            request.cancelled = True
            self._on_cancel(request)
            self._cond.notify()

    def _on_cancel(self, request: Request) -> None:
        """Under the lock, after ``request.cancelled`` is set (the thread drops cancelled requests)."""

    def _running_count(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def active_requests(self) -> int:
        """Requests queued or running (0 when idle)."""
        with self._cond:
            return len(self._pending) + self._running_count()

    def close(self) -> None:
        """Stop the engine and its thread; queued and running requests fail with ``EngineError``."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self._join_timeout)
        self._after_close()

    def _after_close(self) -> None:
        """Free what the backend holds, after its thread ended."""

    # ------------------------------------------------------------------ in the thread
    def _wait_for_work(self, has_work) -> bool:
        """Under the lock: wait until ``has_work()`` or close; False when closed."""
        while not self._closed and not has_work():
            self._cond.wait()
        return not self._closed

    def _fail_on_close(self, running: list, jobs=()) -> None:
        """Under the lock, in the thread: fail queued and ``running`` requests and pending ``jobs``; clear the queue."""
        error = EngineError(f"the {self.backend} engine of {self.model_name!r} was closed while this request ran")
        for req in list(self._pending) + list(running):
            req.emit(ErrorEvent(error))
        for _, fut in jobs:
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
