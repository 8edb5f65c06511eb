"""``AsyncClient`` and ``Client``: the thin API the widgets and plain notebook code use.

Method names and argument order follow the vllm-sdk seed. ``model=`` takes a ``Variant`` (its
interventions ride along) or a model name. A client runs in-process on a ``SteerModel``
(``AsyncClient(model)``) or talks to a ``workbench serve`` (``AsyncClient(base_url=..., api_key=...)``;
without either, ``$WORKBENCH_BASE_URL`` / ``$WORKBENCH_API_KEY``, default ``http://127.0.0.1:8000``).
This module imports neither torch nor the engine: a remote client is as light as vllm-sdk's.

>>> client = wb.AsyncClient(model)                     # in-process  # doctest: +SKIP
>>> reply = await client.chat.completions.create(model=wb.Variant("default"),
...     messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=32)  # doctest: +SKIP
>>> reply.choices[0].message.content  # doctest: +SKIP
"""

from __future__ import annotations

import os
import queue
import threading
from enum import Enum
from typing import AsyncIterator, Iterator

from .._sync import run
from ..errors import ValidationError
from . import schemas as s
from .transports import InProcessTransport

DEFAULT_BASE_URL = "http://127.0.0.1:8000"   # where `workbench serve` listens by default
BASE_URL_ENV, API_KEY_ENV = "WORKBENCH_BASE_URL", "WORKBENCH_API_KEY"
_CHAT = "/v1/chat/completions"


def _steering_dict(model, steering=None):
    """The extra spec of a request: ``steering=`` (a SteeringSpec or dict), else a Variant's ``spec``."""
    steering = steering if steering is not None else getattr(model, "spec", None)
    if steering is None:
        return None
    return steering.to_dict() if hasattr(steering, "to_dict") else dict(steering)


def _intervention(iv) -> dict:
    return iv.to_dict() if hasattr(iv, "to_dict") else (iv.model_dump() if hasattr(iv, "model_dump") else dict(iv))


def _model_and_interventions(model, interventions=None):
    """A model name and the interventions of a Variant (or the ones given)."""
    if hasattr(model, "interventions") and hasattr(model, "model_name"):
        ivs = [_intervention(iv) for iv in model.interventions]
        return model.model_name, (ivs + [_intervention(iv) for iv in interventions or []]) or None
    if isinstance(model, Enum):  # a ModelName
        model = model.value
    if not isinstance(model, str) or not model:
        raise ValidationError(f"model must be a Variant or a model name, got {model!r}")
    return model, [_intervention(iv) for iv in interventions] if interventions else None


def _messages(messages) -> list[dict]:
    return [m.model_dump() if hasattr(m, "model_dump") else dict(m) for m in messages]


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _probe_body(item) -> dict:
    """A ``monitor`` entry: a feature id, a ``Feature``, a ``wb.Probe`` or a dict (as the server takes it)."""
    if isinstance(item, (str, int)) and not isinstance(item, bool):
        return {"feature": item}
    if hasattr(item, "read_direction") and hasattr(item, "id"):   # a Feature of the server's set
        return {"feature": item.id}
    if hasattr(item, "to_dict") and hasattr(item, "vector"):      # a monitor.Probe
        return item.to_dict()
    return dict(item)


def _condition_body(cond) -> dict:
    if hasattr(cond, "probe") and hasattr(cond, "threshold"):     # a monitor.Condition
        return {"probe": _probe_body(cond.probe), "threshold": cond.threshold, "mode": cond.mode, "above": cond.above,
                "latch": cond.latch}
    cond = dict(cond)
    return {**cond, "probe": _probe_body(cond["probe"])} if "probe" in cond else cond


# -- the calls: (path, response schema, body), shared by the async and the sync client ------------
def _chat_body(model, messages, stream: bool, kwargs: dict) -> dict:
    name, ivs = _model_and_interventions(model, kwargs.pop("interventions", None))
    extra = _steering_dict(model, kwargs.pop("steering", None))
    if kwargs.get("monitor") is not None:   # features, their ids, wb.Probe objects or dicts
        monitor = kwargs["monitor"]
        kwargs["monitor"] = [_probe_body(m) for m in ([monitor] if isinstance(monitor, (str, dict)) else monitor)]
    if kwargs.get("condition") is not None:
        kwargs["condition"] = _condition_body(kwargs["condition"])
    return _drop_none({"model": name, "messages": _messages(messages), "interventions": ivs, "stream": stream,
                       "steering": extra, **kwargs})


