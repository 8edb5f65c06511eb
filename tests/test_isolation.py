"""A request that raises inside the engine fails alone; its batch neighbours finish exactly as if alone.

Faults are injected where they would really happen: a steering strength that overflows float32
(no injection at all), a sampler that raises for one request, and a forward pass that raises for
one row (a pre-hook on the embedding that trips on one token, as model code failing on an input
would), in a prefill pass and in a decode pass shared with other rows. The hf backend on the tiny
model here; both backends on the default model in tests/test_vllm.py.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import workbench as wb
from workbench.engine import hf as hf_engine

from conftest import assert_close_rel

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CHATS = [[{"role": "user", "content": text}] for text in
         ("Tell me about Tokyo", "Pirates sail the sea", "Numbers: 1 2 3", "Write a haiku")]


def overflow_spec(model) -> wb.SteeringSpec:
    """Finite inputs (every check passes) whose product overflows float32: 4 x 1e38 per entry is inf.

    (A merely huge stream is not enough: RMSNorm turns a finite 1e37 stream into zeros, so the
    model goes on with finite nonsense that no check could call wrong.)
    """
    v = torch.full((model.hidden_size,), 4.0)
    return wb.SteeringSpec(layers={0: [wb.AddSpec(v, scale=1e38)]})


async def model_chat(model, chat, params, steering, capture):
    [r] = await model.chat([chat], params, steering=steering)
    return r


async def idle(model) -> int:
    """Requests still held by the engine once it had a moment to drop finished ones."""
    for _ in range(100):
        if model.active_requests == 0:
            break
        await asyncio.sleep(0.05)
    return model.active_requests


async def run_all(model, jobs):
    """Start every job at once (so they share passes); exceptions are returned, not raised."""
    async def one(chat, params, steering, capture):
        if capture:
            [r], [h] = await model.chat([chat], params, steering=steering, capture_layers=capture)
            return r, h
        [r] = await model.chat([chat], params, steering=steering)
        return r
    return await asyncio.gather(*(one(*job) for job in jobs), return_exceptions=True)


@pytest.mark.parametrize("params", [GREEDY, wb.SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)],
                         ids=["greedy", "sampled"])
async def test_a_steering_strength_that_overflows_fails_alone_with_a_clear_error(tiny, params):
    jobs = [(chat, GREEDY, None, None) for chat in CHATS[:3]]
    solo = [await model_chat(tiny, *job) for job in jobs]
    got = await run_all(tiny, jobs[:1] + [(CHATS[3], params, overflow_spec(tiny), None)] + jobs[1:])
    err = got.pop(1)
    assert isinstance(err, wb.NonFiniteActivationError), err
    assert isinstance(err, wb.ValidationError) and "inf/NaN" in str(err)
    assert [r.token_ids for r in got] == [r.token_ids for r in solo]
    assert await idle(tiny) == 0
    assert (await model_chat(tiny, *jobs[0])).token_ids == solo[0].token_ids  # the engine goes on


async def test_a_sampler_that_raises_fails_only_its_request(tiny, monkeypatch):
    sampled = [wb.SamplingParams(temperature=0.9, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 2, 3)]
    jobs = [(chat, p, None, None) for chat, p in zip(CHATS, sampled)]
    solo = [await model_chat(tiny, *job) for job in jobs]
    real = hf_engine.sample_token

    def flaky(logits, params, generator, seen, **kwargs):
        if params.seed == 666 and len(seen) > 12:  # a few tokens in: the request is mid-decode with the others
            raise RuntimeError("sampler fault")
        return real(logits, params, generator, seen, **kwargs)

    monkeypatch.setattr(hf_engine, "sample_token", flaky)
    bad = wb.SamplingParams(temperature=0.9, seed=666, max_tokens=12, ignore_eos=True)
    got = await run_all(tiny, jobs[:2] + [(CHATS[3], bad, None, None)] + jobs[2:])
    err = got.pop(2)
    assert isinstance(err, wb.RequestFailedError) and "sampler fault" in str(err)
    assert [r.token_ids for r in got] == [r.token_ids for r in solo]


class TripWire:
    """Model code that raises in decoder layer 2 when a token is in the pass's input (prefill or decode).

    Mid-model on purpose: by then layers 0-1 have appended KV and captured rows for this pass,
    which the engine must roll back for the rows that go on.
    """

    def __init__(self, model, token: int, phase: str):
        self.token, self.phase, self.batches, self.armed = token, phase, [], False
        self.handles = [model.hf_model.get_input_embeddings().register_forward_pre_hook(self.look),
                        model.hf_model.model.layers[2].register_forward_hook(self.trip)]

    def look(self, module, args):
        ids = args[0]
        self.armed = (self.phase == "decode") == (ids.shape[1] == 1) and bool((ids == self.token).any())
        if self.armed:
            self.batches.append(ids.shape[0])

    def trip(self, module, args, output):
        if self.armed:
            raise RuntimeError(f"model fault on token {self.token}")

    def remove(self):
        for h in self.handles:
            h.remove()


async def test_a_prefill_that_raises_for_one_prompt_fails_only_that_request(tiny):
    capture = [0, 2]
    jobs = [(chat, GREEDY, None, capture if i == 1 else None) for i, chat in enumerate(CHATS[:3])]
    solo = [(await run_all(tiny, [job]))[0] for job in jobs]
    victim = [{"role": "user", "content": "zebra xylophone quiz"}]
    rendered = lambda chat: tiny.tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]  # noqa: E731
    seen = {t for chat in CHATS[:3] for t in rendered(chat)}
    token = next(t for t in rendered(victim) if t not in seen)  # only the victim's prompt holds it
    wire = TripWire(tiny, token, "prefill")
    try:
        got = await run_all(tiny, [jobs[0], (victim, GREEDY, None, None), *jobs[1:]])
    finally:
        wire.remove()
    err = got.pop(1)
    assert isinstance(err, wb.RequestFailedError) and "model fault" in str(err)
    assert max(wire.batches) > 1, "the fault never hit a pass shared with other requests"
    assert got[0].token_ids == solo[0].token_ids and got[2].token_ids == solo[2].token_ids
    (r, h), (r0, h0) = got[1], solo[1]
    assert r.token_ids == r0.token_ids
    for layer in capture:
        assert_close_rel(h.hidden(layer), h0.hidden(layer))  # batch shape changes the last bits


async def test_a_decode_step_that_raises_for_one_row_fails_only_that_request(tiny):
    capture = [1, 3]
    victim_chat = [{"role": "user", "content": "Sing a song"}]
    jobs = [(chat, GREEDY, None, capture if i == 0 else None) for i, chat in enumerate(CHATS[:3])]
    solo = [(await run_all(tiny, [job]))[0] for job in jobs]
    [victim] = await tiny.chat([victim_chat], GREEDY)
    others = {t for r in solo for t in (r[0] if isinstance(r, tuple) else r).token_ids}
    # a token the victim generates a few steps in and no other request ever feeds
    token = next(t for t in victim.token_ids[3:-1] if t not in others and t not in victim.token_ids[:3])
    wire = TripWire(tiny, token, "decode")
    try:
        got = await run_all(tiny, [jobs[0], (victim_chat, GREEDY, None, None), *jobs[1:]])
    finally:
        wire.remove()
    err = got.pop(1)
    assert isinstance(err, wb.RequestFailedError) and "model fault" in str(err)
    assert max(wire.batches) > 1, "the fault never hit a pass shared with other requests"
    (r, h), (r0, h0) = got[0], solo[0]
    assert r.token_ids == r0.token_ids
    for layer in capture:  # the failed pass's partial capture chunks were rolled back
        assert_close_rel(h.hidden(layer), h0.hidden(layer))  # batch shape changes the last bits
    assert [g.token_ids for g in got[1:]] == [s.token_ids for s in solo[1:]]
    assert await idle(tiny) == 0


async def test_a_fault_every_row_hits_fails_the_batch_and_the_engine_goes_on(tiny):
    """A failure no single row reproduces alone is the batch's: all its requests fail, the next one works."""
    [ref] = await tiny.chat([CHATS[0]], GREEDY)
    calls = {"n": 0}

    def always(module, args):
        calls["n"] += 1
        if args[0].shape[1] == 1:
            raise RuntimeError("device fault")

    handle = tiny.hf_model.get_input_embeddings().register_forward_pre_hook(always)
    try:
        got = await run_all(tiny, [(chat, GREEDY, None, None) for chat in CHATS[:2]])
    finally:
        handle.remove()
    assert all(isinstance(g, wb.RequestFailedError) or isinstance(g, wb.EngineError) for g in got)
    [again] = await tiny.chat([CHATS[0]], GREEDY)
    assert again.token_ids == ref.token_ids


