"""Monitoring (live projections) and conditional steering, checked against plain-hook references."""

from __future__ import annotations

import asyncio

import pytest
import torch

import workbench as wb
from workbench.monitor import Condition, ConditionState, Probe, Projections

GREEDY = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
CHAT = [{"role": "user", "content": "Tell me about the sea and ships."}]
OTHER = [{"role": "user", "content": "What is two plus two?"}]


def _crossed(cond, v):
    return v > cond.threshold if cond.above else v < cond.threshold


def reference_run(model, prompt_ids, spec, n_tokens, probes=()):
    """Greedy generation by full forwards of a plain HF model with hooks written here from the semantics.

    Position ``p`` is steered by ``spec``'s ops iff ``steer[p]``; the condition decides ``steer`` for a
    new position from the probe values of the positions before it (``workbench.monitor``'s rules,
    restated independently). Returns (generated ids, steer flags of all fed positions, probe values).
    """
    hf = model.hf_model
    blocks = hf.model.layers
    cond = spec.condition
    P = len(prompt_ids)
    ids = list(prompt_ids)
    steer = [cond is None and not spec.is_empty()] * P
    seen = {}

    def make(layer):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            if layer in spec.layers:
                mask = torch.tensor(steer, dtype=h.dtype)[None, :, None]
                g = h
                for op in spec.layers[layer].operations:
                    v = op.vector.to(h.dtype)
                    if isinstance(op, wb.AddSpec):
                        g = g + op.scale * v
                    else:
                        u = v / v.norm()
                        p = g @ u
                        g = g + (p.clamp(min=op.min, max=op.max) - p)[..., None] * u
                h = mask * g + (1 - mask) * h
            seen[layer] = h[0].detach().clone()
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    handles = [blocks[L].register_forward_hook(make(L)) for L in range(len(blocks))]
    out_ids = []
    try:
        for _ in range(n_tokens):
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out_ids.append(token)
            if cond is None:
                steer.append(not spec.is_empty())
            else:
                u = cond.probe.vector
                h = seen[cond.probe.layer].float()
                v = ((h @ u - cond.probe.bias) / cond.probe.span).tolist()
                p = len(ids)  # the new token's position
                if cond.mode == "prompt":
                    on = _crossed(cond, sum(v[:P]) / P)
                elif cond.latch:
                    on = any(_crossed(cond, v[q]) for q in range(P - 1, p))
                else:
                    on = _crossed(cond, v[p - 1])
                steer.append(on)
            ids.append(token)
        values = {pr.name: ((seen[pr.layer].float() @ pr.vector - pr.bias) / pr.span)[:len(ids) - 1] for pr in probes}
    finally:
        for h in handles:
            h.remove()
    return out_ids, steer[:len(ids) - 1], values


