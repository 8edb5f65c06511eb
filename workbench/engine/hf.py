"""The ``hf`` backend: transformers on CPU or GPU, with a batching scheduler thread.

Requests from any event loop go to one scheduler thread that runs shared forward passes:
new requests are prefilled together (left-padded), then every active request advances one
token per decode pass. Each row keeps its own steering, sampler and seed, so a request's
tokens do not depend on its neighbours. Steering and capture happen in forward hooks on the
decoder blocks, driven by a per-pass plan (row -> ops, row -> capture buffers).

Written by hand rather than with transformers' ``generate``: ``generate`` cannot add or drop
requests mid-flight, stream several requests, or give each row its own steering and seed.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..errors import EngineError, NonFiniteActivationError
from ..outputs import logprob_dict
from ..sampling import make_generator, sample_token, token_logprobs
from ..steering import AddSpec, SteeringSpec
from .. import opmath
from ..monitor import ConditionState, probe_tables, probe_values
from .base import Capabilities, ErrorEvent, SteerModel, engine_attribute, FinishEvent, ProjectionEvent, Request, TokenEvent, request_failed
from .detok import TextStream, token_step
from .prefix_cache import PrefixCache
from .scheduler import ThreadedEngine

if TYPE_CHECKING:  # imported where used at run time: transformers is slow to import
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin, DynamicLayer, LinearAttentionCacheLayerMixin


@dataclass
class _Row:
    req: Request
    generator: object
    stream: TextStream
    eos_ids: frozenset
    out_ids: list = field(default_factory=list)
    chunks: dict = field(default_factory=dict)  # layer -> list of [n, hidden] CPU tensors
    finish_reason: str | None = None
    logits: object = None
    logprobs: list | None = None  # per generated token {id: Logprob}, when the request asks for them
    fed: int = 0           # positions fed through the model so far
    probe_tables: dict | None = None  # monitor: layer -> probe table (monitor.probe_tables)
    cond: ConditionState | None = None  # of a conditional spec
    pass_values: torch.Tensor | None = None  # [n, probes] values of this pass's positions
    pass_steered: list | None = None


_UNSTEERED = SteeringSpec()


@dataclass
class _Pass:
    """What the hooks do during one forward pass."""

    plans: dict      # layer -> ("add", [B,1,H] table) | ("all", ops) | ("groups", [(index, ops)])
    captures: dict   # layer -> [(row, start, chunk list)]
    stop_after: int | None = None  # encode passes end after this layer
    watches: dict = field(default_factory=dict)  # layer -> [(row index, start, _Row)]: probes and conditions


class _StopForward(Exception):
    """Raised by the hook of the last layer an encode pass needs: the rest of the model is skipped."""


class HFEngine(ThreadedEngine):
    """The transformers engine: a scheduler thread running shared forward passes over ``hf_model``."""

    backend = "hf"
    capabilities = Capabilities(encode_only=True)

    def __init__(self, hf_model, tokenizer, model_name: str, max_model_len: int | None = None, max_batch_size: int = 64,
                 prefix_cache_mb: float = 256):
        config = hf_model.config
        layers = _decoder_layers(hf_model)
        # a local: mypy mis-infers `int(x or getattr(...))`
        model_len: int = getattr(config, "max_position_embeddings", 2048)
        ctx = int(max_model_len or model_len)
        self._init_shape(model_name, tokenizer, config.hidden_size, len(layers), ctx)
        self.hf_model = hf_model
        self.device = next(hf_model.parameters()).device
        self.dtype = next(hf_model.parameters()).dtype
        self.max_batch_size = int(max_batch_size)
        gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        eos = {tokenizer.eos_token_id, config.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])}
        self._eos = frozenset(int(e) for e in eos if e is not None)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self._eos or {0})
        self._pass: _Pass | None = None
        self._hooks = [layer.register_forward_hook(self._make_hook(i)) for i, layer in enumerate(layers)]
        self._init_queue()
        # the running batch: rows, their KV, attention mask [B, width] and next positions [B]; the last
        # three are None exactly when there are no rows
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None
        self._plan_key: tuple[int, ...] | None = None  # ids of the specs self._plans was built for
        self._plans: dict = {}
        self.stats = {"prefill_passes": 0, "decode_passes": 0, "tokens": 0, "max_batch": 0, "requests": 0,
                      "prefix_hit_tokens": 0, "encode_passes": 0}
        self.prefix_cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self._kv_shape: tuple[int, int] | None = None  # (heads, head dim) of a KV entry, once known
        self._start_thread(self._loop, "hf")
        _LIVE.add(self)

    # ------------------------------------------------------------------ ThreadedEngine hooks
    def _running_count(self) -> int:
        return len(self._rows)

    def _after_close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._cache = None
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
        self.hf_model = None

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._wait_for_work(lambda: self._pending or self._rows):
                    self._fail_on_close([r.req for r in self._rows])
                    self._rows = []
                    return
                room = self.max_batch_size - len(self._rows)
                new: list[Request] = []
                encode: list[Request] = []
                while self._pending and len(new) < room and len(encode) < self.max_batch_size:
                    req = self._pending.popleft()
                    if not req.cancelled:
                        (encode if req.encode_only else new).append(req)
            try:
                self._drop_finished()
                with torch.inference_mode():
                    if encode:
                        self._isolated(self._encode, encode)
                    if new:
                        self._isolated(self._prefill, new)
                    elif self._rows:
                        self._decode_isolated()
                self._drop_finished()
            except Exception as exc:  # a pass that fails for every request alike: fail them, keep the engine
                failed = [r.req for r in self._rows] + [r for r in new + encode if not self._merged([r])]
                for req in failed:
                    req.emit(ErrorEvent(EngineError(f"forward pass failed: {type(exc).__name__}: {exc}")))
                self._reset_batch()
            finally:
                self._pass = None

    # ------------------------------------------------------------------ failure isolation
    def _isolated(self, run, reqs: list[Request]) -> None:
        """Run a prefill or encode pass; if it raises, run each request alone so only the culprit fails.

        These passes only touch the running batch after their forward succeeded, so a retry is clean.
        """
        try:
            run(reqs)
            return
        except Exception as exc:
            if self._merged(reqs):  # failed after joining the batch: no clean retry
                raise
            if len(reqs) == 1:
                self._fail(reqs[0], exc)
                return
        for req in reqs:
            try:
                run([req])
            except Exception as exc:
                if self._merged([req]):
                    raise
                self._fail(req, exc)

    def _merged(self, reqs: list[Request]) -> bool:
        """Whether any of ``reqs`` is already a row of the running batch (requests are unhashable: by id)."""
        running = {id(r.req) for r in self._rows}
        return any(id(q) in running for q in reqs)

    def _decode_isolated(self) -> None:
        """Advance the batch one token; if the pass raises, find the rows that fail alone and drop them.

        The failed pass may have appended KV to some layers and capture chunks to some rows: both are
        rolled back. Each row is then run alone on a copy of its cache (no sampling, no capture); rows
        that raise alone fail, and the rest run their batched step again. A failure no single row
        reproduces is the batch's, and fails it (the caller's handler).
        """
        assert self._mask is not None and self._cache is not None  # only called with a running batch
        width = self._mask.shape[1]
        marks = [(chunks, len(chunks)) for row in self._rows for chunks in row.chunks.values()]
        try:
            self._decode()
            return
        except Exception as exc:
            first = exc
        self._pass = None
        # back to `width` positions: the failed step may have grown some layers. Sliced, not with
        # DynamicCache.crop(width), whose absolute-size form transformers deprecates
        _slice_kv(self._cache, slice(None), slice(None, width))
        self._mask = self._mask[:, :width]
        for chunks, n in marks:
            del chunks[n:]
        culprits: list[tuple[_Row, Exception]] = []
        for i, row in enumerate(self._rows):
            try:
                self._probe(i)
            except Exception as exc:
                culprits.append((row, exc))
        if not culprits:
            raise first
        for row, err in culprits:  # not `exc`: Python unbinds an except clause's name when the clause ends
            self._fail(row.req, err, row)
        self._drop_finished()
        if self._rows:
            self._decode()

    def _probe(self, i: int) -> None:
        """Row ``i``'s next decode forward alone, on a copy of its cache; the batch's state is untouched."""
        from transformers import DynamicCache

        assert self._cache is not None and self._mask is not None and self._next_pos is not None  # a running batch
        row = self._rows[i]
        cache = DynamicCache(ddp_cache_data=[(keys[i:i + 1].clone(), values[i:i + 1].clone())
                                             for keys, values in map(_kv, self._cache.layers)])
        mask = torch.cat([self._mask[i:i + 1], self._mask.new_ones((1, 1))], dim=1)
        ids = torch.tensor([[row.out_ids[-1]]], device=self.device)
        self._pass = _Pass(self._build_plans([self._effective(row, row.fed)]), {})
        try:
            self.hf_model(input_ids=ids, attention_mask=mask, position_ids=self._next_pos[i:i + 1, None],
                          past_key_values=cache, use_cache=True)
        finally:
            self._pass = None

    def _fail(self, req: Request, exc: BaseException, row: "_Row | None" = None) -> None:
        """End one request with an error; the engine and the other requests go on."""
        if row is not None:
            row.finish_reason = "error"  # dropped by _drop_finished, its KV is not remembered
        req.emit(ErrorEvent(request_failed(exc)))

    def _reset_batch(self) -> None:
        self._rows, self._cache, self._mask, self._next_pos, self._plan_key = [], None, None, None, None

    def _prefill(self, reqs: list[Request]) -> None:
        """Run the new requests' prompts in one pass: ``[pad, cached prefix, pad, new tokens]`` per row."""
        from transformers import DynamicCache

        rows = [self._new_row(r) for r in reqs]
        hits = []
        for r in reqs:
            # captured and watched requests run in full: every prompt position is captured / measured
            hit = (0, None) if r.capture_layers or r.watched or self.prefix_cache is None else \
                self.prefix_cache.lookup(r.fingerprint, r.prompt_ids)
            hits.append(hit)
        past = [n for n, _ in hits]
        new = [len(r.prompt_ids) - n for r, n in zip(reqs, past)]
        wp, ws = max(past), max(new)
        ids = torch.full((len(reqs), ws), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), wp + ws), dtype=torch.long)
        pos = torch.zeros((len(reqs), ws), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, ws - new[i]:] = torch.tensor(r.prompt_ids[past[i]:])
            mask[i, wp - past[i]:wp] = 1
            mask[i, wp + ws - new[i]:] = 1
            pos[i, ws - new[i]:] = torch.arange(past[i], past[i] + new[i])
        if wp:
            data = []
            for layer in range(self.layer_count):
                ks, vs = [], []
                for _, kv in hits:
                    k, v = kv[layer] if kv is not None else self._empty_kv(layer)
                    ks.append(_lpad(k, wp))
                    vs.append(_lpad(v, wp))
                data.append((torch.cat(ks), torch.cat(vs)))
            cache = DynamicCache(ddp_cache_data=data)
        else:
            cache = DynamicCache()
        self._pass = _Pass(self._build_plans([self._effective(row, 0) for row in rows]),
                           self._capture_map(rows, [ws - n for n in new]),
                           watches=self._watch_map(rows, [ws - n for n in new], [ws] * len(rows)))
        out = self.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=pos.to(self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        self._pass = None
        self._report_watched(rows)
        self.stats["prefill_passes"] += 1
        self.stats["requests"] += len(reqs)
        self.stats["prefix_hit_tokens"] += sum(past)
        lens = torch.tensor([len(r.prompt_ids) for r in reqs], device=self.device)
        self._merge(rows, cache, mask.to(self.device), lens)
        self._sample(rows, out.logits[:, -1, :])

    def _encode(self, reqs: list[Request]) -> None:
        """One forward over the prompts (left-padded), stopping after the deepest captured layer."""
        rows = [_Row(r, None, TextStream(self.tokenizer), self._eos) for r in reqs]
        lens = [len(r.prompt_ids) for r in reqs]
        width = max(lens)
        ids = torch.full((len(reqs), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - lens[i]:] = torch.tensor(r.prompt_ids)
            mask[i, width - lens[i]:] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        from transformers import DynamicCache

        stop = max(layer for r in reqs for layer in r.capture_layers)
        self._pass = _Pass(self._build_plans([r.steering for r in reqs]),
                           self._capture_map(rows, [width - n for n in lens]), stop_after=stop)
        try:
            self.hf_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                          position_ids=pos.to(self.device), past_key_values=DynamicCache(), use_cache=True,
                          logits_to_keep=1)
        except _StopForward:
            pass
        finally:
            self._pass = None
        self.stats["encode_passes"] += 1
        for row in rows:
            captures = {layer: torch.cat(chunks) for layer, chunks in row.chunks.items()}
            row.req.emit(FinishEvent("encode", "", [], captures))

    def _empty_kv(self, layer: int):
        """A zero-length KV entry shaped like the batch's, for rows without a cached prefix."""
        if self._kv_shape is None:
            raise EngineError("prefix cache hit before any KV shape is known")  # pragma: no cover
        heads, dim = self._kv_shape
        empty = torch.zeros((1, heads, 0, dim), dtype=self.dtype, device=self.device)
        return empty, empty

    def _decode(self) -> None:
        assert self._mask is not None and self._next_pos is not None  # only called with a running batch
        rows = self._rows
        ids = torch.tensor([[r.out_ids[-1]] for r in rows], device=self.device)
        mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        specs = [self._effective(r, r.fed) for r in rows]
        key = tuple(id(spec) for spec in specs)
        if key != self._plan_key:  # plans only change when the batch (or a condition's decision) does
            self._plans, self._plan_key = self._build_plans(specs), key
        self._pass = _Pass(self._plans, self._capture_map(rows, [0] * len(rows)),
                           watches=self._watch_map(rows, [0] * len(rows), [1] * len(rows)))
        out = self.hf_model(input_ids=ids, attention_mask=mask, position_ids=self._next_pos[:, None],
                            past_key_values=self._cache, use_cache=True)
        self._pass = None
        self._report_watched(rows)
        self._mask = mask
        self._next_pos = self._next_pos + 1
        self.stats["decode_passes"] += 1
        self._sample(rows, out.logits[:, -1, :])

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, lens: torch.Tensor) -> None:
        """Add freshly prefilled rows to the running batch, left-padding the shorter side."""
        if not self._rows:
            self._rows, self._cache, self._mask, self._next_pos = list(rows), cache, mask, lens
        else:
            assert self._cache is not None and self._mask is not None and self._next_pos is not None  # rows: a batch
            width = max(self._mask.shape[1], mask.shape[1])
            data = []
            for (old_k, old_v), (new_k, new_v) in zip(map(_kv, self._cache.layers), map(_kv, cache.layers)):
                data.append((torch.cat([_lpad(old_k, width), _lpad(new_k, width)]),
                             torch.cat([_lpad(old_v, width), _lpad(new_v, width)])))
            from transformers import DynamicCache

            merged = (DynamicCache(ddp_cache_data=data),
                      torch.cat([_lpad(self._mask, width, dim=1), _lpad(mask, width, dim=1)]),
                      torch.cat([self._next_pos, lens]))
            # all or nothing: if building the merged batch raised, the running batch is as it was and
            # only the joining requests fail (a half-merged batch would fail every row's next step)
            self._cache, self._mask, self._next_pos = merged
            self._rows = self._rows + list(rows)
        self._plan_key = None
        self.stats["max_batch"] = max(self.stats["max_batch"], len(self._rows))
        if self._cache.layers and self._kv_shape is None:
            k, _ = _kv(self._cache.layers[0])
            self._kv_shape = (k.shape[1], k.shape[3])

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.finish_reason is None and not r.req.cancelled]
        if len(keep) == len(self._rows):
            return
        if self.prefix_cache is not None and self._cache is not None:
            for i, row in enumerate(self._rows):
                # finished or stopped: what it fed so far is valid KV either way (a failed row's may not be)
                if i not in keep and row.finish_reason != "error":
                    self._remember(i, row)
        if not keep:
            self._reset_batch()
            return
        # rows were running (keep is a strict, non-empty subset of them): the batch is there
        assert self._cache is not None and self._mask is not None and self._next_pos is not None
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask[index]
        self._next_pos = self._next_pos[index]
        # leading columns that are padding for every remaining row can go
        first = int(self._mask.any(dim=0).nonzero()[0])
        self._mask = self._mask[:, first:]
        _slice_kv(self._cache, index, slice(first, None))
        self._plan_key = None

    def _remember(self, i: int, row: _Row) -> None:
        """Keep the KV of what this row fed through the model (prompt, generated but the last), for later prefixes."""
        # _drop_finished calls this only with a prefix cache and a running batch
        assert self.prefix_cache is not None and self._cache is not None and self._mask is not None
        real = self._mask[i].bool()
        kv = [(keys[i:i + 1, :, real], values[i:i + 1, :, real])  # copies
              for keys, values in map(_kv, self._cache.layers)]
        tokens = row.req.prompt_ids + row.out_ids[:-1]
        if kv and kv[0][0].shape[2] == len(tokens):
            self.prefix_cache.store(row.req.fingerprint, tokens, kv)

    # ------------------------------------------------------------------ sampling and results
    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        greedy = logits.argmax(dim=-1).tolist()
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.req.cancelled or row.finish_reason is not None:
                continue
            if not finite[i]:
                self._fail(row.req, NonFiniteActivationError(), row)
                continue
            try:
                self._advance(row, i, greedy, logits)
            except Exception as exc:  # this row's sampler or detokenizer: it fails alone
                self._fail(row.req, exc, row)

    def _advance(self, row: _Row, i: int, greedy: list, logits: torch.Tensor) -> None:
        """Sample row ``i``'s next token, stream its text, and finish it when it is done."""
        params = row.req.sampling
        holding = len(row.out_ids) < params.min_tokens  # EOS and stop ids are masked: argmax may differ
        if params.greedy and not params.penalized and not holding:
            token = greedy[i]
        else:
            seen = torch.tensor(row.req.prompt_ids + row.out_ids, device=logits.device)
            out = torch.tensor(row.out_ids, dtype=torch.long, device=logits.device)
            token = sample_token(logits[i], params, row.generator, seen, output_ids=out, stop_ids=sorted(row.eos_ids))
        if row.req.want_logits and not row.out_ids:
            row.logits = logits[i].float().cpu()
        if params.logprobs is not None:  # vLLM's raw logprobs: the model's logits before any processing
            row.logprobs = row.logprobs if row.logprobs is not None else []
            row.logprobs.append(logprob_dict(token_logprobs(logits[i], token, params.logprobs), self._token_text))
        row.out_ids.append(token)
        self.stats["tokens"] += 1
        delta, row.finish_reason = token_step(row.stream, token, params, row.eos_ids, len(row.out_ids),
                                              len(row.req.prompt_ids) + len(row.out_ids), self.max_model_len)
        row.req.emit(TokenEvent(token, delta))  # one event per token, eos included (text "")
        if row.finish_reason is not None:
            captures = {layer: torch.cat(chunks) if chunks else torch.empty(0, self.hidden_size)
                        for layer, chunks in row.chunks.items()}
            cumulative = None if row.logprobs is None else sum(step[t].logprob for step, t in zip(row.logprobs, row.out_ids))
            row.req.emit(FinishEvent(row.finish_reason, row.stream.text, list(row.out_ids), captures, row.logits,
                                     row.logprobs, cumulative))

    # ------------------------------------------------------------------ monitoring and conditions
    def _new_row(self, r: Request) -> _Row:
        row = _Row(r, make_generator(r.sampling, self.device), TextStream(self.tokenizer, r.sampling.stop, r.sampling.min_tokens),
                   self._eos | frozenset(r.sampling.stop_token_ids))
        if r.probes:
            row.probe_tables = probe_tables(r.probes)
        if r.condition is not None:
            row.cond = ConditionState(r.condition, len(r.prompt_ids))
        return row

    @staticmethod
    def _effective(row: _Row, position: int) -> SteeringSpec:
        """The spec that steers ``row``'s position ``position`` (a conditional spec's decision, see ``monitor``)."""
        if row.cond is None:
            return row.req.steering
        return row.req.steering if row.cond.steer_at(position) else _UNSTEERED

    def _watch_map(self, rows: list[_Row], starts: list[int], counts: list[int]) -> dict:
        """Layer -> watched rows for this pass; resets each watched row's per-pass values."""
        watches: dict = {}
        for i, row in enumerate(rows):
            if row.probe_tables is None and row.cond is None:
                continue
            row.pass_values = torch.zeros(counts[i] - starts[i], len(row.req.probes))
            row.pass_steered = None if row.cond is None else \
                [row.cond.steer_at(p) for p in range(row.fed, row.fed + counts[i] - starts[i])]
            layers = set(row.probe_tables or ()) | ({row.cond.cond.probe.layer} if row.cond is not None else set())
            for layer in layers:
                watches.setdefault(layer, []).append((i, starts[i], row))
        return watches

    def _watch(self, layer: int, hidden: torch.Tensor, items) -> None:
        for i, start, row in items:
            h = hidden[i, start:]
            if row.probe_tables is not None and layer in row.probe_tables:
                table = row.probe_tables[layer]
                row.pass_values[:, table[0]] = probe_values(h, table).cpu()
            if row.cond is not None and row.cond.cond.probe.layer == layer:
                row.cond.update(row.fed, row.cond.cond.probe.values(h).cpu())

    def _report_watched(self, rows: list[_Row]) -> None:
        """After a successful pass: each watched row's values, then its position count moves on."""
        for row in rows:
            n = 1 if row.fed else len(row.req.prompt_ids)
            if row.pass_values is not None and not row.req.cancelled:
                row.req.emit(ProjectionEvent(row.fed, row.pass_values, row.pass_steered))
            row.pass_values, row.pass_steered = None, None
            row.fed += n

    # ------------------------------------------------------------------ steering and capture
    def _capture_map(self, rows: list[_Row], starts: list[int]) -> dict:
        cmap: dict = {}
        for i, row in enumerate(rows):
            for layer in row.req.capture_layers:
                cmap.setdefault(layer, []).append((i, starts[i], row.chunks.setdefault(layer, [])))
        return cmap

    def _build_plans(self, specs: list[SteeringSpec]) -> dict:
        plans: dict[int, tuple[str, object]] = {}  # see _Pass.plans
        layers = sorted({L for s in specs for L in s.layer_indices()})
        for L in layers:
            ops = [s.layers[L].operations if L in s.layers else [] for s in specs]
            if all(len(o) <= 1 and all(isinstance(x, AddSpec) for x in o) for o in ops):
                table = torch.zeros(len(specs), 1, self.hidden_size, dtype=torch.float32)
                for i, o in enumerate(ops):
                    if o:
                        table[i, 0] = o[0].scale * o[0].vector
                plans[L] = ("add", table.to(self.device, self.dtype))
                continue
            groups: dict = {}
            for i, (s, o) in enumerate(zip(specs, ops)):
                if o:
                    groups.setdefault(id(s.layers[L]), (o, []))[1].append(i)
            if len(groups) == 1 and len(next(iter(groups.values()))[1]) == len(specs):
                plans[L] = ("all", next(iter(groups.values()))[0])
            else:
                plans[L] = ("groups", [(torch.tensor(rows, device=self.device), o) for o, rows in groups.values()])
        return plans

    def _make_hook(self, layer_idx: int):
        def hook(module, args, output):
            step = self._pass
            if step is None or threading.get_ident() != self._thread.ident:
                return None  # not one of our passes (e.g. a user's own forward): plain transformers
            hidden = output[0] if isinstance(output, tuple) else output
            plan = step.plans.get(layer_idx)
            if plan is not None:
                hidden = _apply_plan(hidden, plan)
            for row, start, chunks in step.captures.get(layer_idx, ()):
                chunks.append(hidden[row, start:].to("cpu", torch.float32, copy=True))
            watched = step.watches.get(layer_idx)
            if watched:
                self._watch(layer_idx, hidden, watched)
            if step.stop_after == layer_idx:
                raise _StopForward
            if plan is None:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook


