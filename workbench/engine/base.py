"""``SteerModel`` and the engine contract it holds.

``SteerModel`` is the backend-independent half: it validates input, renders chats, keeps the
global steering state with readers-writer semantics (chatspace's), and turns an engine's
per-request event streams into texts, ``ChatResponse``s, stream chunks and ``CaptureHandle``s.
It holds one engine (``model.engine``) and uses it only through :class:`Backend`: ``submit``
a :class:`Request`, ``cancel`` it, ``close``. :class:`EngineBase` is what engines share.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..capture import CaptureHandle
from ..chat import ChatResponse, StreamChunk, check_chat_options, normalize_conversations, render_chat
from ..errors import (
    EmptyInputError, EngineError, LayerOutOfRangeError, PromptTooLongError, RequestFailedError, SteeringStackEmptyError,
    ValidationError, VectorError, WorkbenchError,
)
from ..outputs import CompletionOutput, RequestOutput, TokenText
from ..sampling import SamplingParams
from ..steering import AblationSpec, AddSpec, ProjectionCapSpec, SteeringSpec, replace_op
from .rwlock import AsyncRWLock


@dataclass
class Request:
    """One prompt on its way through a backend; the backend reports back through ``emit``."""

    request_id: str
    prompt_ids: list
    sampling: SamplingParams
    steering: SteeringSpec
    capture_layers: tuple
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    fingerprint: str = ""  # of the steering spec: keys prefix-cache entries
    encode_only: bool = False  # one forward over the prompt, no sampling (see SteerModel.encode)
    want_logits: bool = False  # report the next-token logits after the prompt
    probes: list = field(default_factory=list)  # monitor.Probe list: values per position (ProjectionEvent)
    live_projections: bool = False  # a stream: report values as they are computed (else a backend may wait to the end)

    @property
    def condition(self):
        """The spec's ``monitor.Condition`` when it steers at all (a condition on an empty spec decides nothing)."""
        cond = self.steering.condition
        return None if cond is None or self.steering.is_empty() else cond

    @property
    def watched(self) -> bool:
        """Whether the backend reports ``ProjectionEvent``s (probes, or a condition's decisions)."""
        return bool(self.probes) or self.condition is not None

    def emit(self, event) -> None:
        """Thread-safe: hand an event to the caller's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is gone; nobody is listening any more
            self.cancelled = True


@dataclass
class TokenEvent:
    token_id: int
    text: str


@dataclass
class FinishEvent:
    finish_reason: str
    text: str
    token_ids: list
    # layer -> [tokens, hidden] tensor; or a backend's stand-in for captures kept elsewhere (vLLM's
    # _Remote: still in the workers), which ``materialize`` / ``make_handle`` turn into that dict
    captures: dict | Any
    logits: object = None  # [vocab] next-token logits after the prompt, when asked for
    logprobs: list | None = None  # per generated token {token_id: Logprob}, when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None


@dataclass
class ProjectionEvent:
    """Probe values (``[n, probes]``) and steered flags of positions ``start .. start+n-1``."""

    start: int
    values: object
    steered: list | None = None


@dataclass
class ErrorEvent:
    error: BaseException


def request_failed(cause) -> BaseException:
    """The error a request that failed alone ends with (a workbench error is passed on as it is)."""
    if isinstance(cause, WorkbenchError):
        return cause
    detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
    return RequestFailedError(f"this request failed inside the engine ({detail}); the other requests were not affected")


def _join(a, b):
    """Two consecutive ``ProjectionDelta``s as one."""
    from ..monitor import ProjectionDelta

    steered = None if a.steered is None and b.steered is None else \
        list(a.steered or [False] * len(a.values)) + list(b.steered or [False] * len(b.values))
    return ProjectionDelta(a.start, torch.cat([a.values, b.values]), steered)


def _with_tokens(delta, prompt_texts: list, reply_ids: list, text):
    """``delta`` with the text of each of its positions: a prompt token's, else the reply token fed back there."""
    P = len(prompt_texts)
    delta.tokens = [prompt_texts[p] if p < P else text(reply_ids[p - P]) if p - P < len(reply_ids) else ""
                    for p in range(delta.start, delta.start + len(delta.values))]
    return delta


