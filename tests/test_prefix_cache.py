"""The HF backend's prefix cache: reuse across turns, never across steering specs, same tokens."""

import pytest
import torch

import workbench as wb
from workbench.engine.prefix_cache import PrefixCache

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def uncached(tiny_dir):
    model = wb.load(str(tiny_dir), prefix_cache_mb=0)
    yield model
    model.close()


def _kv(n, layers=2):
    return [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)) for _ in range(layers)]


def test_lookup_store_and_eviction():
    cache = PrefixCache(max_bytes=2 * 2 * (2 * 2 * 10 * 4 * 4))   # room for two 10-token entries
    cache.store("a", list(range(10)), _kv(10))
    n, kv = cache.lookup("a", list(range(10)) + [99])
    assert n == 10 and kv[0][0].shape == (1, 2, 10, 4)
    assert cache.lookup("a", list(range(10)))[0] == 9            # at least one token is left to run
    assert cache.lookup("b", list(range(10)) + [99]) == (0, None)  # another spec never hits
    assert cache.lookup("a", [0, 1, 2, 77, 78]) == (0, None)       # below min_hit
    cache.store("a", list(range(5)), _kv(5))                     # covered by the longer entry: not stored
    assert len(cache) == 1
    cache.store("b", [5] * 10, _kv(10))
    cache.store("c", [6] * 10, _kv(10))                          # evicts the least recently used
    assert len(cache) == 2 and cache.lookup("a", list(range(11)))[0] == 0
    assert cache.nbytes <= cache.max_bytes


async def test_second_turn_reuses_the_first(tiny, uncached):
    conv = [{"role": "user", "content": "Tell me about Tokyo"}]
    [first] = await tiny.chat(conv, GREEDY)
    conv2 = conv + [first.to_message(), {"role": "user", "content": "And Paris?"}]
    before = tiny.stats["prefix_hit_tokens"]
    [second] = await tiny.chat(conv2, GREEDY)
    hit = tiny.stats["prefix_hit_tokens"] - before
    _, [h] = await uncached.chat(conv, GREEDY, capture_layers=[0])
    assert hit >= h.prompt_len                         # at least the whole first prompt came from the cache
    assert second.token_ids == (await uncached.chat(conv2, GREEDY))[0].token_ids


async def test_steered_prefix_is_never_reused_by_another_spec(tiny, uncached):
    v = torch.randn(tiny.hidden_size, generator=torch.Generator().manual_seed(3)) * 3
    spec = wb.SteeringSpec(layers={1: [wb.AddSpec(v)]})
    prompt = "Pirates sail the seven seas looking for treasure"
    tiny.prefix_cache.clear()  # unsteered entries of earlier tests ("Pirates sail") would be fair hits
    await tiny.generate(prompt, GREEDY, steering=spec)
    before = tiny.stats["prefix_hit_tokens"]
    plain = await tiny.generate(prompt + " today", GREEDY)
    assert tiny.stats["prefix_hit_tokens"] == before
    assert plain == await uncached.generate(prompt + " today", GREEDY)
    steered = await tiny.generate(prompt + " today", GREEDY, steering=spec)
    assert tiny.stats["prefix_hit_tokens"] > before
    assert steered == await uncached.generate(prompt + " today", GREEDY, steering=spec)


async def test_mixed_batch_of_hits_and_misses_equals_uncached(tiny, uncached):
    import asyncio

    prompts = ["Hello there, how are you today?", "Write a haiku about programming.", "The quick brown fox"]
    await tiny.generate(prompts[0], GREEDY)
    longer = [p + " Please answer." for p in prompts] + ["What is the capital of France?"]
    got = await asyncio.gather(*(tiny.generate(p, GREEDY) for p in longer))
    want = await asyncio.gather(*(uncached.generate(p, GREEDY) for p in longer))
    assert got == want


async def test_captured_requests_hold_every_prompt_position(tiny):
    prompt = "You are a helpful assistant. Hello there"
    await tiny.generate(prompt, GREEDY)
    _, [h] = await tiny.generate(prompt + " again", GREEDY, capture_layers=[2])
    assert h.hidden(2).shape[0] == h.prompt_len + 9