class HFSteerModel(SteerModel):
    """``SteerModel`` on transformers (see :class:`workbench.engine.base.SteerModel` for the API).

    Holds an :class:`HFEngine` (``model.engine``); ``hf_model`` is the transformers model it runs,
    usable for plain reference forwards. ``wb.load(name)`` makes one.

    >>> model = wb.load("default", device="cpu")                        # doctest: +SKIP
    >>> model.hf_model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape  # doctest: +SKIP
    """

    engine: HFEngine
    hf_model = engine_attribute("hf_model", "The transformers model (None after ``close``).")
    device = engine_attribute("device")
    dtype = engine_attribute("dtype")
    max_batch_size = engine_attribute("max_batch_size")
    prefix_cache = engine_attribute("prefix_cache", "The engine's prefix cache of steered prompt KV (None: off).",
                                    settable=True)
    load_seconds: float  # seconds ``load_hf`` took (set there; a model built directly has none)

    def __init__(self, hf_model, tokenizer, model_name: str, max_model_len: int | None = None, max_batch_size: int = 64,
                 prefix_cache_mb: float = 256):
        super().__init__(HFEngine(hf_model, tokenizer, model_name, max_model_len=max_model_len,
                                  max_batch_size=max_batch_size, prefix_cache_mb=prefix_cache_mb))



