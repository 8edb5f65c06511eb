"""``AsyncClient`` and ``Client``: the thin API the widgets and plain notebook code use.

Method names and argument order follow the vllm-sdk seed. ``model=`` takes a ``Variant`` (its
interventions ride along) or a model name.

>>> client = wb.AsyncClient(model)                     # in-process  # doctest: +SKIP
>>> reply = await client.chat.completions.create(model=wb.Variant("default"),
...     messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=32)  # doctest: +SKIP
>>> reply.choices[0].message.content  # doctest: +SKIP
"""

from __future__ import annotations

import queue
import threading

from .._sync import run
from ..errors import ValidationError
from . import schemas as s
from .transports import InProcessTransport


def _steering_dict(model, steering=None):
    """The extra spec of a request: ``steering=`` (a SteeringSpec or dict), else a Variant's ``spec``."""
    steering = steering if steering is not None else getattr(model, "spec", None)
    if steering is None:
        return None
    return steering.to_dict() if hasattr(steering, "to_dict") else dict(steering)


def _model_and_interventions(model, interventions=None):
    """A model name and the interventions of a Variant (or the ones given)."""
    if hasattr(model, "interventions") and hasattr(model, "model_name"):
        ivs = [iv.to_dict() if hasattr(iv, "to_dict") else dict(iv) for iv in model.interventions]
        return model.model_name, (ivs + list(interventions or [])) or None
    if not isinstance(model, str) or not model:
        raise ValidationError(f"model must be a Variant or a model name, got {model!r}")
    return model, list(interventions) if interventions else None


def _messages(messages) -> list[dict]:
    return [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in messages]


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


class _Completions:
    def __init__(self, client):
        self._c = client

    def _body(self, model, messages, stream, **kw) -> dict:
        name, ivs = _model_and_interventions(model, kw.pop("interventions", None))
        extra = _steering_dict(model, kw.pop("steering", None))
        return _drop_none({"model": name, "messages": _messages(messages), "interventions": ivs, "stream": stream,
                           "steering": extra, **kw})

    async def create(self, *, model, messages, **kwargs) -> s.ChatCompletionResponse:
        """One chat completion (``max_completion_tokens``, ``temperature``, ``seed``, ``top_p``, ``stop``, ...)."""
        data = await self._c._transport.request("/v1/chat/completions", self._body(model, messages, False, **kwargs))
        return s.ChatCompletionResponse.model_validate(data)

    async def create_stream(self, *, model, messages, **kwargs):
        """Yield ``ChatCompletionChunk``s as tokens are produced; leaving the loop stops the generation."""
        async for data in self._c._transport.stream("/v1/chat/completions", self._body(model, messages, True, **kwargs)):
            yield s.ChatCompletionChunk.model_validate(data)


class _Chat:
    def __init__(self, client):
        self.completions = _Completions(client)