def _spec_and_probe(model, layer_steer, layer_probe, seed=0, strength=8.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(model.hidden_size, generator=g)
    u = torch.randn(model.hidden_size, generator=g)
    spec = wb.SteeringSpec({layer_steer: [wb.AddSpec(v / v.norm() * strength)]})
    return spec, Probe("probe", layer_probe, u)


# ------------------------------------------------------------------------------------ logic
def test_condition_state_follows_the_documented_rules():
    probe = Probe("p", 0, torch.ones(4))
    P = 3
    s = ConditionState(Condition(probe, 0.5, mode="token"), P)
    s.update(0, torch.tensor([0.0, 0.0, 1.0]))        # prompt; last prompt position crosses
    assert not s.steer_at(2) and s.steer_at(3)          # prompt never steered; p = P decided by p-1
    s.update(3, torch.tensor([0.0]))
    assert not s.steer_at(4)                            # "while": off again
    latch = ConditionState(Condition(probe, 0.5, mode="token", latch=True), P)
    latch.update(0, torch.tensor([0.0, 0.0, 1.0]))
    latch.update(3, torch.tensor([0.0]))
    assert latch.steer_at(4) and latch.steer_at(10)     # once on, on
    prompt = ConditionState(Condition(probe, 0.5, mode="prompt"), P)
    prompt.update(0, torch.tensor([0.0, 1.0]))          # a chunk: not all of the prompt yet
    assert not prompt.steer_at(3)
    prompt.update(2, torch.tensor([1.0]))               # mean 2/3 > 0.5
    assert prompt.steer_at(3) and prompt.steer_at(7) and not prompt.steer_at(2)
    below = ConditionState(Condition(probe, 0.5, mode="prompt", above=False), P)
    below.update(0, torch.tensor([0.0, 1.0, 1.0]))
    assert not below.steer_at(3)


def test_conditions_round_trip_and_key_the_spec(tmp_path):
    probe = Probe("p", 1, torch.randn(8))
    spec = wb.SteeringSpec({1: [wb.AddSpec(torch.ones(8))]}, condition=Condition(probe, 0.25, mode="token", latch=True))
    plain = wb.SteeringSpec({1: [wb.AddSpec(torch.ones(8))]})
    assert spec.fingerprint() != plain.fingerprint()
    back = wb.SteeringSpec.from_dict(spec.to_dict())
    assert back.fingerprint() == spec.fingerprint() and back.condition == spec.condition
    loaded = wb.SteeringSpec.load(spec.save(tmp_path / "c.safetensors"))
    assert loaded.fingerprint() == spec.fingerprint() and loaded.condition.latch
    with pytest.raises(wb.ValidationError):
        Condition(probe, 0.1, mode="sometimes")
    with pytest.raises(wb.LayerOutOfRangeError):
        wb.SteeringSpec({1: [wb.AddSpec(torch.ones(8))]}, condition=Condition(Probe("p", 9, torch.ones(8)), 0.0)
                        ).validate(8, 4)


# ------------------------------------------------------------------------------------ hf engine vs reference
def _prompt_ids(model, messages):
    from workbench.chat import check_chat_options, render_chat

    return render_chat(model.tokenizer, messages, check_chat_options(None)).token_ids


@pytest.mark.parametrize("mode,latch", [("prompt", False), ("token", False), ("token", True)])
def test_conditional_steering_matches_a_plain_hook_reference(default_model, mode, latch):
    model = default_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=25.0)
    ids = _prompt_ids(model, CHAT)
    # a threshold inside the unsteered values, so the condition holds for some positions and not others
    _, _, values = reference_run(model, ids, wb.SteeringSpec(), 12, [probe])
    vals = values["probe"]
    threshold = float(vals[:len(ids)].mean()) - 1e-3 if mode == "prompt" else float(vals[len(ids) - 1:].median())
    cond_spec = wb.SteeringSpec(spec.layers, condition=Condition(probe, threshold, mode=mode, latch=latch))
    want_ids, want_steer, _ = reference_run(model, ids, cond_spec, 12)
    [reply] = asyncio.run(model.chat(CHAT, steering=cond_spec, **GREEDY))
    assert reply.token_ids == want_ids
    assert reply.projections.steered == want_steer
    assert any(want_steer) and not all(want_steer[len(ids):]) or mode == "prompt"


def test_prompt_condition_steers_one_conversation_and_not_the_other_in_one_batch(default_model):
    model = default_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=25.0)
    a, b = _prompt_ids(model, CHAT), _prompt_ids(model, OTHER)
    ma = float(reference_run(model, a, wb.SteeringSpec(), 1, [probe])[2]["probe"][:len(a)].mean())
    mb = float(reference_run(model, b, wb.SteeringSpec(), 1, [probe])[2]["probe"][:len(b)].mean())
    cond = Condition(probe, (ma + mb) / 2, mode="prompt", above=ma > mb)   # CHAT crosses, OTHER does not
    cond_spec = wb.SteeringSpec(spec.layers, condition=cond)
    replies = asyncio.run(model.chat([CHAT, OTHER], steering=cond_spec, **GREEDY))
    plain = asyncio.run(model.chat([CHAT, OTHER], steering=spec, **GREEDY))
    base = asyncio.run(model.chat([CHAT, OTHER], **GREEDY))
    assert replies[0].token_ids == reference_run(model, a, cond_spec, 12)[0]
    assert replies[1].token_ids == base[1].token_ids          # not crossed: unsteered
    assert replies[0].token_ids[0] == base[0].token_ids[0]    # the first token is never steered
    assert replies[0].token_ids != base[0].token_ids and plain[0].token_ids != base[0].token_ids
    assert all(replies[0].projections.steered[len(a):]) and not any(replies[1].projections.steered)


