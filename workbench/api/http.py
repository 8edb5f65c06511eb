"""The HTTP transport: the same calls as in-process, to a ``workbench serve`` over httpx."""

from __future__ import annotations

import json

import httpx

from ..errors import APIConnectionError, APIError, APIValidationError


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    cls = APIValidationError if response.status_code < 500 else APIError
    raise cls(str(detail), response.status_code)


class HTTPTransport:
    """POSTs JSON to a workbench server; streams read server-sent events.

    >>> transport = HTTPTransport("http://127.0.0.1:8000", api_key="...")  # doctest: +SKIP
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._clients: dict = {}

    @property
    def _client(self) -> httpx.AsyncClient:
        # one httpx client per event loop: the sync Client runs each call on a loop of its own
        import asyncio

        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None or client.is_closed:
            self._clients = {k: c for k, c in self._clients.items() if not c.is_closed}
            client = httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout)
            self._clients[id(loop)] = client
        return client

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
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    item = json.loads(data)
                    if "error" in item:
                        err = item["error"]
                        cls = APIValidationError if err.get("status", 500) < 500 else APIError
                        raise cls(err.get("detail", "stream failed"), err.get("status"))
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
        await self._client.aclose()
        self._clients.clear()