async def test_a_request_whose_join_fails_fails_alone_and_the_running_batch_goes_on(tiny, monkeypatch):
    """Joining the running batch is all or nothing: a fault while merging fails only the joining request."""
    long = wb.SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    [solo] = await tiny.chat([CHATS[0]], long)
    [solo_joiner] = await tiny.chat([CHATS[1]], GREEDY)
    real, state = hf_engine._lpad, {"armed": True}

    def faulty(t, width, dim=2):
        if dim == 1 and state["armed"]:  # the attention-mask padding: after the KV cache was merged
            state["armed"] = False
            raise RuntimeError("merge fault")
        return real(t, width, dim)

    monkeypatch.setattr(hf_engine, "_lpad", faulty)
    running = asyncio.create_task(tiny.chat([CHATS[0]], long))

    def decoding():  # finished rows stay in the batch until the next pass: look for a live one
        return [r for r in tiny.engine._rows if r.finish_reason is None and 3 < len(r.out_ids) < 30]

    for _ in range(500):
        if decoding():
            break
        await asyncio.sleep(0.005)
    assert decoding(), "the first request was not decoding"
    with pytest.raises(wb.RequestFailedError, match="merge fault"):
        await tiny.chat([CHATS[1]], GREEDY)
    assert not state["armed"], "the fault never hit a merge"
    [r] = await running
    assert r.token_ids == solo.token_ids
    [again] = await tiny.chat([CHATS[1]], GREEDY)
    assert again.token_ids == solo_joiner.token_ids
    assert await idle(tiny) == 0