def _search(query, model, top_k):
    name, _ = _model_and_interventions(model)
    return "/v1/features/search", s.FeatureSearchResponse, {"query": query, "model_name": name, "top_k": top_k}


def _rerank(query, features, model, top_k):
    name, _ = _model_and_interventions(model)
    items = [f.model_dump() if hasattr(f, "model_dump") else (f.to_item() if hasattr(f, "to_item") else dict(f))
             for f in features]
    return "/v1/features/rerank", s.FeatureRerankResponse, {"query": query, "model_name": name, "features": items,
                                                            "top_k": top_k}


def _add_concept(label, positive, model, negative, layer, method):
    name, _ = _model_and_interventions(model)
    return "/v1/features/concepts", s.ConceptResponse, {"model": name, "label": label, "positive": list(positive),
                                                        "negative": None if negative is None else list(negative),
                                                        "layer": layer, "method": method}


def _load_features(model):
    name, _ = _model_and_interventions(model)
    return "/v1/features/load", s.FeatureSetResponse, {"model": name}


def _feature_page(feature, model, corpus, top_n, window, bins, include_library):
    name, _ = _model_and_interventions(model)
    fid = feature.get("id") if isinstance(feature, dict) else getattr(feature, "id", feature)
    texts = None if corpus is None else [corpus] if isinstance(corpus, str) else list(corpus)
    return "/v1/features/page", s.FeaturePageResponse, {
        "model": name, "feature": fid, "corpus": texts, "top_n": top_n, "window": window, "bins": bins,
        "include_library": include_library}


def _logit_lens(messages, model, layers, top_k, steering, precision):
    name, ivs = _model_and_interventions(model)
    return "/v1/lens/logit", s.LogitLensResponse, {"model": name, "messages": _messages(messages), "layers": layers,
                                                    "top_k": top_k, "interventions": ivs,
                                                    "steering": _steering_dict(model, steering),
                                                    "precision": precision}


def _direction_tokens(model, feature, vector, top_k):
    name, _ = _model_and_interventions(model)
    fid = feature.get("id") if isinstance(feature, dict) else getattr(feature, "id", feature)
    vec = None if vector is None else [float(x) for x in (vector.tolist() if hasattr(vector, "tolist") else vector)]
    return "/v1/lens/direction", s.DirectionTokensResponse, {"model": name, "feature": fid, "vector": vec, "top_k": top_k}


def _best_steering(feature, model, prompts, layers, strengths, repetition_penalties, max_tokens):
    name, _ = _model_and_interventions(model)
    fid = feature.get("id") if isinstance(feature, dict) else getattr(feature, "id", feature)
    return "/v1/steering/best", s.BestSteeringResponse, {
        "model": name, "feature": fid, "prompts": prompts, "layers": layers, "strengths": strengths,
        "repetition_penalties": None if repetition_penalties is None else list(repetition_penalties), "max_tokens": max_tokens}


def _inspect(messages, model, interventions, aggregation_method, top_k, steering):
    name, ivs = _model_and_interventions(model, interventions)
    return "/v1/chat_attribution/inspect", s.FeatureInspectionResponse, {
        "model": name, "messages": _messages(messages), "top_k": top_k, "aggregation_method": aggregation_method,
        "interventions": ivs, "steering": _steering_dict(model, steering)}


def _activations(messages, model, interventions, aggregation_method):
    name, ivs = _model_and_interventions(model, interventions)
    return "/v1/chat_attribution/activations", s.ActivationsResponse, {
        "model": name, "messages": _messages(messages), "aggregation_method": aggregation_method, "interventions": ivs}


def _logits(messages, model, interventions, top_k, start_idx, end_idx):
    name, ivs = _model_and_interventions(model, interventions)
    return "/v1/chat_attribution/logits", s.LogitsResponse, {
        "model": name, "messages": _messages(messages), "top_k": top_k, "start_idx": start_idx, "end_idx": end_idx,
        "interventions": ivs}


