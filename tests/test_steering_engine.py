"""Per-request and global steering on the engine, checked against plain-hook references."""

import asyncio

import pytest
import torch

import workbench as wb
from conftest import assert_close_rel, reference_hidden

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _vec(model, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.hidden_size, generator=g) * scale


def _op_cases(model):
    v, w = _vec(model, 1, 2.0), _vec(model, 2)
    return {
        "add": [wb.AddSpec(v, scale=1.5)],
        "projection_cap": [wb.ProjectionCapSpec(w, min=-0.5, max=0.5)],
        "ablation": [wb.AblationSpec(w, scale=0.0)],
        "amplify": [wb.AblationSpec(w, scale=3.0)],
        "list": [wb.AddSpec(v, 0.7), wb.ProjectionCapSpec(w, max=0.2), wb.AddSpec(w, -0.3), wb.AblationSpec(v, 0.5)],
    }


@pytest.mark.parametrize("case", ["add", "projection_cap", "ablation", "amplify", "list"])
async def test_steered_captures_match_hook_reference(tiny, case):
    model = tiny
    layer = 1
    spec = wb.SteeringSpec(layers={layer: wb.LayerSteeringSpec(operations=_op_cases(model)[case])})
    layers = [0, 1, 2, 3]
    _, [h] = await model.generate("Tell me about Tokyo", GREEDY, steering=spec, capture_layers=layers)
    _, [base] = await model.generate("Tell me about Tokyo", GREEDY, capture_layers=layers)
    hooked, _ = reference_hidden(model, h.token_ids, layers, steering=spec)
    for L in layers:
        assert_close_rel(h.hidden(L), hooked[L])
    assert torch.equal(h.hidden(0)[:h.prompt_len], base.hidden(0)[:h.prompt_len])    # before the steered layer
    n = min(h.hidden(1).shape[0], base.hidden(1).shape[0])
    assert not torch.allclose(h.hidden(1)[:n], base.hidden(1)[:n])                     # the steered layer moved


async def test_steering_on_default_model_matches_reference(default_model):
    model = default_model
    v = _vec(model, 3, 20.0)
    spec = wb.SteeringSpec(layers={6: [wb.AddSpec(v, 1.0), wb.ProjectionCapSpec(v, max=5.0)], 29: [wb.AblationSpec(v, 0.5)]})
    _, [h] = await model.generate("The weather today", GREEDY, steering=spec, capture_layers=[5, 6, 29])
    hooked, _ = reference_hidden(model, h.token_ids, [5, 6, 29], steering=spec)
    for L in (5, 6, 29):
        assert_close_rel(h.hidden(L), hooked[L])


async def test_per_request_specs_do_not_leak(tiny):
    v = _vec(tiny, 4, 3.0)
    spec = wb.SteeringSpec(layers={2: [wb.AddSpec(v)]})
    prompts = ["Hello there", "Pirates sail", "What is the capital"]
    solo_base = await tiny.generate(prompts, GREEDY)
    solo_steer = await tiny.generate(prompts, GREEDY, steering=spec)
    assert solo_base != solo_steer
    mixed = await asyncio.gather(
        tiny.generate(prompts, GREEDY), tiny.generate(prompts, GREEDY, steering=spec),
        tiny.generate(prompts, GREEDY, steering=[spec, None, wb.SteeringSpec()]),
    )
    assert mixed[0] == solo_base and mixed[1] == solo_steer
    assert mixed[2] == [solo_steer[0], solo_base[1], solo_base[2]]


