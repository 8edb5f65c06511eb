"""Concurrent requests share forward passes and give the same tokens as each run alone."""

import asyncio
import time

import pytest
import torch

import workbench as wb


def _spec(model, seed, scale):
    if seed is None:
        return wb.SteeringSpec()
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.hidden_size, generator=g)
    return wb.SteeringSpec(layers={seed % model.layer_count: [wb.AddSpec(v, scale)],
                                   (seed + 1) % model.layer_count: [wb.AblationSpec(v, 0.5)]})


PROMPTS = ["Hello there", "Tell me about Tokyo", "Pirates sail", "What is the capital of France?",
           "Write a haiku", "Numbers: 1 2 3", "You are a helpful", "The quick brown fox"]


@pytest.mark.parametrize("mode", ["greedy", "seeded"])
async def test_eight_concurrent_requests_equal_solo(tiny, mode):
    model = tiny
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        params = wb.SamplingParams(temperature=0.0 if mode == "greedy" else 0.9, top_p=0.95, top_k=50 if i % 2 else 0,
                                   seed=100 + i, max_tokens=12 + i, ignore_eos=True)
        jobs.append((prompt, params, _spec(model, None if i == 0 else i, 2.0 + i)))
    solo = [(await model.generate(p, s, steering=spec))[0] for p, s, spec in jobs]
    before = dict(model.stats)
    together = await asyncio.gather(*(model.generate(p, s, steering=spec) for p, s, spec in jobs))
    assert [t[0] for t in together] == solo
    decode_passes = model.stats["decode_passes"] - before["decode_passes"]
    tokens = model.stats["tokens"] - before["tokens"]
    assert tokens == sum(s.max_tokens for _, s, _ in jobs)
    assert decode_passes < tokens / 4, "requests were not batched into shared forward passes"
    assert model.stats["max_batch"] >= 8


async def test_same_seed_same_tokens_different_seed_differs(tiny):
    def p(seed):
        return wb.SamplingParams(temperature=1.0, seed=seed, max_tokens=20, ignore_eos=True)
    a = await tiny.generate(["Hello"] * 3, p(1))
    b = await tiny.generate("Hello", p(1))
    c = await tiny.generate("Hello", p(2))
    assert a == [b[0]] * 3 and b != c


async def test_two_streams_advance_together(tiny):
    params = wb.SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    log = []

    async def consume(name, spec):
        async for _chunk in tiny.stream_chat([{"role": "user", "content": "Tell me a story"}], params, steering=spec):
            log.append(name)

    before = tiny.stats["decode_passes"]
    await asyncio.gather(consume("base", None), consume("steer", _spec(tiny, 3, 4.0)))
    first_done = min(len(log) - 1 - log[::-1].index(n) for n in ("base", "steer"))
    # both streams were still receiving tokens while the other one was: interleaved, not one after the other
    assert {"base", "steer"} <= set(log[: first_done + 1])
    assert log.count("base") >= 30 and log.count("steer") >= 30
    assert tiny.stats["decode_passes"] - before < 45


async def _wait_idle(model, timeout=10.0):
    t0 = time.monotonic()
    while model.active_requests and time.monotonic() - t0 < timeout:
        await asyncio.sleep(0.02)
    return model.active_requests


async def test_breaking_out_of_a_stream_frees_the_request(tiny):
    params = wb.SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    before = tiny.stats["tokens"]
    agen = tiny.stream_chat([{"role": "user", "content": "Tell me a story"}], params)
    async for i, _ in _enumerate(agen):
        if i == 3:
            break
    await agen.aclose()
    assert await _wait_idle(tiny) == 0
    assert tiny.stats["tokens"] - before < 100          # it stopped long before max_tokens
    assert await tiny.generate("Hello", wb.SamplingParams(temperature=0, max_tokens=3))  # still serving


async def test_cancelling_a_task_frees_the_request(tiny):
    params = wb.SamplingParams(temperature=0.0, max_tokens=250, ignore_eos=True)
    task = asyncio.create_task(tiny.generate(["Tell me a story"] * 2, params))
    while tiny.active_requests == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _wait_idle(tiny) == 0
    assert tiny._rw.readers == 0


async def _enumerate(agen):
    i = 0
    async for x in agen:
        yield i, x
        i += 1


async def test_stream_text_equals_chat_text(tiny):
    conv = [{"role": "user", "content": "Café 東京 story"}]
    params = wb.SamplingParams(temperature=0.0, max_tokens=25, stop=["zz"], ignore_eos=True)
    chunks = [c async for c in tiny.stream_chat(conv, params)]
    [reply] = await tiny.chat(conv, params)
    assert "".join(c.text for c in chunks) == reply.generated
    assert chunks[-1].finish_reason == reply.finish_reason
    assert sum(len(c.token_ids) for c in chunks) == len(reply.token_ids)