def _contrast(dataset_1, dataset_2, model, interventions_1, interventions_2, k_to_add, k_to_remove):
    name, ivs = _model_and_interventions(model, interventions_1)
    return "/v1/chat_attribution/contrast", s.ContrastResponse, {
        "model": name, "dataset_1": [_messages(c) for c in dataset_1], "dataset_2": [_messages(c) for c in dataset_2],
        "k_to_add": k_to_add, "k_to_remove": k_to_remove, "interventions_1": ivs,
        "interventions_2": _model_and_interventions(model, interventions_2)[1]}


def _norms(messages, model, layers, interventions, steering):
    name, ivs = _model_and_interventions(model, interventions)
    return "/v1/chat_attribution/norms", s.NormsResponse, {
        "model": name, "messages": _messages(messages), "layers": layers, "interventions": ivs,
        "steering": _steering_dict(model, steering)}


def _token_activations(messages, model, features, interventions, steering):
    name, ivs = _model_and_interventions(model, interventions)
    keys = None if features is None else [getattr(f, "id", f) if not isinstance(f, dict) else f.get("id") for f in features]
    return "/v1/chat_attribution/token_activations", s.TokenActivationsResponse, {
        "model": name, "messages": _messages(messages), "features": keys, "interventions": ivs,
        "steering": _steering_dict(model, steering)}


# -- async ---------------------------------------------------------------------------------------
class _Completions:
    def __init__(self, client):
        self._c = client

    async def create(self, model, messages, **kwargs) -> s.ChatCompletionResponse:
        """One chat completion (``max_completion_tokens``, ``temperature``, ``seed``, ``top_p``, ``stop``, ...).

        >>> r = await client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        """
        data = await self._c._transport.request(_CHAT, _chat_body(model, messages, False, kwargs))
        return s.ChatCompletionResponse.model_validate(data)

    async def create_stream(self, model, messages, **kwargs) -> AsyncIterator[s.ChatCompletionChunk]:
        """Yield ``ChatCompletionChunk``s as tokens are produced; leaving the loop stops the generation.

        >>> async for chunk in client.chat.completions.create_stream(model="default", messages=msgs): ...  # doctest: +SKIP
        """
        async for data in self._c._transport.stream(_CHAT, _chat_body(model, messages, True, kwargs)):
            yield s.ChatCompletionChunk.model_validate(data)


class _Chat:
    def __init__(self, client):
        self.completions = _Completions(client)


