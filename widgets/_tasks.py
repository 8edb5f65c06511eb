"""What every panel shares: the client it talks to, tasks on the kernel's event loop, errors in the panel.

Generation and API calls run as asyncio tasks on the loop that is running when a widget event
arrives (the kernel's loop in JupyterLab and Voila), so the kernel stays responsive while a reply
streams. Without a running loop (plain scripts) they run on one private loop in a helper thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import threading

import ipywidgets as w

import workbench as wb

_loop_lock = threading.Lock()
_private_loop: asyncio.AbstractEventLoop | None = None


def _background_loop() -> asyncio.AbstractEventLoop:
    global _private_loop
    with _loop_lock:
        if _private_loop is None or _private_loop.is_closed():
            _private_loop = asyncio.new_event_loop()
            threading.Thread(target=_private_loop.run_forever, name="widgets-loop", daemon=True).start()
        return _private_loop


def spawn(coro):
    """Schedule ``coro`` on the running loop (an ``asyncio.Task``) or the private one (a concurrent Future)."""
    try:
        return asyncio.get_running_loop().create_task(coro)
    except RuntimeError:
        return asyncio.run_coroutine_threadsafe(coro, _background_loop())


class Session:
    """The client a set of panels shares, and the name of the model it serves.

    >>> session = Session(model)                         # or Session(wb.Client(base_url=...))  # doctest: +SKIP
    """

    def __init__(self, source):
        self._name: str | None = None
        if isinstance(source, wb.SteerModel):
            self.client = wb.AsyncClient(source)
            self._name = source.model_name
            self.layer_count: int | None = source.layer_count
        elif isinstance(source, wb.Client):
            self.client = source.async_client
            self.layer_count = None
        elif isinstance(source, wb.AsyncClient):
            self.client = source
            self.layer_count = None
        else:
            raise wb.ValidationError(f"panels take a SteerModel, a Client or an AsyncClient, got {type(source).__name__}")

    @classmethod
    def of(cls, source) -> "Session":
        return source if isinstance(source, Session) else cls(source)

    async def model_name(self) -> str:
        """The served model's name (the first one the server lists)."""
        if self._name is None:
            self._name = (await self.client.models()).data[0].id
        return self._name


def error_html(exc: BaseException) -> str:
    kind = type(exc).__name__
    return (f'<div class="wb-error" style="color:#b00020;white-space:pre-wrap">'
            f"<b>{html.escape(kind)}</b>: {html.escape(str(exc))}</div>")


class Panel(w.VBox):
    """A VBox with a ``Session``, an error line and a set of running tasks (``await panel.wait()``)."""

    def __init__(self, source, children=(), **kwargs):
        self.session = Session.of(source)
        self.error = w.HTML("", layout=w.Layout(width="100%"))
        self.error.add_class("wb-error-box")
        self._tasks: set = set()
        super().__init__(children=list(children) + [self.error], **kwargs)

    @property
    def client(self) -> wb.AsyncClient:
        return self.session.client

    def _spawn(self, coro):
        """Run ``coro`` in the background; an exception shows in the panel instead of killing the UI."""

        async def guarded():
            try:
                return await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # shown to the user; the panel keeps working
                self.show_error(exc)
                return None

        task = spawn(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def show_error(self, exc: BaseException | None) -> None:
        self.error.value = "" if exc is None else error_html(exc)

    async def wait(self) -> None:
        """Wait for every task this panel started (and the ones those started) to finish."""
        while self._tasks:
            pending = list(self._tasks)
            futures = [t if isinstance(t, asyncio.Future) else asyncio.wrap_future(t) for t in pending]
            await asyncio.gather(*futures, return_exceptions=True)
            self._tasks.difference_update(pending)

    def wait_sync(self, timeout: float | None = None) -> None:
        """Block until background tasks on the private loop finish (scripts without an event loop)."""
        for t in list(self._tasks):
            if isinstance(t, concurrent.futures.Future):
                concurrent.futures.wait([t], timeout=timeout)