def test_monitored_values_are_the_probes_on_the_models_own_stream(default_model):
    model = default_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=10.0)
    probe2 = Probe("later", 12, torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(5)),
                   bias=0.3, span=2.0)
    ids = _prompt_ids(model, CHAT)
    [reply] = asyncio.run(model.chat(CHAT, steering=spec, monitor=[probe, probe2], **GREEDY))
    want_ids, _, want = reference_run(model, ids, spec, 12, [probe, probe2])
    assert reply.token_ids == want_ids
    pr = reply.projections
    assert isinstance(pr, Projections) and pr.names == ["probe", "later"] and pr.layers == [6, 12]
    assert len(pr) == len(ids) + 12 - 1 and pr.prompt_len == len(ids)
    for name in pr.names:
        torch.testing.assert_close(pr[name], want[name], rtol=1e-4, atol=1e-3)
    table = pr.table()
    assert len(table) == 2 * len(pr) and set(table["role"]) == {"user", "assistant"} | set(table["role"])
    assert pr.per_message().shape[1] == 2


def test_a_feature_monitors_as_its_inspect_activation(default_model):
    model = default_model
    asyncio.run(model.load_features())
    feature = model.features.search("pirate")[0]
    [reply] = asyncio.run(model.chat(CHAT, monitor=[feature], **GREEDY))
    pr = reply.projections
    ids = pr.token_ids
    [acts] = asyncio.run(model.encode([ids], layers=[feature.layer]))
    from workbench.features import FeatureSet

    one = FeatureSet([feature])
    want = one.activations_from_hidden(acts)[:, 0]
    torch.testing.assert_close(pr[feature.id], want, rtol=1e-4, atol=1e-3)


def test_streamed_projections_add_up_to_the_replys(default_model):
    model = default_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=25.0)
    ids = _prompt_ids(model, CHAT)
    cond = Condition(probe, 0.0, mode="token")
    cond_spec = wb.SteeringSpec(spec.layers, condition=cond)

    async def run():
        chunks = [c async for c in model.stream_chat(CHAT, steering=cond_spec, monitor=[probe], **GREEDY)]
        [reply] = await model.chat(CHAT, steering=cond_spec, monitor=[probe], **GREEDY)
        return chunks, reply

    chunks, reply = asyncio.run(run())
    assert chunks[0].monitor_header["names"] == ["probe"] and chunks[0].monitor_header["prompt_len"] == len(ids)
    deltas = [c.projections for c in chunks if c.projections is not None]
    assert deltas[0].start == 0 and deltas[0].values.shape == (len(ids), 1)
    at = 0
    for d in deltas:
        assert d.start == at
        at += d.values.shape[0]
    values = torch.cat([d.values for d in deltas])[:, 0]
    torch.testing.assert_close(values, reply.projections["probe"])
    assert [s for d in deltas for s in d.steered] == reply.projections.steered


def test_monitor_input_errors(tiny):
    with pytest.raises(wb.VectorError):
        asyncio.run(tiny.chat(CHAT, monitor=[Probe("p", 1, torch.ones(3))], max_tokens=2))
    with pytest.raises(wb.LayerOutOfRangeError):
        asyncio.run(tiny.chat(CHAT, monitor=[Probe("p", 99, torch.ones(tiny.hidden_size))], max_tokens=2))
    with pytest.raises(wb.ValidationError):
        asyncio.run(tiny.chat(CHAT, monitor=[Probe("p", 1, torch.ones(tiny.hidden_size)),
                                             Probe("p", 2, torch.ones(tiny.hidden_size))], max_tokens=2))


# ------------------------------------------------------------------------------------ vllm engine
def _gap_threshold(values):
    """A threshold in the widest gap between the middle values: no value sits near it on either backend."""
    v = sorted(float(x) for x in values)
    lo, hi = len(v) // 4, max(len(v) // 4 + 1, 3 * len(v) // 4)
    gaps = [(v[i + 1] - v[i], i) for i in range(lo, min(hi, len(v) - 1))]
    _, i = max(gaps)
    return (v[i] + v[i + 1]) / 2


