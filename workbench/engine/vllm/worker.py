"""The half of the vLLM backend that runs inside vLLM's processes (engine core and workers).

Steering is part of the decoder layer's forward, so it survives vLLM's compiled mode (Python hooks
do not: a compiled graph never calls them). Each patched layer owns preallocated tables:

- ``wb_add[S, M, H]``, ``wb_dir[S, M, H]``, ``wb_par[S, M, 3]`` (lo, hi, c): up to ``M`` op positions
  for each of ``S`` spec slots (slot 0 is "no steering" and stays zero). One op position does
  ``h <- h + a; p = h.u; h <- h + (clamp(p, lo, hi) - p + c * p) * u``, which is an ``AddSpec``
  (``u = 0``), a ``ProjectionCapSpec`` (``c = 0``) or an ``AblationSpec`` (``lo, hi = -inf, inf``,
  ``c = scale - 1``), or an add followed by a projection.
- ``wb_slot[T]``: the spec slot of every token of the current batch, shared by all layers and filled
  before each forward from what the model runner actually scheduled (its ``input_batch.req_ids``
  and per-request token counts), so chunked prefill, prefix-cache hits, requests joining or leaving
  and preemption all map tokens to the right request.
- ``wb_cap[T, H]``: the layer's residual stream after steering, for every token of the batch; the
  worker copies the rows of requests that asked for capture after the forward, and computes the
  probe values of watched requests from them (``workbench.monitor``): they go to the *board*, a
  shared-memory array ``[rows, max_model_len, probes + 1]`` the kernel maps (one row per watched
  request; the last column is the "steered" flag of a conditional spec). A conditional spec's
  per-token slot is decided here, before each forward, by the same ``ConditionState`` the ``hf``
  backend runs, from values of positions already computed. After a step with
  steered tokens, the last layer's rows are also checked for inf/NaN: a request whose steering
  overflowed is reported (``wb_failures``) and ended by the kernel, alone.

Tables are written between steps by ``collective_rpc`` (``WorkbenchWorker.wb_set_slot``); a slot is
only rewritten when no running request uses it (see ``tables``). The patch is a no-op unless the
engine was started with ``additional_config={"workbench": {...}}``, so other users of vLLM in the
same environment are unaffected. It is applied in every vLLM process by the ``vllm.general_plugins``
entry point (``plugin.register``), which imports this module and nothing heavier. Every vLLM
internal used here goes through ``_compat``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...opmath import apply_op_positions
from . import _compat
from .shm import assemble, nbytes, ship
from .shm import trim as trim_heap

CONFIG_KEY = "workbench"
_PATCHED: set = set()


def patch_decoder_layers() -> list[str]:
    """Wrap ``__init__`` and ``forward`` of the supported decoder layers (idempotent)."""
    done = []
    for cls in _compat.layer_classes():
        class_name = cls.__name__
        if cls in _PATCHED:
            done.append(class_name)
            continue
        cls.__init__ = _wrap_init(cls.__init__)
        cls.forward = _wrap_forward(cls.forward)
        _PATCHED.add(cls)
        done.append(class_name)
    return done


def _wrap_init(init):
    def __init__(self, vllm_config=None, prefix: str = "", *args, **kwargs):
        init(self, vllm_config, prefix, *args, **kwargs)
        self.wb_enabled = False
        settings = _compat.settings(vllm_config, CONFIG_KEY)
        if settings is None:
            return
        hidden = int(self.hidden_size)
        slots, ops, tokens = int(settings["slots"]), int(settings["ops"]), int(settings["tokens"])
        shared = _shared_slot_buffer(tokens)
        self.wb_layer = _compat.layer_index(prefix)
        self.wb_ops = ops
        dtype = _compat.model_dtype(vllm_config)
        self.register_buffer("wb_slot", shared, persistent=False)
        self.register_buffer("wb_add", torch.zeros(slots, ops, hidden, dtype=torch.float32), persistent=False)
        self.register_buffer("wb_dir", torch.zeros(slots, ops, hidden, dtype=torch.float32), persistent=False)
        par = torch.zeros(slots, ops, 3, dtype=torch.float32)
        par[..., 0], par[..., 1] = -float("inf"), float("inf")
        self.register_buffer("wb_par", par, persistent=False)
        self.register_buffer("wb_cap", torch.zeros(tokens, hidden, dtype=dtype), persistent=False)
        self.wb_enabled = True
    return __init__


_SHARED: dict = {}


def _shared_slot_buffer(tokens: int) -> torch.Tensor:
    """One per-token slot index for all layers of the model being built in this process."""
    key = (tokens, str(torch.get_default_device()))
    buf = _SHARED.get(key)
    if buf is None:
        buf = _SHARED[key] = torch.zeros(tokens, dtype=torch.long)
    return buf


def _wrap_forward(forward):
    def patched(self, positions, hidden_states, residual, *args, **kwargs):
        out, res = forward(self, positions, hidden_states, residual, *args, **kwargs)
        if not self.wb_enabled:  # a Python attribute: fixed when the graph is traced
            return out, res
        stream = out + res if res is not None else out
        n = stream.shape[0]
        h = stream.float() if stream.dtype != torch.float32 else stream
        slot = self.wb_slot[:n]
        h = apply_op_positions(h, self.wb_add[slot], self.wb_dir[slot], self.wb_par[slot])
        stream = h.to(stream.dtype) if h.dtype != stream.dtype else h
        self.wb_cap[:n].copy_(stream)
        # the next layer (or the final norm) adds delta + residual: give it the stream and zero
        return stream, torch.zeros_like(stream)
    patched.__wrapped__ = forward
    return patched


class WorkbenchWorker:
    """vLLM worker extension (``worker_extension_cls``): spec slots, per-step token map, captures."""

    def wb_init(self) -> dict:
        """Find the patched layers and wrap the model runner's step; return what the kernel needs."""
        runner = self.model_runner
        model = runner.model
        layers = [m for m in model.modules() if getattr(m, "wb_enabled", False)]
        layers.sort(key=lambda m: m.wb_layer)
        if not layers:
            return {"ok": False, "reason": f"no patched decoder layers in {type(model).__name__}"}
        self._wb_layers = layers
        self._wb_slot = layers[0].wb_slot
        self._wb_filled = 0
        self._wb_step: list = []
        self._wb_store: dict = {}  # key -> {layer: [(start, rows)]}
        self._wb_next: dict = {}   # request id -> next position expected (a smaller start = recomputed)
        self._wb_counts = {"steps": 0, "recomputed": 0, "chunked": 0, "mixed_slot_steps": 0, "failed": 0,
                           "kv_scrubs": 0}
        self._wb_model = model
        self._wb_check = None      # (request ids, token counts) of a step with steered tokens
        self._wb_failed: dict = {}  # request id -> (kind, detail), until the kernel asks
        settings = _compat.settings(self.vllm_config, CONFIG_KEY) or {}
        path = settings.get("faults")
        self._wb_faults = np.memmap(path, dtype=np.int64, mode="r+", shape=(1,)) if path else None
        board = settings.get("board")
        self._wb_board = np.memmap(board["path"], dtype=np.float32, mode="r+", shape=tuple(board["shape"])) \
            if board else None
        self._wb_watch: dict = {}   # request id -> _Watch (probes, condition state, board row)
        self._wb_tables: dict = {}  # probe signature -> tables on the device, shared by requests
        self._wb_watched: list = []  # this step's watched requests: (watch, offset, n, start, rid, steered)
        if not getattr(runner, "_wb_wrapped", False):
            _compat.wrap_runner(runner, lambda out, counts: self._wb_before(runner, out, counts),
                                lambda: bool(self._wb_step or self._wb_check is not None or self._wb_watched),
                                self._wb_after)
            runner._wb_wrapped = True
        return {"ok": True, "layers": len(layers), "slots": int(layers[0].wb_add.shape[0]),
                "ops": int(layers[0].wb_ops), "tokens": int(self._wb_slot.shape[0]),
                "runner": type(runner).__module__ + "." + type(runner).__name__, "rank": self._wb_rank()}

    def _wb_rank(self) -> int:
        return int(getattr(self, "rank", 0))

    def wb_set_slot(self, slot: int, tables) -> bool:
        """Write one spec slot at every layer: ``tables`` maps layer -> float32 bytes of add [M,H], dir [M,H], par [M,3].

        Raw bytes, not tensors: RPC arguments are pickled again on their way from the engine core to
        the workers, and tensors decoded there are not picklable.
        """
        from .tables import unpack_slot

        for layer in self._wb_layers:
            entry = tables.get(layer.wb_layer) if tables else None
            if entry is not None:
                entry = unpack_slot(entry, layer.wb_add.shape[1], layer.wb_add.shape[2])
            if entry is None:
                layer.wb_add[slot].zero_()
                layer.wb_dir[slot].zero_()
                layer.wb_par[slot, :, 0] = -float("inf")
                layer.wb_par[slot, :, 1] = float("inf")
                layer.wb_par[slot, :, 2] = 0.0
            else:
                add, unit, par = entry
                layer.wb_add[slot].copy_(add)
                layer.wb_dir[slot].copy_(unit)
                layer.wb_par[slot].copy_(par)
        return True

    def wb_fetch(self, keys, logits_at=None):
        """Hand over (and forget) the captures of ``keys`` (see ``ship`` for the reply's form).

        ``logits_at`` maps a key to a position: its last-layer row there goes through the final
        norm and the LM head, returned under ``"logits"``. (Tensors in RPC results would be turned
        into nested lists on the way, so the rows travel as raw float32 through shared memory.)
        """
        stores = {key: self._wb_store.pop(key, None) or {} for key in keys}
        extra = {}
        if logits_at:
            last = len(self._wb_layers) - 1
            for key, pos in logits_at.items():
                logits = self._wb_logits(assemble(stores[key][last])[pos]) if last in stores.get(key, {}) else None
                if logits is not None:
                    extra[key] = {"logits": logits}
        if self._wb_rank() != 0:
            return None
        reply = ship(stores, extra)
        self._wb_freed(sum(nbytes(parts) for parts in stores.values()))
        return reply

    def _wb_freed(self, nbytes: int) -> None:
        """Trim the heap after every 256 MiB of released captures (a trim costs ~0.5 s on a big heap)."""
        self._wb_unfreed = getattr(self, "_wb_unfreed", 0) + nbytes
        if self._wb_unfreed >= 256 * 2**20:
            self._wb_unfreed = 0
            trim_heap()

    def _wb_logits(self, row: torch.Tensor) -> torch.Tensor:
        model = self._wb_model
        dtype = self._wb_layers[0].wb_cap.dtype
        device = self._wb_layers[0].wb_cap.device
        with torch.inference_mode():
            logits = _compat.final_logits(model, row.to(device, dtype)[None])
        return logits[0].float().cpu() if logits is not None else None

    def wb_release(self, keys) -> int:
        """Forget the captures of ``keys`` (handles closed or garbage-collected unread)."""
        gone = [self._wb_store.pop(k, None) for k in keys]
        self._wb_freed(sum(nbytes(parts) for parts in gone if parts))
        return sum(g is not None for g in gone)

    def wb_failures(self) -> dict:
        """Hand over (and forget) the requests this worker failed: ``{request id: (kind, detail)}``."""
        failed, self._wb_failed = self._wb_failed, {}
        return failed

    def _wb_fail(self, rid: str, kind: str, detail: str) -> None:
        if rid in self._wb_failed:
            return
        self._wb_failed[rid] = (kind, detail)
        self._wb_counts["failed"] += 1
        if self._wb_faults is not None and self._wb_rank() == 0:
            self._wb_faults[0] += 1  # the kernel polls this word after every step

    def wb_stats(self, trim: bool = False) -> dict:
        """Capture memory held in this worker; ``trim`` returns free heap memory to the OS first."""
        if trim:
            self._wb_unfreed = 0
            trim_heap()
        held = sum(nbytes(parts) for parts in self._wb_store.values())
        try:
            import psutil

            rss = psutil.Process().memory_info().rss
        except Exception:  # pragma: no cover - psutil comes with vLLM
            rss = None
        return {"capture_keys": len(self._wb_store), "capture_bytes": held, "rank": self._wb_rank(), "rss": rss,
                **self._wb_counts}

    # ------------------------------------------------------------------ per step (called by the runner wrapper)
    def _wb_before(self, runner, scheduler_output, num_scheduled: np.ndarray) -> None:
        for rid in _compat.finished_ids(scheduler_output):
            self._wb_next.pop(rid, None)
            self._wb_watch.pop(rid, None)
        req_ids, computed = _compat.scheduled(runner)
        num_reqs = len(req_ids)
        counts = np.asarray(num_scheduled[:num_reqs], dtype=np.int64)
        slots = np.zeros(num_reqs, dtype=np.int64)
        rids = []
        step = []
        watched = []
        conditional = []  # (offset, n, per-token slots) of conditional specs
        offset = 0
        for i, rid in enumerate(req_ids):
            extra, prompt_len = _compat.request_info(runner, rid)
            wb = extra.get(CONFIG_KEY)
            n = int(counts[i])
            start = int(computed[i])
            if start < self._wb_next.get(rid, 0):
                self._wb_counts["recomputed"] += 1  # preempted and scheduled again from an earlier position
            self._wb_next[rid] = start + n
            if start + n < prompt_len:
                self._wb_counts["chunked"] += 1  # a prompt prefilled in more than one step
            rids.append(wb.get("rid", rid) if wb else rid)
            if wb:
                slots[i] = int(wb.get("slot", 0))
                if wb.get("capture"):
                    step.append((wb["key"], tuple(wb["capture"]), offset, n, start, rids[-1]))
                if wb.get("watch"):
                    try:
                        w = self._wb_watch.get(rid) or self._wb_watch.setdefault(rid, self._wb_new_watch(wb["watch"]))
                    except Exception as exc:  # a malformed payload fails its request, not the engine
                        self._wb_fail(rids[-1], "error", f"monitoring failed: {type(exc).__name__}: {exc}")
                        w = None
                    steered = None
                    if w is not None and w.cond is not None:
                        # the decision for position p uses values of positions < p only: all computed in earlier steps
                        steered = [w.cond.steer_at(p) for p in range(start, start + n)]
                        conditional.append((offset, n, [int(slots[i]) if on else 0 for on in steered]))
                    if w is not None:
                        watched.append((w, offset, n, start, rids[-1], steered))
            offset += n
        total = offset
        if total > self._wb_slot.shape[0]:
            raise RuntimeError(f"workbench: {total} tokens in one step exceed the table size {self._wb_slot.shape[0]}")
        tok = np.repeat(slots, counts)
        for at, n, per_token in conditional:
            tok[at:at + n] = per_token
        self._wb_slot[:total].copy_(torch.from_numpy(tok))
        if self._wb_filled > total:  # padding rows of a larger previous batch: no steering
            self._wb_slot[total:self._wb_filled].zero_()
        self._wb_filled = total
        self._wb_step = step
        self._wb_watched = watched
        # only steered steps are checked for inf/NaN: unsteered serving pays nothing
        self._wb_check = (rids, counts) if tok.any() else None
        self._wb_counts["steps"] += 1
        if len(set(slots.tolist())) > 1:
            self._wb_counts["mixed_slot_steps"] += 1  # requests with different specs in one forward

    def _wb_after(self) -> None:
        """After a forward: fail the requests whose stream went inf/NaN, copy out the captured rows.

        Never raises: an exception here would end the engine core and every request with it, so a
        failed copy fails the requests it was for (and only those).
        """
        step, self._wb_step = self._wb_step, []
        check, self._wb_check = self._wb_check, None
        watched, self._wb_watched = self._wb_watched, []
        if watched:
            try:
                self._wb_measure(watched)
            except Exception as exc:
                for item in watched:
                    self._wb_fail(item[4], "error", f"monitoring failed: {type(exc).__name__}: {exc}")
        if check is not None:
            try:
                self._wb_check_finite(*check)
            except Exception as exc:  # the check itself failed: the steered requests of the step cannot be trusted
                for rid in check[0]:
                    self._wb_fail(rid, "error", f"checking the stream failed: {type(exc).__name__}: {exc}")
        try:
            self._wb_copy(step)
        except Exception as exc:
            for item in step:
                self._wb_store.pop(item[0], None)
                self._wb_fail(item[5], "error", f"capturing failed: {type(exc).__name__}: {exc}")

    def _wb_new_watch(self, payload: dict) -> "_Watch":
        """A request's watch state from its ``extra_args`` payload (probe tables shared by signature)."""
        from ...monitor import Condition, ConditionState, Probe, probe_tables

        cap = self._wb_layers[0].wb_cap
        sig = payload.get("sig")
        tables = self._wb_tables.get(sig) if sig else None
        if tables is None:
            probes = [Probe(**p) for p in payload.get("probes", ())]
            tables = {layer: tuple(t.to(cap.device) if isinstance(t, torch.Tensor) else t for t in table)
                      for layer, table in probe_tables(probes).items()}
            if sig:
                if len(self._wb_tables) >= 256:
                    self._wb_tables.pop(next(iter(self._wb_tables)))
                self._wb_tables[sig] = tables
        cond, cond_table = None, None
        if payload.get("cond"):
            c = Condition.from_dict(payload["cond"])
            cond = ConditionState(c, int(payload["prompt_len"]))
            [cond_table] = [tuple(t.to(cap.device) if isinstance(t, torch.Tensor) else t for t in table)
                            for table in probe_tables([c.probe]).values()]
        return _Watch(int(payload["row"]), tables, int(payload.get("count", 0)), cond, cond_table,
                      None if cond is None else c.probe.layer)

    def _wb_measure(self, watched: list) -> None:
        """Probe values of this step's watched positions to the board; feed conditions their probe's values.

        Requests with the same probes are measured together: one matmul per layer and probe set.
        """
        from ...monitor import probe_values

        write = self._wb_board is not None and self._wb_rank() == 0
        board = self._wb_board
        groups: dict = {}  # (layer, id(table)) -> (table, [items])
        for item in watched:
            for layer, table in item[0].tables.items():
                groups.setdefault((layer, id(table)), (table, []))[1].append(item)
        for (layer, _), (table, items) in groups.items():
            cap = self._wb_layers[layer].wb_cap
            if len(items) == 1:
                _, offset, n, _, _, _ = items[0]
                rows = cap[offset:offset + n]
            else:
                index = torch.cat([torch.arange(o, o + n) for _, o, n, _, _, _ in items]).to(cap.device)
                rows = cap.index_select(0, index)
            vals = probe_values(rows, table).to("cpu", torch.float32).numpy()
            if write:  # one scatter for the whole group: (board row, position) x probe columns
                r, p = _board_index(items)
                board[r[:, None], p[:, None], np.asarray(table[0])[None, :]] = vals
        conditional = [item for item in watched if item[0].cond is not None]
        for w, offset, n, start, _rid, _steered in conditional:
            cap = self._wb_layers[w.cond_layer].wb_cap
            w.cond.update(start, probe_values(cap[offset:offset + n], w.cond_table)[:, 0].to("cpu"))
        if write and conditional:
            r, p = _board_index(conditional)
            board[r, p, board.shape[2] - 1] = np.concatenate([np.asarray(item[5], dtype=np.float32) for item in conditional])

    def _wb_check_finite(self, rids: list, counts: np.ndarray) -> None:
        """Report the requests with an inf/NaN in the last layer's stream this step (the logits would be NaN)."""
        total = int(counts.sum())
        stream = self._wb_layers[-1].wb_cap[:total]
        bad = ~torch.isfinite(stream).all(dim=-1)
        if not bool(bad.any()):
            return
        for rid, rows in zip(rids, bad.cpu().split(counts.tolist())):
            if bool(rows.any()):
                self._wb_fail(rid, "nonfinite", "inf/NaN in the residual stream")
        self._wb_scrub()

    def _wb_scrub(self) -> None:
        """Zero every inf/NaN in the KV cache (a pass over it, only in steps where a request went non-finite).

        The failed request's blocks go back to the free list; the next request given one would read
        the stale NaN past its own length (the attention kernel scores the whole block, and NaN
        survives masking), and every later reply would be garbage: seen as all-zero token ids. Finite
        entries are left alone, so blocks shared with other requests are untouched. Repeated every
        step the request still runs (until the kernel's abort arrives), so nothing is left behind.
        """
        seen = set()
        stack = _compat.kv_caches(self.model_runner)
        while stack:
            kv = stack.pop()
            if isinstance(kv, (list, tuple)):
                stack.extend(kv)
            elif isinstance(kv, torch.Tensor) and id(kv) not in seen and kv.is_floating_point():
                seen.add(id(kv))
                kv.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        self._wb_counts["kv_scrubs"] += 1

    def _wb_copy(self, step: list) -> None:
        """Copy this step's rows of the captured requests out of the layers' buffers.

        One gather per layer for all captured requests of the step (a copy per request and layer
        made all-layer capture of a 32-request batch cost 60% more time); requests keep views.
        """
        by_layer: dict = {}
        for item in step:
            for layer in item[1]:
                by_layer.setdefault(layer, []).append(item)
        for layer, items in by_layer.items():
            index = torch.cat([torch.arange(offset, offset + n) for _, _, offset, n, _, _ in items])
            cap = self._wb_layers[layer].wb_cap
            rows = cap.index_select(0, index.to(cap.device)).to("cpu", torch.float32)
            at = 0
            for key, _, _, n, start, _ in items:
                self._wb_store.setdefault(key, {}).setdefault(layer, []).append((start, rows[at:at + n]))
                at += n


def _board_index(items) -> tuple:
    """Board row and position of every position of ``items`` (watched step items), as index arrays."""
    rows = np.concatenate([np.full(n, w.row) for w, _, n, _, _, _ in items])
    positions = np.concatenate([np.arange(start, start + n) for _, _, n, start, _, _ in items])
    return rows, positions


class _Watch:
    """What a worker keeps for one watched request."""

    __slots__ = ("row", "tables", "count", "cond", "cond_table", "cond_layer")

    def __init__(self, row, tables, count, cond, cond_table, cond_layer):
        self.row, self.tables, self.count = row, tables, count
        self.cond, self.cond_table, self.cond_layer = cond, cond_table, cond_layer