_LIVE: "weakref.WeakSet[HFEngine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop scheduler threads before the interpreter tears torch down under them."""
    for engine in list(_LIVE):
        try:
            engine.close()
        except Exception:
            pass


def _apply_plan(hidden: torch.Tensor, plan) -> torch.Tensor:
    kind, data = plan
    if kind == "add":
        return opmath.add(hidden, data)
    if kind == "all":
        return _ops(hidden, data)
    hidden = hidden.clone()
    for index, ops in data:
        hidden[index] = _ops(hidden[index], ops)
    return hidden


def _ops(h: torch.Tensor, ops) -> torch.Tensor:
    if h.dtype == torch.float32:
        for op in ops:
            h = op.apply(h)
        return h
    out = h.float()  # low-precision models: do the projections in float32
    for op in ops:
        out = op.apply(out)
    return out.to(h.dtype)


def _kv_layer(layer: CacheLayerMixin | LinearAttentionCacheLayerMixin) -> DynamicLayer:
    """One of the engine's cache layers as what it is: the engine builds its caches without a config,
    so every layer is a ``DynamicLayer`` (never a hybrid model's linear-attention layer)."""
    from transformers.cache_utils import DynamicLayer

    assert isinstance(layer, DynamicLayer)
    return layer


def _kv(layer: CacheLayerMixin | LinearAttentionCacheLayerMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache layer's keys and values: None only before its first update, and every layer of the
    engine's caches has had one (a forward filled it, or it was built from KV)."""
    kv = _kv_layer(layer)
    assert kv.keys is not None and kv.values is not None
    return kv.keys, kv.values


def _slice_kv(cache: DynamicCache, rows, positions) -> None:
    """Keep ``[rows, :, positions]`` of every layer's keys and values, in place."""
    for layer in map(_kv_layer, cache.layers):
        keys, values = _kv(layer)
        layer.keys, layer.values = keys[rows, :, positions], values[rows, :, positions]


def _lpad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _decoder_layers(hf_model):
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = hf_model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise EngineError(f"cannot find the decoder blocks of {type(hf_model).__name__}")


def load_hf(path, model_name: str, device=None, dtype=None, max_model_len=None, max_batch_size: int = 64,
            prefix_cache_mb: float = 256) -> HFSteerModel:
    """Load an HF folder into an ``HFSteerModel``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device is None or device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None or dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    model = HFSteerModel(hf_model, tokenizer, model_name, max_model_len=max_model_len, max_batch_size=max_batch_size,
                         prefix_cache_mb=prefix_cache_mb)
    model.load_seconds = time.perf_counter() - t0
    return model