async def test_global_api_and_explicit_spec_wins(tiny):
    v, w = _vec(tiny, 5, 3.0), _vec(tiny, 6)
    base = await tiny.generate("Hello there", GREEDY)
    try:
        await tiny.set_layer_vector(2, v, scale=1.0)
        await tiny.set_layer_projection_cap(2, w, min=-1.0, max=1.0)
        await tiny.set_layer_ablation(3, w, scale=0.2)
        spec = tiny.export_steering_spec()
        assert [type(o) for o in spec.layers[2].operations] == [wb.AddSpec, wb.ProjectionCapSpec]
        assert spec.layer_indices() == [2, 3]
        steered = await tiny.generate("Hello there", GREEDY)
        assert steered != base
        assert steered == await tiny.generate("Hello there", GREEDY, steering=spec)       # same as explicit
        assert base == await tiny.generate("Hello there", GREEDY, steering=wb.SteeringSpec())  # empty = exactly none
        await tiny.clear_layer_projection_cap(2)
        await tiny.clear_layer_ablation(3)
        assert tiny.export_steering_spec().layer_indices() == [2]
        await tiny.clear_layer_vector(2)
        assert tiny.export_steering_spec().is_empty()
        assert await tiny.generate("Hello there", GREEDY) == base
    finally:
        await tiny.clear_all_vectors()


async def test_stack_and_context_manager(tiny):
    v = _vec(tiny, 7, 3.0)
    spec = wb.SteeringSpec(layers={1: [wb.AddSpec(v)]})
    base = await tiny.generate("Hello", GREEDY)
    steered = await tiny.generate("Hello", GREEDY, steering=spec)
    async with tiny.steering(spec):
        assert await tiny.generate("Hello", GREEDY) == steered
        async with tiny.steering(wb.SteeringSpec()):
            assert await tiny.generate("Hello", GREEDY) == base
        assert await tiny.generate("Hello", GREEDY) == steered
    assert await tiny.generate("Hello", GREEDY) == base
    await tiny.push_steering_spec(spec)
    assert await tiny.generate("Hello", GREEDY) == steered
    popped = await tiny.pop_steering_spec()
    assert popped.fingerprint() == spec.fingerprint()
    assert tiny.export_steering_spec().is_empty()
    with pytest.raises(wb.SteeringStackEmptyError, match="stack is empty"):
        await tiny.pop_steering_spec()


async def test_global_update_waits_for_in_flight_generation(tiny):
    long = wb.SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
    baseline = await tiny.generate("Tell me a long story", long)
    order = []
    started = asyncio.Event()

    async def generation():
        chunks = []
        async for c in tiny.stream_chat([{"role": "user", "content": "Tell me a long story"}], long):
            chunks.append(c.text)
            started.set()
        order.append("generation done")
        return "".join(chunks)

    async def update():
        await started.wait()
        await tiny.set_layer_vector(1, _vec(tiny, 8, 5.0))
        order.append("update done")

    ref_chat = await tiny.chat([{"role": "user", "content": "Tell me a long story"}], long)
    try:
        streamed, _ = await asyncio.gather(generation(), update())
        assert order == ["generation done", "update done"]
        assert streamed == ref_chat[0].generated               # unaffected by the update
        assert await tiny.generate("Tell me a long story", long) != baseline   # and the update did land
    finally:
        await tiny.clear_all_vectors()


async def test_spec_file_round_trip_gives_same_output(tiny, tmp_path):
    spec = wb.SteeringSpec(layers={1: [wb.AddSpec(_vec(tiny, 9, 2.0), 1.0)], 2: [wb.AblationSpec(_vec(tiny, 10), 0.0)]})
    path = spec.save(tmp_path / "spec.safetensors")
    assert await tiny.generate("Hello", GREEDY, steering=wb.SteeringSpec.load(path)) == \
        await tiny.generate("Hello", GREEDY, steering=spec)


async def test_zero_spec_is_bit_identical(tiny):
    zero = wb.SteeringSpec(layers={L: [wb.AddSpec(torch.zeros(tiny.hidden_size))] for L in range(tiny.layer_count)})
    _, [a] = await tiny.generate("Hello there", GREEDY, capture_layers=[0, 3])
    _, [b] = await tiny.generate("Hello there", GREEDY, steering=zero, capture_layers=[0, 3])
    assert torch.equal(a.hidden(3), b.hidden(3)) and a.generated_token_ids == b.generated_token_ids