class _Features:
    def __init__(self, client):
        self._c = client

    async def _call(self, path, schema, body):
        return schema.model_validate(await self._c._transport.request(path, _drop_none(body)))

    async def search(self, query: str, model, top_k: int = 10) -> s.FeatureSearchResponse:
        name, _ = _model_and_interventions(model)
        return await self._call("/v1/features/search", s.FeatureSearchResponse,
                                {"query": query, "model_name": name, "top_k": top_k})

    async def rerank(self, query: str, features, model, top_k: int = 10) -> s.FeatureRerankResponse:
        name, _ = _model_and_interventions(model)
        items = [f.model_dump() if hasattr(f, "model_dump") else (f.to_item() if hasattr(f, "to_item") else dict(f))
                 for f in features]
        return await self._call("/v1/features/rerank", s.FeatureRerankResponse,
                                {"query": query, "model_name": name, "features": items, "top_k": top_k})

    async def inspect(self, messages, model, interventions=None, aggregation_method: str = "mean",
                      top_k: int = 10, steering=None) -> s.FeatureInspectionResponse:
        name, ivs = _model_and_interventions(model, interventions)
        return await self._call("/v1/chat_attribution/inspect", s.FeatureInspectionResponse,
                                {"model": name, "messages": _messages(messages), "top_k": top_k,
                                 "aggregation_method": aggregation_method, "interventions": ivs,
                                 "steering": _steering_dict(model, steering)})

    async def activations(self, messages, model, interventions=None, aggregation_method: str = "mean") -> s.ActivationsResponse:
        name, ivs = _model_and_interventions(model, interventions)
        return await self._call("/v1/chat_attribution/activations", s.ActivationsResponse,
                                {"model": name, "messages": _messages(messages), "aggregation_method": aggregation_method,
                                 "interventions": ivs})

    async def logits(self, messages, model, interventions=None, top_k=None, start_idx=None, end_idx=None) -> s.LogitsResponse:
        name, ivs = _model_and_interventions(model, interventions)
        return await self._call("/v1/chat_attribution/logits", s.LogitsResponse,
                                {"model": name, "messages": _messages(messages), "top_k": top_k, "start_idx": start_idx,
                                 "end_idx": end_idx, "interventions": ivs})

    async def contrast(self, dataset_1, dataset_2, model, interventions_1=None, interventions_2=None,
                       k_to_add: int = 10, k_to_remove: int = 10) -> s.ContrastResponse:
        name, ivs = _model_and_interventions(model, interventions_1)
        return await self._call("/v1/chat_attribution/contrast", s.ContrastResponse,
                                {"model": name, "dataset_1": [_messages(c) for c in dataset_1],
                                 "dataset_2": [_messages(c) for c in dataset_2], "k_to_add": k_to_add,
                                 "k_to_remove": k_to_remove, "interventions_1": ivs,
                                 "interventions_2": _model_and_interventions(model, interventions_2)[1]})

    async def norms(self, messages, model, layers=None, interventions=None, steering=None) -> s.NormsResponse:
        """Per-layer, per-token residual norms of a conversation (``.to_dataframe()`` for plots)."""
        name, ivs = _model_and_interventions(model, interventions)
        return await self._call("/v1/chat_attribution/norms", s.NormsResponse,
                                {"model": name, "messages": _messages(messages), "layers": layers, "interventions": ivs,
                                 "steering": _steering_dict(model, steering)})


    async def token_activations(self, messages, model, features=None, interventions=None,
                                steering=None) -> s.TokenActivationsResponse:
        """Per-token activations of ``features`` (ids or indices; default all) over a conversation."""
        name, ivs = _model_and_interventions(model, interventions)
        keys = None if features is None else [getattr(f, "id", f) if not isinstance(f, dict) else f.get("id") for f in features]
        return await self._call("/v1/chat_attribution/token_activations", s.TokenActivationsResponse,
                                {"model": name, "messages": _messages(messages), "features": keys, "interventions": ivs,
                                 "steering": _steering_dict(model, steering)})


class AsyncClient:
    """The async thin API: ``AsyncClient(model)`` in-process, or (with the server) ``AsyncClient(base_url=...)``."""

    def __init__(self, model=None, *, base_url: str | None = None, api_key: str | None = None, transport=None,
                 aliases=(), timeout: float = 600.0):
        if transport is None:
            if model is not None:
                transport = InProcessTransport(model, aliases)
            elif base_url is not None:
                from .http import HTTPTransport  # lands with `workbench serve`

                transport = HTTPTransport(base_url, api_key=api_key, timeout=timeout)
            else:
                raise ValidationError("give a SteerModel (in-process) or base_url= (a workbench server)")
        self._transport = transport
        self.chat = _Chat(self)
        self.features = _Features(self)

    async def models(self) -> s.ModelList:
        return s.ModelList.model_validate(await self._transport.get("/v1/models"))

    async def aclose(self) -> None:
        await self._transport.aclose()


class _SyncProxy:
    """Runs the async methods of an object to completion; async generators become iterators."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        attr = getattr(self._target, name)
        if isinstance(attr, (_Chat, _Completions, _Features)):
            return _SyncProxy(attr)
        if name == "create_stream":
            return lambda **kw: _iterate(attr(**kw))
        if callable(attr):
            return lambda *a, **kw: run(attr(*a, **kw))
        return attr


def _iterate(agen):
    """Drive an async generator from a helper thread; yield its items here, in order."""
    q: queue.Queue = queue.Queue(maxsize=64)
    done = object()
    stop = threading.Event()

    async def pump():
        try:
            async for item in agen:
                if stop.is_set():
                    break
                q.put(item)
        except BaseException as exc:
            q.put(exc)
        finally:
            await agen.aclose()
            q.put(done)

    thread = threading.Thread(target=lambda: run(pump()), daemon=True, name="workbench-stream")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let the pump see the stop flag and close the stream
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


class Client(_SyncProxy):
    """The sync thin API (same methods as ``AsyncClient``; ``create_stream`` is a plain iterator).

    >>> client = wb.Client(model)  # doctest: +SKIP
    >>> client.features.search("pirate", model="default", top_k=3).data[0].label  # doctest: +SKIP
    """

    def __init__(self, model=None, **kwargs):
        super().__init__(AsyncClient(model, **kwargs))

    @property
    def async_client(self) -> AsyncClient:
        """The ``AsyncClient`` underneath (what code on the kernel's event loop, e.g. the widgets, awaits)."""
        return self._target