class _Features:
    def __init__(self, client):
        self._c = client

    async def _call(self, call):
        path, schema, body = call
        return schema.model_validate(await self._c._transport.request(path, _drop_none(body)))

    async def search(self, query: str, model, top_k: int = 10) -> s.FeatureSearchResponse:
        """Features whose labels match ``query``: ``(await client.features.search("pirate", model="default")).data``."""
        return await self._call(_search(query, model, top_k))

    async def rerank(self, query: str, features, model, top_k: int = 10) -> s.FeatureRerankResponse:
        """``features`` re-ranked for ``query``: ``await client.features.rerank("funny", found.data, model="default")``."""
        return await self._call(_rerank(query, features, model, top_k))

    async def add_concept(self, label: str, positive, model, negative=None, layer=None,
                          method: str = "mean_diff") -> s.ConceptResponse:
        """Train a concept (``method``: mean_diff, caa, pca, probe) and add it to the model's features."""
        return await self._call(_add_concept(label, positive, model, negative, layer, method))

    async def load(self, model) -> s.FeatureSetResponse:
        """Load the model's feature set (the concept library trains once, then loads from cache) and describe it."""
        return await self._call(_load_features(model))

    async def page(self, feature, model, corpus=None, top_n: int = 10, window: int = 12, bins: int = 30,
                   include_library: bool = True) -> s.FeaturePageResponse:
        """A feature's page: top contexts, activation histogram, promoted / suppressed tokens.

        The response displays as HTML in a notebook (``.to_html()``).

        >>> await client.features.page("concept/pirate", model="default", corpus=["Arr, matey!"])  # doctest: +SKIP
        """
        return await self._call(_feature_page(feature, model, corpus, top_n, window, bins, include_library))

    async def best_steering(self, feature, model, prompts=None, layers=None, strengths=None, repetition_penalties=None,
                            max_tokens: int = 48) -> s.BestSteeringResponse:
        """The layer, strength and repetition penalty of ``feature`` that score best (``wb.best_steering`` on the server)."""
        return await self._call(_best_steering(feature, model, prompts, layers, strengths, repetition_penalties, max_tokens))

    async def inspect(self, messages, model, interventions=None, aggregation_method: str = "mean",
                      top_k: int = 10, steering=None) -> s.FeatureInspectionResponse:
        """The features most active over a conversation: ``await client.features.inspect(msgs, model="default")``."""
        return await self._call(_inspect(messages, model, interventions, aggregation_method, top_k, steering))

    async def activations(self, messages, model, interventions=None, aggregation_method: str = "mean") -> s.ActivationsResponse:
        """One aggregated activation per feature: ``await client.features.activations(msgs, model="default")``."""
        return await self._call(_activations(messages, model, interventions, aggregation_method))

    async def logits(self, messages, model, interventions=None, top_k=None, start_idx=None, end_idx=None) -> s.LogitsResponse:
        """Next-token logits after tokens ``[start_idx:end_idx]`` (slice bounds): ``await client.features.logits(msgs, model="default", top_k=5)``."""
        return await self._call(_logits(messages, model, interventions, top_k, start_idx, end_idx))

    async def contrast(self, dataset_1, dataset_2, model, interventions_1=None, interventions_2=None,
                       k_to_add: int = 10, k_to_remove: int = 10) -> s.ContrastResponse:
        """Features telling two sets of conversations apart: ``await client.features.contrast([c1], [c2], model="default")``."""
        return await self._call(_contrast(dataset_1, dataset_2, model, interventions_1, interventions_2, k_to_add,
                                          k_to_remove))

    async def norms(self, messages, model, layers=None, interventions=None, steering=None) -> s.NormsResponse:
        """Per-layer, per-token residual norms of a conversation (``.to_dataframe()`` for plots)."""
        return await self._call(_norms(messages, model, layers, interventions, steering))

    async def token_activations(self, messages, model, features=None, interventions=None,
                                steering=None) -> s.TokenActivationsResponse:
        """Per-token activations of ``features`` (ids or indices; default all) over a conversation."""
        return await self._call(_token_activations(messages, model, features, interventions, steering))


class _Lens:
    def __init__(self, client):
        self._c = client

    async def logit(self, messages, model, layers=None, top_k: int = 5, steering=None,
                    precision: str = "auto") -> s.LogitLensResponse:
        """The logit lens of a conversation: top-k predictions per layer and position (``precision``: see ``wb.logit_lens``).

        >>> lens = await client.lens.logit([{"role": "user", "content": "Hi"}], model="default")  # doctest: +SKIP
        """
        return await _Features._call(self, _logit_lens(messages, model, layers, top_k, steering, precision))

    async def direction(self, model, feature=None, vector=None, top_k: int = 20) -> s.DirectionTokensResponse:
        """Tokens a feature (or a vector) promotes and suppresses: ``(await client.lens.direction("default", "concept/pirate")).promoted``."""
        return await _Features._call(self, _direction_tokens(model, feature, vector, top_k))