@dataclass
class _Result:
    text: str
    token_ids: list
    finish_reason: str
    captures: dict | Any   # as FinishEvent.captures
    logits: object = None
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    request_id: str = ""
    deltas: list = field(default_factory=list)  # ProjectionEvents, in order


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do. A request that needs anything else is refused when it is made (a
    ``ValidationError`` from ``chat``/``generate``/``apply_steering_spec``...), never inside the engine.

    >>> model.capabilities.ops          # doctest: +SKIP
    frozenset({'add', 'projection_cap', 'ablation'})
    """

    ops: frozenset = frozenset({"add", "projection_cap", "ablation", "sae_clamp"})  # steering op kinds it applies
    monitor: bool = True        # probes read while the model talks (``monitor=``)
    conditions: bool = True     # conditional specs (``SteeringSpec.condition``)
    capture: bool = True        # residual-stream capture (``capture_layers=``)
    logprobs: bool = True
    encode_only: bool = False   # a forward over the prompt without sampling (``encode``)


def check_layer(layer, layer_count: int, what: str = "layer") -> int:
    """``layer`` when it is an integer in ``0..layer_count-1``; a ``LayerOutOfRangeError`` otherwise."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise LayerOutOfRangeError(f"{what} must be an integer in 0..{layer_count - 1}, got {layer!r}")
    if not 0 <= layer < layer_count:
        raise LayerOutOfRangeError(f"{what} {layer} is out of range; allowed 0..{layer_count - 1}")
    return layer


@runtime_checkable
class Backend(Protocol):
    """The engine contract: what :class:`SteerModel` calls on the engine it holds (``model.engine``).

    ``submit(request)`` takes a :class:`Request` and, from any thread, ``request.emit``s its events
    in order: ``ProjectionEvent``s (when ``request.watched``) and ``TokenEvent``s as the request
    runs, then one ``FinishEvent`` or one ``ErrorEvent``; a request the engine cannot take (closed,
    dead) ends with an ``ErrorEvent(EngineError)``. ``cancel(request)`` stops it (no event needed
    after). ``close()`` stops the engine and fails what still runs with ``EngineError``.
    ``make_handle``/``materialize``/``fetch_captures_batch`` turn a ``FinishEvent``'s captures into
    ``CaptureHandle``s and tensors (an engine whose captures stay elsewhere fetches them there).
    A spec or option outside ``capabilities`` never reaches ``submit``: ``SteerModel`` refuses it.
    Everything else (rendering, validation, steering stacks, sampling options, API) is shared.
    ``tests/test_engine_contract.py`` checks both engines against this.

    >>> isinstance(model.engine, wb.engine.Backend)   # doctest: +SKIP
    True
    """

    backend: str
    capabilities: Capabilities
    model_name: str
    tokenizer: Any
    hidden_size: int
    layer_count: int
    max_model_len: int
    stats: dict

    def submit(self, request: Request) -> None: ...

    def cancel(self, request: Request) -> None: ...

    def close(self) -> None: ...

    @property
    def active_requests(self) -> int: ...

    def make_handle(self, request_id: str, capture: tuple, prompt_ids: list, result: "_Result",
                    boundaries=()) -> CaptureHandle: ...

    async def materialize(self, results: list) -> None: ...

    async def fetch_captures_batch(self, handles) -> list: ...


def engine_attribute(name: str, doc: str = "", settable: bool = False) -> property:
    """A facade property reading (and, if ``settable``, writing) ``self.engine.<name>``."""
    def get(self):
        return getattr(self.engine, name)

    def put(self, value) -> None:
        setattr(self.engine, name, value)

    return property(get, put if settable else None, doc=doc or f"The engine's ``{name}``.")


class EngineBase:
    """What engines share: the model's shape, token texts, and captures held in this process."""

    backend: str = "base"
    capabilities: Capabilities = Capabilities()
    stats: dict

    def _init_shape(self, model_name: str, tokenizer, hidden_size: int, layer_count: int, max_model_len: int) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.hidden_size = int(hidden_size)
        self.layer_count = int(layer_count)
        self.max_model_len = int(max_model_len)

    def check_layer(self, layer, what: str = "layer") -> int:
        return check_layer(layer, self.layer_count, what)

    @property
    def _token_text(self) -> TokenText:
        """Token id -> text, for logprobs and monitor tokens (made on first use)."""
        if getattr(self, "_token_text_cache", None) is None:
            self._token_text_cache = TokenText(self.tokenizer)
        return self._token_text_cache

    def make_handle(self, request_id, capture, prompt_ids, result: "_Result", boundaries=()) -> CaptureHandle:
        """A ``CaptureHandle`` over a finished request's captures (``{layer: [tokens, hidden]}`` here)."""
        return CaptureHandle(
            request_id=request_id, layer_indices=capture, prompt_token_ids=list(prompt_ids),
            generated_token_ids=list(result.token_ids), message_boundaries=list(boundaries),
            captures={layer: [{"hidden": t}] for layer, t in result.captures.items()}, tokenizer=self.tokenizer,
        )

    async def materialize(self, results: list) -> None:
        """Make every result's ``captures`` tensors here (they already are, in process)."""

    async def fetch_captures_batch(self, handles) -> list:
        """Make the captures of many handles available in one round trip; return the handles."""
        return [handles] if isinstance(handles, CaptureHandle) else list(handles)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.model_name!r} layers={self.layer_count} hidden={self.hidden_size}>"


