"""The HTTP transports: the same calls as in-process, to a ``workbench serve`` over httpx.

``HTTPTransport`` is the async one (``AsyncClient``); ``SyncHTTPTransport`` is its blocking twin
(``Client``), one pooled ``httpx.Client`` instead of an event loop per call.
"""

from __future__ import annotations

import asyncio
import json
import weakref

import httpx

from ..errors import APIConnectionError, APIError, APIValidationError

_DONE = object()


def _headers(api_key: str | None) -> dict:
    if not api_key:
        return {}
    # vllm-sdk takes the key with or without its "Bearer " prefix
    return {"Authorization": api_key if api_key.startswith("Bearer ") else f"Bearer {api_key}"}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    cls = APIValidationError if response.status_code < 500 else APIError
    raise cls(str(detail), response.status_code)


def _event(line: str):
    """One server-sent-events line: a chunk dict, ``_DONE``, or None (not a data line); errors raise."""
    if not line.startswith("data: "):
        return None
    data = line[6:]
    if data == "[DONE]":
        return _DONE
    item = json.loads(data)
    if "error" in item:
        err = item["error"]
        cls = APIValidationError if err.get("status", 500) < 500 else APIError
        raise cls(err.get("detail", "stream failed"), err.get("status"))
    return item


class HTTPTransport:
    """POSTs JSON to a workbench server; streams read server-sent events.

    >>> transport = HTTPTransport("http://127.0.0.1:8000", api_key="...")  # doctest: +SKIP
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self._headers = _headers(api_key)
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._clients: list[tuple[weakref.ref, httpx.AsyncClient]] = []

    @property
    def _client(self) -> httpx.AsyncClient:
        # an httpx.AsyncClient is bound to the loop it first ran on: one per live loop. Loops are held
        # weakly and matched by identity (an id() can be reused by a new loop after the old one is gone),
        # and the clients of closed loops are dropped so their sockets are freed with them.
        loop = asyncio.get_running_loop()
        found, keep = None, []
        for ref, client in self._clients:
            owner = ref()
            if owner is None or owner.is_closed() or client.is_closed:
                continue
            keep.append((ref, client))
            if owner is loop:
                found = client
        if found is None:
            found = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
            keep.append((weakref.ref(loop), found))
        self._clients = keep
        return found

    def sync(self) -> "SyncHTTPTransport":
        """A blocking transport to the same server with the same key (what ``Client`` uses)."""
        return SyncHTTPTransport(self.base_url, headers=self._headers, timeout=self._timeout)

    async def request(self, path: str, body: dict) -> dict:
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        _raise_for(response)
        return response.json()

    async def stream(self, path: str, body: dict):
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _raise_for(response)
                async for line in response.aiter_lines():
                    item = _event(line)
                    if item is _DONE:
                        return
                    if item is not None:
                        yield item
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"stream from {self.base_url}{path} broke: {exc}") from exc

    async def get(self, path: str) -> dict:
        try:
            response = await self._client.get(path)
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        _raise_for(response)
        return response.json()

    async def aclose(self) -> None:
        """Close this loop's connections (the other loops' go when those loops close)."""
        loop = asyncio.get_running_loop()
        mine = [c for ref, c in self._clients if ref() is loop]
        self._clients = [(ref, c) for ref, c in self._clients if ref() is not loop]
        for client in mine:
            await client.aclose()


class SyncHTTPTransport:
    """The blocking twin of ``HTTPTransport``: one pooled ``httpx.Client`` for every call.

    >>> transport = SyncHTTPTransport("http://127.0.0.1:8000", headers={})  # doctest: +SKIP
    """

    def __init__(self, base_url: str, headers: dict | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers or {}, timeout=timeout)

    def request(self, path: str, body: dict) -> dict:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        _raise_for(response)
        return response.json()

    def stream(self, path: str, body: dict):
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for line in response.iter_lines():
                    item = _event(line)
                    if item is _DONE:
                        return
                    if item is not None:
                        yield item
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"stream from {self.base_url}{path} broke: {exc}") from exc

    def get(self, path: str) -> dict:
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}{path}: {exc}") from exc
        _raise_for(response)
        return response.json()

    def close(self) -> None:
        self._http.close()