class AsyncClient:
    """The async thin API: ``AsyncClient(model)`` in-process, or a server by ``base_url=`` (else ``$WORKBENCH_BASE_URL``).

    >>> client = wb.AsyncClient(api_key="...")   # $WORKBENCH_BASE_URL, default http://127.0.0.1:8000  # doctest: +SKIP
    """

    def __init__(self, model=None, *, base_url: str | None = None, api_key: str | None = None, transport=None,
                 aliases=(), timeout: float = 600.0):
        if transport is None:
            transport = _transport(model, base_url, api_key, aliases, timeout)
        self._transport = transport
        self.chat = _Chat(self)
        self.features = _Features(self)
        self.lens = _Lens(self)

    async def models(self) -> s.ModelList:
        """The names the model answers to: ``(await client.models()).data[0].id``."""
        return s.ModelList.model_validate(await self._transport.get("/v1/models"))

    async def aclose(self) -> None:
        """Close the connections (nothing to close in-process)."""
        await self._transport.aclose()

    close = aclose   # vllm-sdk's name: `await client.close()`

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _transport(model, base_url, api_key, aliases, timeout):
    if model is not None:
        if isinstance(model, str):
            raise ValidationError(f"AsyncClient(model) takes a SteerModel, got the string {model!r}; for a server "
                                  f"pass base_url= and api_key= by name")
        if base_url is not None:
            raise ValidationError("give a SteerModel (in-process) or base_url= (a workbench server), not both")
        return InProcessTransport(model, aliases)
    from .http import HTTPTransport

    base_url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    return HTTPTransport(base_url, api_key=api_key, timeout=timeout)


# -- sync ----------------------------------------------------------------------------------------
class _Bridge:
    """A blocking face of an async transport (in-process: the engine is async)."""

    def __init__(self, transport):
        self._t = transport

    def request(self, path: str, body: dict) -> dict:
        return run(self._t.request(path, body))

    def stream(self, path: str, body: dict) -> Iterator[dict]:
        return _iterate(self._t.stream(path, body))

    def get(self, path: str) -> dict:
        return run(self._t.get(path))

    def close(self) -> None:
        run(self._t.aclose())


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


class _SyncCompletions:
    def __init__(self, client):
        self._c = client

    def create(self, model, messages, **kwargs) -> s.ChatCompletionResponse:
        """One chat completion: ``client.chat.completions.create(model="default", messages=msgs).choices[0].message.content``."""
        return s.ChatCompletionResponse.model_validate(
            self._c._transport.request(_CHAT, _chat_body(model, messages, False, kwargs)))

    def create_stream(self, model, messages, **kwargs) -> Iterator[s.ChatCompletionChunk]:
        """Yield chunks as tokens are produced: ``for chunk in client.chat.completions.create_stream(...)``."""
        for data in self._c._transport.stream(_CHAT, _chat_body(model, messages, True, kwargs)):
            yield s.ChatCompletionChunk.model_validate(data)


class _SyncChat:
    def __init__(self, client):
        self.completions = _SyncCompletions(client)