@pytest.mark.parametrize("mode,latch", [("prompt", False), ("token", False), ("token", True)])
def test_vllm_conditional_steering_matches_the_hf_reference(vllm_model, default_model, mode, latch):
    spec, probe = _spec_and_probe(default_model, 9, 6, strength=25.0)
    ids = _prompt_ids(default_model, CHAT)
    _, _, values = reference_run(default_model, ids, wb.SteeringSpec(), 12, [probe])
    vals = values["probe"]
    threshold = float(vals[:len(ids)].mean()) - 0.05 if mode == "prompt" else _gap_threshold(vals[len(ids) - 1:])
    cond_spec = wb.SteeringSpec(spec.layers, condition=Condition(probe, threshold, mode=mode, latch=latch))
    want_ids, want_steer, want_vals = reference_run(default_model, ids, cond_spec, 12, [probe])
    [reply] = asyncio.run(vllm_model.chat(CHAT, steering=cond_spec, monitor=[probe], **GREEDY))
    assert reply.token_ids == want_ids
    assert reply.projections.steered == want_steer
    torch.testing.assert_close(reply.projections["probe"], want_vals["probe"], rtol=1e-3, atol=2e-2)


def test_vllm_monitored_values_are_the_probes_on_the_models_own_stream(vllm_model, default_model):
    spec, probe = _spec_and_probe(default_model, 9, 6, strength=10.0)
    probe2 = Probe("later", 12, torch.randn(default_model.hidden_size, generator=torch.Generator().manual_seed(5)),
                   bias=0.3, span=2.0)
    ids = _prompt_ids(default_model, CHAT)
    [reply] = asyncio.run(vllm_model.chat(CHAT, steering=spec, monitor=[probe, probe2], **GREEDY))
    want_ids, _, want = reference_run(default_model, ids, spec, 12, [probe, probe2])
    assert reply.token_ids == want_ids
    pr = reply.projections
    assert pr.names == ["probe", "later"] and len(pr) == len(ids) + 12 - 1 and pr.steered is None
    for name in pr.names:
        torch.testing.assert_close(pr[name], want[name], rtol=1e-3, atol=2e-2)


def test_vllm_watched_requests_inside_a_busy_batch_match_their_solo_runs(vllm_model):
    """Conditional, monitored and plain requests with different specs in one continuous batch."""
    model = vllm_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=25.0)
    other, probe_b = _spec_and_probe(model, 4, 10, seed=3, strength=12.0)
    probe_b.name = "probe_b"
    cond_spec = wb.SteeringSpec(spec.layers, condition=Condition(probe, 0.0, mode="token", latch=True))
    jobs = [(CHAT, cond_spec, [probe]), (OTHER, other, [probe_b]), (CHAT, spec, None), (OTHER, wb.SteeringSpec(), [probe]),
            (CHAT, wb.SteeringSpec(), None), (OTHER, cond_spec, [probe_b, probe])]

    async def one(chat, s, monitor):
        [r] = await model.chat(chat, steering=s, monitor=monitor, **GREEDY)
        return r

    async def together():
        return await asyncio.gather(*(one(*job) for job in jobs * 2))

    failed_before = model.worker_stats()[0]["failed"]   # other tests fail requests on purpose
    solo = [asyncio.run(one(*job)) for job in jobs]
    batched = asyncio.run(together())
    for a, b in zip(solo * 2, batched):
        assert a.token_ids == b.token_ids
        if a.projections is None:
            assert b.projections is None
            continue
        assert a.projections.steered == b.projections.steered
        torch.testing.assert_close(a.projections.values, b.projections.values, rtol=1e-4, atol=1e-3)
    assert model.worker_stats()[0]["failed"] == failed_before


def test_vllm_streamed_projections_add_up_to_the_replys(vllm_model):
    model = vllm_model
    spec, probe = _spec_and_probe(model, 9, 6, strength=25.0)
    cond_spec = wb.SteeringSpec(spec.layers, condition=Condition(probe, 0.0, mode="token"))

    async def run():
        chunks = [c async for c in model.stream_chat(CHAT, steering=cond_spec, monitor=[probe], **GREEDY)]
        [reply] = await model.chat(CHAT, steering=cond_spec, monitor=[probe], **GREEDY)
        return chunks, reply

    chunks, reply = asyncio.run(run())
    deltas = [c.projections for c in chunks if c.projections is not None]
    assert deltas[0].start == 0 and chunks[0].monitor_header["prompt_len"] == reply.projections.prompt_len
    at = 0
    for d in deltas:
        assert d.start == at
        at += d.values.shape[0]
    torch.testing.assert_close(torch.cat([d.values for d in deltas])[:, 0], reply.projections["probe"])
    assert [s for d in deltas for s in d.steered] == reply.projections.steered