class SteerModel:
    """A language model with per-request and global steering, capture, chat and streaming.

    Get one with ``wb.load``; every generation method is ``async`` (top-level ``await`` works in
    notebooks).

    >>> model = wb.load("default")                                            # doctest: +SKIP
    >>> await model.generate("The capital of France is", wb.SamplingParams(temperature=0, max_tokens=8))  # doctest: +SKIP
    [' Paris...']
    """

    def __init__(self, engine: Backend):
        self.engine = engine
        self.model_name = engine.model_name
        self.tokenizer = engine.tokenizer
        self.hidden_size = int(engine.hidden_size)
        self.layer_count = int(engine.layer_count)
        self.max_model_len = int(engine.max_model_len)
        self._global = SteeringSpec()
        self._stack: list[SteeringSpec] = []
        self._rw = AsyncRWLock()
        self._ids = itertools.count()
        self._closed = False

    # ------------------------------------------------------------------ the engine
    @property
    def backend(self) -> str:
        """The engine's name: ``"hf"`` or ``"vllm"``."""
        return self.engine.backend

    @property
    def capabilities(self) -> Capabilities:
        """What the engine can do; a request needing anything else is refused when it is made."""
        return self.engine.capabilities

    @property
    def stats(self) -> dict:
        """The engine's counters (requests, tokens, passes or steps, ...)."""
        return self.engine.stats

    @property
    def active_requests(self) -> int:
        """Requests queued or running in the engine (0 when idle)."""
        return self.engine.active_requests

    def close(self) -> None:
        """Stop the engine and free the model; further requests raise ``EngineError``."""
        self._closed = True
        self.engine.close()

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.model_name!r} backend={self.backend} layers={self.layer_count} "
                f"hidden={self.hidden_size}>")

    # ------------------------------------------------------------------ validation
    def check_layer(self, layer, what: str = "layer") -> int:
        """``layer`` when it is one of the model's layers; a ``LayerOutOfRangeError`` otherwise."""
        return check_layer(layer, self.layer_count, what)

    def _capture_layers(self, capture_layers) -> tuple:
        if capture_layers is None:
            return ()
        if isinstance(capture_layers, int):
            capture_layers = [capture_layers]
        return tuple(sorted({self.check_layer(l, "capture layer") for l in capture_layers}))

    def _steering_for(self, steering, n: int) -> list:
        """One validated spec (or None = global) per prompt."""
        items = list(steering) if isinstance(steering, (list, tuple)) else [steering] * n
        if len(items) != n:
            raise ValidationError(f"got {len(items)} steering specs for {n} prompts; pass one spec or one per prompt")
        out: list[SteeringSpec | None] = []
        for spec in items:
            if spec is None:
                out.append(None)
                continue
            if hasattr(spec, "to_steering_spec"):  # a Variant or anything that compiles to a spec
                spec = spec.to_steering_spec(self)
            if isinstance(spec, dict):
                spec = SteeringSpec.from_dict(spec)
            if not isinstance(spec, SteeringSpec):
                raise ValidationError(f"steering must be a SteeringSpec (or None for the global spec), got {type(spec).__name__}")
            out.append(self.check_spec(spec.validate(self.hidden_size, self.layer_count)))
        return out

    def check_spec(self, spec: SteeringSpec) -> SteeringSpec:
        """Refuse a spec this backend cannot apply (see ``capabilities``); return it."""
        from ..steering import op_kind

        caps = self.capabilities
        for layer in spec.layer_indices():
            for op in spec.layers[layer].operations:
                kind = op_kind(op)
                if kind not in caps.ops:
                    raise ValidationError(
                        f"the {self.backend} backend cannot apply {type(op).__name__} (layer {layer}); it applies "
                        f"{sorted(caps.ops)}. Load the model with backend='hf' for {kind} ops")
        if spec.condition is not None and not caps.conditions:
            raise ValidationError(f"the {self.backend} backend does not run conditional specs")
        return spec

    def _check_prompt_ids(self, ids: list, what: str) -> list:
        if not ids:
            raise EmptyInputError(f"{what} is empty after tokenization; give at least one token")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"{what} has {len(ids)} tokens; the context holds {self.max_model_len} "
                f"(prompt must be at most {self.max_model_len - 1} tokens to generate one)"
            )
        return ids

    def _encode_prompt(self, prompt, i: int) -> list:
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < len(self.tokenizer)]
            if bad:
                raise ValidationError(f"prompts[{i}] has token id {bad[0]} outside 0..{len(self.tokenizer) - 1}")
            return self._check_prompt_ids(ids, f"prompts[{i}]")
        if not isinstance(prompt, str):
            raise ValidationError(f"prompts[{i}] must be a string (or a list of token ids), got {type(prompt).__name__}")
        if not prompt:
            raise EmptyInputError(f"prompts[{i}] is an empty string")
        return self._check_prompt_ids(self.tokenizer(prompt, add_special_tokens=True)["input_ids"], f"prompts[{i}]")

    def _new_request(self, ids, sampling, spec, capture, probes=()) -> Request:
        if self._closed:
            raise EngineError(f"{self!r} is closed; load the model again")
        return Request(
            request_id=f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}", prompt_ids=ids, sampling=sampling,
            steering=spec, capture_layers=capture, loop=asyncio.get_running_loop(), fingerprint=spec.fingerprint(),
            probes=list(probes),
        )

    async def _probes(self, monitor) -> list:
        """``monitor=`` as checked probes: ``Probe``s, features (or their ids), ``(name, layer, vector)``."""
        from ..monitor import probe_list

        if monitor is None:
            return []
        if not self.capabilities.monitor:
            raise ValidationError(f"the {self.backend} backend does not monitor (monitor=)")
        items = [monitor] if isinstance(monitor, str) else monitor
        if isinstance(items, (list, tuple)) and any(isinstance(i, str) for i in items):
            await self.load_features()
            items = [self._features.get(i) if isinstance(i, str) else i for i in items]
        probes = probe_list(items)
        for p in probes:
            self.check_layer(p.layer, f"probe {p.name!r} layer")
            if p.vector.numel() != self.hidden_size:
                raise VectorError(f"probe {p.name!r}: vector has size {p.vector.numel()}, the model's hidden size is "
                                  f"{self.hidden_size}")
        return probes

    def _projections(self, probes, rendered_ids, boundaries, result: "_Result"):
        """The ``monitor.Projections`` of one finished request (None when nothing was watched)."""
        from ..monitor import Projections

        if not result.deltas:
            return None
        values = torch.cat([torch.as_tensor(d.values, dtype=torch.float32) for d in result.deltas])
        count = int(values.shape[0])
        steered = None
        if any(d.steered is not None for d in result.deltas):
            steered = [bool(x) for d in result.deltas for x in (d.steered or [False] * len(d.values))]
        ids = (list(rendered_ids) + list(result.token_ids))[:count]
        return Projections(names=[p.name for p in probes], layers=[p.layer for p in probes], values=values,
                           token_ids=ids, prompt_len=len(rendered_ids), tokens=[self._token_text(t) for t in ids],
                           boundaries=list(boundaries), steered=steered)

    # ------------------------------------------------------------------ running requests
    async def _events(self, request: Request):
        """Submit and yield the request's events; cancel it in the backend if the consumer leaves."""
        self.engine.submit(request)
        finished = False
        try:
            while True:
                event = await request.queue.get()
                if isinstance(event, ErrorEvent):
                    finished = True
                    raise event.error
                if isinstance(event, FinishEvent):
                    finished = True  # before yielding: the consumer may stop right after it
                    yield event
                    return
                yield event
        finally:
            if not finished:
                self.engine.cancel(request)

    async def _run(self, request: Request) -> _Result:
        deltas = []
        async for event in self._events(request):
            if isinstance(event, ProjectionEvent):
                deltas.append(event)
            elif isinstance(event, FinishEvent):
                return _Result(event.text, event.token_ids, event.finish_reason, event.captures, event.logits,
                               event.logprobs, event.cumulative_logprob, request.request_id, deltas)
        raise EngineError(f"request {request.request_id} ended without a result")  # pragma: no cover

    async def _run_many(self, prompt_ids: list, sampling, specs, capture, probes=()) -> list:
        """Run every prompt ``sampling.n`` times; results prompt-major (all samples of prompt 0, then prompt 1...)."""
        samples = [sampling] if sampling.n == 1 else [sampling.for_sample(j) for j in range(sampling.n)]
        async with self._rw.reading():
            requests = [
                self._new_request(ids, params, self._global if spec is None else spec, capture, probes)
                for ids, spec in zip(prompt_ids, specs) for params in samples
            ]
            return await asyncio.gather(*(self._run(r) for r in requests))

    @staticmethod
    def _request_outputs(prompts, prompt_ids, results, n: int) -> list:
        """vLLM's ``RequestOutput`` per prompt, its ``n`` samples as ``outputs``."""
        outs = []
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            group = results[i * n:(i + 1) * n]
            outs.append(RequestOutput(
                request_id=group[0].request_id, prompt=prompt, prompt_token_ids=list(ids),
                outputs=[CompletionOutput(j, r.text, list(r.token_ids), r.cumulative_logprob, r.logprobs, r.finish_reason)
                         for j, r in enumerate(group)]))
        return outs

    @staticmethod
    def _handle_names(prefix: str, count: int, n: int) -> list:
        return [f"{prefix}-{i}" if n == 1 else f"{prefix}-{i}-{j}" for i in range(count) for j in range(n)]

    @property
    def _token_text(self) -> TokenText:
        return self.engine._token_text  # type: ignore[attr-defined]  # every engine here is an EngineBase

    def _handle(self, request_id, capture, prompt_ids, result: _Result, boundaries=()) -> CaptureHandle:
        return self.engine.make_handle(request_id, capture, prompt_ids, result, boundaries)

    # ------------------------------------------------------------------ public generation API
    async def generate(self, prompts, sampling_params=None, *, steering=None, capture_layers=None, raw_output=False,
                       **sampling_kwargs):
        """Complete raw prompts; return texts, or ``(texts, handles)`` when ``capture_layers`` is given.

        ``steering=None`` uses the global spec; a ``SteeringSpec`` (or one per prompt) is used exactly.
        With ``n > 1`` the texts (and handles) are flat, prompt-major: all ``n`` samples of prompt 0,
        then those of prompt 1, ... ``raw_output=True`` returns vLLM-shaped ``RequestOutput``s instead
        (one per prompt, its samples in ``.outputs``, with logprobs when asked for).

        >>> texts = await model.generate(["Q: 2+2=? A:"], wb.SamplingParams(temperature=0, max_tokens=8))  # doctest: +SKIP
        >>> [out] = await model.generate("Q: 2+2=? A:", n=2, seed=0, logprobs=3, raw_output=True)  # doctest: +SKIP
        >>> out.outputs[1].logprobs[0]  # doctest: +SKIP
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise EmptyInputError(f"prompts must be a non-empty string or list of strings, got {prompts!r}")
        sampling = SamplingParams.from_any(sampling_params, **sampling_kwargs)
        capture = self._capture_layers(capture_layers)
        specs = self._steering_for(steering, len(prompts))
        ids = [self._encode_prompt(p, i) for i, p in enumerate(prompts)]
        results = await self._run_many(ids, sampling, specs, capture)
        n = sampling.n
        texts = [r.text for r in results] if not raw_output else \
            self._request_outputs([p if isinstance(p, str) else None for p in prompts], ids, results, n)
        if capture_layers is None:
            return texts
        sample_ids = [pid for pid in ids for _ in range(n)]
        return texts, [self._handle(name, capture, pid, r)
                       for name, pid, r in zip(self._handle_names("gen", len(ids), n), sample_ids, results)]

    def _render(self, conversations, chat_options):
        opts = check_chat_options(chat_options)
        rendered = [render_chat(self.tokenizer, conv, opts) for conv in conversations]
        for i, r in enumerate(rendered):
            self._check_prompt_ids(r.token_ids, f"conversation {i} (rendered)")
        return rendered

    async def chat(self, messages, sampling_params=None, *, steering=None, capture_layers=None, chat_options=None,
                   raw_output=False, monitor=None, **sampling_kwargs):
        """Reply to one conversation or a list of them; return ``list[ChatResponse]`` (and handles).

        ``chat_options={"continue_final_message": True, "add_generation_prompt": False}`` continues
        a final assistant message (prefill). With ``n > 1`` the replies (and handles) are flat,
        prompt-major: all ``n`` replies to conversation 0, then those to conversation 1, ...
        ``raw_output=True`` returns vLLM-shaped ``RequestOutput``s instead (one per conversation;
        ``.prompt`` is the rendered prompt, ``.outputs[j].text`` the generated text without a prefill).
        ``monitor=[features or wb.Probe(...)]`` watches the model: each reply's ``.projections``
        holds the probes' values at every position (see ``workbench.monitor``); a conditional
        spec's per-position decisions are there too (``.projections.steered``).

        >>> [reply] = await model.chat([{"role": "user", "content": "Hi!"}], max_tokens=16)  # doctest: +SKIP
        >>> [reply] = await model.chat(messages, monitor=["concept/pirate"], max_tokens=16)  # doctest: +SKIP
        >>> reply.projections.table()                                                        # doctest: +SKIP
        """
        conversations, _ = normalize_conversations(messages)
        sampling = SamplingParams.from_any(sampling_params, **sampling_kwargs)
        capture = self._capture_layers(capture_layers)
        specs = self._steering_for(steering, len(conversations))
        probes = await self._probes(monitor)
        rendered = self._render(conversations, chat_options)
        results = await self._run_many([r.token_ids for r in rendered], sampling, specs, capture, probes)
        n = sampling.n
        per_sample = [r for r in rendered for _ in range(n)]
        if raw_output:
            responses = self._request_outputs([r.text for r in rendered], [r.token_ids for r in rendered], results, n)
            if probes or any(res.deltas for res in results):
                for i, out in enumerate(responses):
                    for j, c in enumerate(out.outputs):
                        r = rendered[i]
                        c.projections = self._projections(probes, r.token_ids, r.boundaries, results[i * n + j])
        else:
            responses = [
                ChatResponse(prefill=r.prefill, generated=res.text, token_ids=list(res.token_ids),
                             finish_reason=res.finish_reason,
                             projections=self._projections(probes, r.token_ids, r.boundaries, res))
                for r, res in zip(per_sample, results)
            ]
        if capture_layers is None:
            return responses
        handles = [self._handle(name, capture, r.token_ids, res, r.boundaries)
                   for name, r, res in zip(self._handle_names("chat", len(rendered), n), per_sample, results)]
        return responses, handles

    async def stream_chat(self, messages, sampling_params=None, *, steering=None, chat_options=None, monitor=None,
                          **sampling_kwargs):
        """Yield ``StreamChunk``s of one reply as tokens are produced; leaving the loop stops the request.

        With ``monitor=``, chunks carry ``projections`` (a ``monitor.ProjectionDelta``: the probes'
        values at the positions computed since the last chunk, one step behind the text; the first
        covers the prompt) and the first chunk ``monitor_header`` (probe names, layers, prompt
        tokens, message boundaries).

        >>> async for chunk in model.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=32):  # doctest: +SKIP
        ...     print(chunk.text, end="")
        """
        conversations, single = normalize_conversations(messages)
        if not single and len(conversations) != 1:
            raise ValidationError(f"stream_chat takes one conversation, got {len(conversations)}")
        sampling = SamplingParams.from_any(sampling_params, **sampling_kwargs)
        if sampling.n != 1:
            raise ValidationError(f"stream_chat streams one reply; got n={sampling.n} (use chat for n > 1)")
        [spec] = self._steering_for(steering, 1)
        probes = await self._probes(monitor)
        [rendered] = self._render(conversations, chat_options)
        from ..monitor import ProjectionDelta

        async with self._rw.reading():
            request = self._new_request(rendered.token_ids, sampling, self._global if spec is None else spec, (), probes)
            request.live_projections = True
            header = None
            prompt_texts: list = []
            reply_ids: list = []
            if request.watched:
                prompt_texts = [self._token_text(t) for t in rendered.token_ids]
                header = {"names": [p.name for p in probes], "layers": [p.layer for p in probes],
                          "prompt_len": len(rendered.token_ids), "prompt_tokens": prompt_texts,
                          "boundaries": [b.start_token for b in rendered.boundaries],
                          "roles": [b.role for b in rendered.boundaries]}
            pending = None  # projections wait for the next chunk (they trail the text by one step)
            async for event in self._events(request):
                if isinstance(event, ProjectionEvent):
                    delta = ProjectionDelta(event.start, torch.as_tensor(event.values, dtype=torch.float32), event.steered)
                    pending = delta if pending is None else _join(pending, delta)
                    continue
                if isinstance(event, TokenEvent):
                    chunk = StreamChunk(text=event.text, token_ids=[event.token_id])
                    reply_ids.append(event.token_id)
                elif isinstance(event, FinishEvent):
                    chunk = StreamChunk(text="", token_ids=[], finish_reason=event.finish_reason)
                else:  # pragma: no cover - the event types are closed
                    continue
                if pending is not None:
                    # per position, not per chunk: a chunk's text can hold a partial character or two tokens
                    pending = _with_tokens(pending, prompt_texts, reply_ids, self._token_text)
                chunk.projections, pending = pending, None
                chunk.monitor_header, header = header, None
                yield chunk

    async def encode(self, prompts, layers, *, steering=None) -> list[dict]:
        """Residual stream at ``layers`` for every token of each prompt: one forward pass, no generation.

        Prompts are strings (tokenized with special tokens) or token-id lists. Returns one
        ``{layer: [tokens, hidden]}`` per prompt, after steering. Backends may stop the forward
        pass after the deepest requested layer.

        >>> [acts] = await model.encode(["The capital of France is"], layers=[6])  # doctest: +SKIP
        >>> acts[6].shape  # doctest: +SKIP
        torch.Size([6, 576])
        """
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise EmptyInputError(f"prompts must be a non-empty string or list of strings, got {prompts!r}")
        capture = self._capture_layers(layers)
        if not capture:
            raise ValidationError("encode needs at least one layer")
        specs = self._steering_for(steering, len(prompts))
        ids = [self._encode_prompt(p, i) for i, p in enumerate(prompts)]
        async with self._rw.reading():
            requests = []
            for pid, spec in zip(ids, specs):
                req = self._new_request(pid, SamplingParams(temperature=0.0, max_tokens=1),
                                        self._global if spec is None else spec, capture)
                req.encode_only = self.capabilities.encode_only
                requests.append(req)
            results = await asyncio.gather(*(self._run(r) for r in requests))
        await self.engine.materialize(results)
        return [{layer: r.captures[layer][: len(pid)] for layer in capture} for r, pid in zip(results, ids)]

    @property
    def supports_encode_only(self) -> bool:
        """Whether ``encode`` runs a forward without sampling (``capabilities.encode_only``)."""
        return self.capabilities.encode_only

    async def next_token_logits(self, prompt, *, steering=None) -> torch.Tensor:
        """``[vocab]`` float32 logits of the token after ``prompt`` (a string or token ids), with steering.

        >>> row = await model.next_token_logits("The capital of France is")  # doctest: +SKIP
        """
        [spec] = self._steering_for(steering, 1)
        ids = self._encode_prompt(prompt, 0)
        async with self._rw.reading():
            req = self._new_request(ids, SamplingParams(temperature=0.0, max_tokens=1), self._global if spec is None else spec, ())
            req.want_logits = True
            result = await self._run(req)
        return result.logits  # type: ignore[return-value]  # a want_logits request always has them

    # ------------------------------------------------------------------ features
    async def load_features(self):
        """Load the feature set (by default the concept library: trained once, then read from cache); return it.

        The work runs in a worker thread, so the event loop keeps serving meanwhile; concurrent
        callers share one load, and once loaded this returns at once. ``model.features`` is the set.

        >>> fs = await model.load_features()  # doctest: +SKIP
        """
        if getattr(self, "_features", None) is None:
            # shielded: a caller that gives up (a client disconnects) must not cancel the others' shared load
            await asyncio.shield(asyncio.wrap_future(self._features_loading()))
        return self._features

    def _features_loading(self):
        """The ``concurrent.futures.Future`` of the one feature-set load (started by its first caller)."""
        import concurrent.futures
        import threading

        future = concurrent.futures.Future()
        shared = self.__dict__.setdefault("_features_future", future)   # atomic: one caller wins
        if shared is future:
            threading.Thread(target=self._load_features_here, args=(future,), name="workbench-features",
                             daemon=True).start()
        return shared

    def _load_features_here(self, future) -> None:
        from ..features.library import concept_library

        try:
            fs = asyncio.run(concept_library(self))   # a private loop: this thread is the worker
        except BaseException as exc:
            self.__dict__.pop("_features_future", None)   # a later call tries again
            future.set_exception(exc)
            return
        if getattr(self, "_features", None) is None:   # a set assigned meanwhile wins
            fs.model = self  # type: ignore[assignment]
            self._features = fs
        self.__dict__.pop("_features_future", None)
        future.set_result(self._features)

    @property
    def features(self):
        """The feature set attached to this model; by default the concept library (trained on first use, cached).

        Not loaded yet: without a running event loop in this thread (a script) it loads here; inside
        one (a notebook cell, a server) loading would stall the loop, so this raises a
        ``ValidationError``: ``await model.load_features()`` first.
        """
        if getattr(self, "_features", None) is None:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                self._features_loading().result()
            else:
                raise ValidationError(
                    "model.features is not loaded yet, and loading it here would block the running event loop: "
                    "run `await model.load_features()` first (it trains or loads the concept library in a worker thread)")
        return self._features

    @features.setter
    def features(self, feature_set) -> None:
        from ..features import FeatureSet

        if not isinstance(feature_set, FeatureSet):
            raise ValidationError(f"model.features must be a FeatureSet, got {type(feature_set).__name__}")
        for f in feature_set:
            if not 0 <= f.layer < self.layer_count or f.direction.numel() != self.hidden_size:
                raise ValidationError(f"feature {f.id!r} (layer {f.layer}, size {f.direction.numel()}) does not fit "
                                      f"this model (layers 0..{self.layer_count - 1}, hidden size {self.hidden_size})")
        feature_set.model = self
        self._features = feature_set

    async def fetch_captures_batch(self, handles) -> list:
        """Make the captures of many handles available in one round trip; return the handles.

        >>> await model.fetch_captures_batch(handles)   # doctest: +SKIP
        """
        return await self.engine.fetch_captures_batch(handles)

    # ------------------------------------------------------------------ global steering (writers)
    def export_steering_spec(self) -> SteeringSpec:
        """A copy of the global spec."""
        return self._global.copy()

    async def apply_steering_spec(self, spec: SteeringSpec) -> None:
        """Replace the global spec atomically (waits for in-flight requests)."""
        [spec] = self._steering_for(spec if spec is not None else SteeringSpec(), 1)
        async with self._rw.writing():
            self._global = spec.copy()

    async def _edit(self, layer_idx: int, op, kind) -> None:
        self.check_layer(layer_idx, "layer_idx")
        if op is not None:
            self.check_spec(SteeringSpec(layers={layer_idx: [op]}).validate(self.hidden_size, self.layer_count))
        async with self._rw.writing():
            self._global = replace_op(self._global, layer_idx, op, kind)

    async def set_layer_vector(self, layer_idx: int, vector, scale: float = 1.0) -> None:
        """Global additive steering at one layer: ``h <- h + scale * vector``; ``vector=None`` clears the layer.

        >>> await model.set_layer_vector(6, torch.randn(model.hidden_size) * 50.0)  # doctest: +SKIP
        """
        if vector is None:
            await self.clear_layer_vector(layer_idx)
            return
        await self._edit(layer_idx, AddSpec(vector=vector, scale=scale), AddSpec)

    async def clear_layer_vector(self, layer_idx: int) -> None:
        """Remove all global steering at one layer: its vector, projection cap and ablation (as chatspace does)."""
        self.check_layer(layer_idx, "layer_idx")
        async with self._rw.writing():
            self._global = self._global.copy()
            self._global.layers.pop(layer_idx, None)

    def set_target_layer(self, layer_idx: int) -> None:
        """Choose the layer ``set_vector`` steers (chatspace's single-layer API).

        >>> model.set_target_layer(6); await model.set_vector(vector)  # doctest: +SKIP
        """
        self._target_layer = self.check_layer(layer_idx, "layer_idx")

    @property
    def target_layer(self) -> int | None:
        """The layer ``set_vector`` steers (``set_target_layer``), or None before one was chosen."""
        return getattr(self, "_target_layer", None)

    def _require_target(self) -> int:
        if self.target_layer is None:
            raise ValidationError("no target layer: call model.set_target_layer(layer) before set_vector")
        return self.target_layer

    async def set_vector(self, vector, scale: float = 1.0) -> None:
        """``set_layer_vector`` at the target layer; ``None`` clears that layer."""
        await self.set_layer_vector(self._require_target(), vector, scale)

    def current_vector(self, layer_idx: int | None = None) -> torch.Tensor:
        """The vector globally added at a layer (default: the target layer), ``scale * vector``; zeros if none."""
        layer = self._require_target() if layer_idx is None else self.check_layer(layer_idx, "layer_idx")
        ls = self._global.layers.get(layer)
        adds = [op for op in (ls.operations if ls else []) if isinstance(op, AddSpec)]
        return sum((op.materialize() for op in adds), torch.zeros(self.hidden_size))

    async def set_layer_projection_cap(self, layer_idx: int, vector, min: float | None = None, max: float | None = None) -> None:
        """Global projection cap at one layer (applied after the layer's additive vector)."""
        await self._edit(layer_idx, ProjectionCapSpec(vector=vector, min=min, max=max), ProjectionCapSpec)

    async def clear_layer_projection_cap(self, layer_idx: int) -> None:
        await self._edit(layer_idx, None, ProjectionCapSpec)

    async def set_layer_ablation(self, layer_idx: int, vector, scale: float = 0.0) -> None:
        """Global ablation at one layer: scale the component along ``vector`` by ``scale``."""
        await self._edit(layer_idx, AblationSpec(vector=vector, scale=scale), AblationSpec)

    async def clear_layer_ablation(self, layer_idx: int) -> None:
        await self._edit(layer_idx, None, AblationSpec)

    async def clear_all_vectors(self) -> None:
        """Remove all global steering (the stack is kept)."""
        async with self._rw.writing():
            self._global = SteeringSpec()

    async def push_steering_spec(self, spec: SteeringSpec | None = None) -> None:
        """Save the current global spec on the stack, then apply ``spec`` if given."""
        checked = self._steering_for(spec, 1)[0] if spec is not None else None
        async with self._rw.writing():
            self._stack.append(self._global.copy())
            if checked is not None:
                self._global = checked.copy()

    async def pop_steering_spec(self) -> SteeringSpec:
        """Restore the most recently pushed global spec; return the spec that was active."""
        async with self._rw.writing():
            if not self._stack:
                raise SteeringStackEmptyError("pop_steering_spec: the steering stack is empty (push_steering_spec first)")
            current, self._global = self._global, self._stack.pop()
            return current

    @asynccontextmanager
    async def steering(self, spec: SteeringSpec):
        """Apply ``spec`` globally inside the block; restore the previous spec after it.

        >>> async with model.steering(spec):  # doctest: +SKIP
        ...     texts = await model.generate(prompts, sampling)
        """
        await self.push_steering_spec(spec)
        try:
            yield self
        finally:
            await self.pop_steering_spec()