class _SyncFeatures:
    def __init__(self, client):
        self._c = client

    def _call(self, call):
        path, schema, body = call
        return schema.model_validate(self._c._transport.request(path, _drop_none(body)))

    def search(self, query: str, model, top_k: int = 10) -> s.FeatureSearchResponse:
        """Features whose labels match ``query``: ``client.features.search("pirate", model="default").data``."""
        return self._call(_search(query, model, top_k))

    def rerank(self, query: str, features, model, top_k: int = 10) -> s.FeatureRerankResponse:
        """``features`` re-ranked for ``query``: ``client.features.rerank("funny", found.data, model="default")``."""
        return self._call(_rerank(query, features, model, top_k))

    def add_concept(self, label: str, positive, model, negative=None, layer=None,
                    method: str = "mean_diff") -> s.ConceptResponse:
        """Train a concept (``method``: mean_diff, caa, pca, probe) and add it to the model's features."""
        return self._call(_add_concept(label, positive, model, negative, layer, method))

    def load(self, model) -> s.FeatureSetResponse:
        """Load the model's feature set (the concept library trains once, then loads from cache) and describe it."""
        return self._call(_load_features(model))

    def page(self, feature, model, corpus=None, top_n: int = 10, window: int = 12, bins: int = 30,
             include_library: bool = True) -> s.FeaturePageResponse:
        """A feature's page (top contexts, histogram, promoted tokens): ``client.features.page("concept/pirate", model="default")``."""
        return self._call(_feature_page(feature, model, corpus, top_n, window, bins, include_library))

    def best_steering(self, feature, model, prompts=None, layers=None, strengths=None, repetition_penalties=None,
                      max_tokens: int = 48) -> s.BestSteeringResponse:
        """The layer, strength and repetition penalty of ``feature`` that score best (``wb.best_steering`` on the server)."""
        return self._call(_best_steering(feature, model, prompts, layers, strengths, repetition_penalties, max_tokens))

    def inspect(self, messages, model, interventions=None, aggregation_method: str = "mean",
                top_k: int = 10, steering=None) -> s.FeatureInspectionResponse:
        """The features most active over a conversation: ``client.features.inspect(msgs, model="default")``."""
        return self._call(_inspect(messages, model, interventions, aggregation_method, top_k, steering))

    def activations(self, messages, model, interventions=None, aggregation_method: str = "mean") -> s.ActivationsResponse:
        """One aggregated activation per feature: ``client.features.activations(msgs, model="default")``."""
        return self._call(_activations(messages, model, interventions, aggregation_method))

    def logits(self, messages, model, interventions=None, top_k=None, start_idx=None, end_idx=None) -> s.LogitsResponse:
        """Next-token logits after tokens ``[start_idx:end_idx]`` (slice bounds): ``client.features.logits(msgs, model="default", top_k=5)``."""
        return self._call(_logits(messages, model, interventions, top_k, start_idx, end_idx))

    def contrast(self, dataset_1, dataset_2, model, interventions_1=None, interventions_2=None,
                 k_to_add: int = 10, k_to_remove: int = 10) -> s.ContrastResponse:
        """Features telling two sets of conversations apart: ``client.features.contrast([c1], [c2], model="default")``."""
        return self._call(_contrast(dataset_1, dataset_2, model, interventions_1, interventions_2, k_to_add, k_to_remove))

    def norms(self, messages, model, layers=None, interventions=None, steering=None) -> s.NormsResponse:
        """Per-layer, per-token residual norms of a conversation (``.to_dataframe()`` for plots)."""
        return self._call(_norms(messages, model, layers, interventions, steering))

    def token_activations(self, messages, model, features=None, interventions=None,
                          steering=None) -> s.TokenActivationsResponse:
        """Per-token activations of ``features`` (ids or indices; default all) over a conversation."""
        return self._call(_token_activations(messages, model, features, interventions, steering))


class _SyncLens:
    def __init__(self, client):
        self._c = client

    def logit(self, messages, model, layers=None, top_k: int = 5, steering=None,
              precision: str = "auto") -> s.LogitLensResponse:
        """The logit lens of a conversation: ``client.lens.logit(msgs, model="default").top_tokens``."""
        return _SyncFeatures._call(self, _logit_lens(messages, model, layers, top_k, steering, precision))

    def direction(self, model, feature=None, vector=None, top_k: int = 20) -> s.DirectionTokensResponse:
        """Tokens a feature (or a vector) promotes and suppresses: ``client.lens.direction("default", "concept/pirate")``."""
        return _SyncFeatures._call(self, _direction_tokens(model, feature, vector, top_k))


class Client:
    """The sync thin API (same methods as ``AsyncClient``; ``create_stream`` is a plain iterator).

    Over HTTP it keeps one pooled ``httpx.Client``; in-process it runs the async calls to completion.

    >>> client = wb.Client(model)  # doctest: +SKIP
    >>> client.features.search("pirate", model="default", top_k=3).data[0].label  # doctest: +SKIP
    """

    def __init__(self, model=None, *, base_url: str | None = None, api_key: str | None = None, transport=None,
                 aliases=(), timeout: float = 600.0):
        self._async = AsyncClient(model, base_url=base_url, api_key=api_key, transport=transport, aliases=aliases,
                                  timeout=timeout)
        sync = getattr(self._async._transport, "sync", None)   # a transport with a blocking twin (HTTP)
        self._transport = sync() if sync is not None else _Bridge(self._async._transport)
        self.chat = _SyncChat(self)
        self.features = _SyncFeatures(self)
        self.lens = _SyncLens(self)

    @property
    def async_client(self) -> AsyncClient:
        """The ``AsyncClient`` underneath (what code on the kernel's event loop, e.g. the widgets, awaits)."""
        return self._async

    def models(self) -> s.ModelList:
        """The names the model answers to: ``client.models().data[0].id``."""
        return s.ModelList.model_validate(self._transport.get("/v1/models"))

    def close(self) -> None:
        """Close the connections (nothing to close in-process)."""
        self._transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
