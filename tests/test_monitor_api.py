"""Monitoring and conditional steering through the thin API: both transports, both backends."""

import pytest
import torch

import workbench as wb
from workbench.monitor import Condition, Probe

CHAT = [{"role": "user", "content": "Tell me about the sea and ships."}]
GREEDY = dict(max_completion_tokens=10, temperature=0.0)


def _probe(model, layer=6, seed=1):
    return Probe("dir", layer, torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed)))


def _spec(model, layer=9, strength=25.0):
    v = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    return wb.SteeringSpec({layer: [wb.AddSpec(v / v.norm() * strength)]})


@pytest.fixture(scope="module", params=["inprocess", "http"])
def client(request, default_model):
    if request.param == "inprocess":
        return wb.AsyncClient(default_model)
    return wb.AsyncClient(base_url=request.getfixturevalue("http_server"))


async def test_monitored_chat_reports_the_engines_projections(client, default_model):
    await default_model.load_features()
    feature = default_model.features.search("pirate")[0]
    probe = _probe(default_model)
    r = await client.chat.completions.create(model="default", messages=CHAT, monitor=[feature.id, probe], **GREEDY)
    [direct] = await default_model.chat(CHAT, monitor=[feature, probe], temperature=0.0, max_tokens=10)
    pr = r.choices[0].projections
    assert pr.names == [feature.id, "dir"] and pr.layers == [feature.layer, 6]
    assert pr.token_ids == direct.projections.token_ids and pr.prompt_len == direct.projections.prompt_len
    torch.testing.assert_close(torch.tensor(pr.values), direct.projections.values, rtol=1e-5, atol=1e-5)
    assert pr.roles[0] == "user" and pr.boundaries[0] >= 0 and pr.steered is None
    plain = await client.chat.completions.create(model="default", messages=CHAT, **GREEDY)
    assert plain.choices[0].projections is None


async def test_conditional_stream_deltas_add_up_to_the_completions(client, default_model):
    probe = _probe(default_model)
    cond = Condition(probe, 0.0, mode="token")
    spec = _spec(default_model)
    chunks = [c async for c in client.chat.completions.create_stream(
        model="default", messages=CHAT, steering=spec, condition=cond, monitor=[probe], **GREEDY)]
    full = await client.chat.completions.create(model="default", messages=CHAT, steering=spec, condition=cond,
                                                monitor=[probe], **GREEDY)
    [direct] = await default_model.chat(CHAT, steering=wb.SteeringSpec(spec.layers, condition=cond), monitor=[probe],
                                        temperature=0.0, max_tokens=10)
    pr = full.choices[0].projections
    assert pr.steered == direct.projections.steered and any(pr.steered)
    assert full.choices[0].message.content == direct.generated
    header = [c.monitor for c in chunks if c.monitor is not None]
    assert len(header) == 1 and header[0].names == ["dir"] and header[0].prompt_len == pr.prompt_len
    deltas = [c.projections for c in chunks if c.projections is not None]
    at, values, steered, tokens = 0, [], [], []
    for d in deltas:
        assert d.start == at and len(d.tokens) == len(d.values)
        at += len(d.values)
        values += d.values
        steered += d.steered
        tokens += d.tokens
    assert at == len(pr.values) and steered == pr.steered
    assert tokens == pr.tokens                      # each position named by its own token, prompt then reply
    torch.testing.assert_close(torch.tensor(values), torch.tensor(pr.values))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


async def test_condition_in_the_steering_dict_is_the_same_request(client, default_model):
    probe = _probe(default_model)
    cond = Condition(probe, 0.0, mode="token", latch=True)
    spec = _spec(default_model)
    a = await client.chat.completions.create(model="default", messages=CHAT, steering=spec, condition=cond,
                                             monitor=[probe], **GREEDY)
    b = await client.chat.completions.create(model="default", messages=CHAT, monitor=[probe], **GREEDY,
                                             steering=wb.SteeringSpec(spec.layers, condition=cond))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].projections.steered == b.choices[0].projections.steered


async def test_monitor_errors_are_refused_before_the_reply(client, default_model):
    H = default_model.hidden_size
    bad = [   # (monitor, words the error names)
        ([{"feature": "concept/pirate", "vector": [0.0] * H, "layer": 3}], "not both"),
        ([{"vector": [1.0] * H}], "needs its layer"),
        ([{"vector": [1.0] * 3, "layer": 2}], "hidden size"),
        ([{"vector": [1.0] * H, "layer": 99}], "layer"),
        ([{"feature": "no/such-feature"}], "no/such-feature"),
    ]
    for monitor, words in bad:
        with pytest.raises(wb.APIValidationError, match=words) as err:
            await client.chat.completions.create(model="default", messages=CHAT, monitor=monitor, **GREEDY)
        assert 400 <= err.value.status_code < 500
        with pytest.raises(wb.APIValidationError, match=words):   # refused before the stream starts
            async for _ in client.chat.completions.create_stream(model="default", messages=CHAT, monitor=monitor,
                                                                 **GREEDY):
                pass
    probe = _probe(default_model)
    with pytest.raises(wb.ValidationError):   # a condition twice
        await client.chat.completions.create(
            model="default", messages=CHAT, condition=Condition(probe, 0.0), **GREEDY,
            steering=wb.SteeringSpec(_spec(default_model).layers, condition=Condition(probe, 1.0)))


async def test_vllm_backend_monitors_through_the_api(vllm_model, default_model):
    probe = _probe(default_model)
    cond = Condition(probe, 0.0, mode="token")
    spec = _spec(default_model)
    ours = wb.AsyncClient(vllm_model)
    ref = wb.AsyncClient(default_model)
    got = await ours.chat.completions.create(model=vllm_model.model_name, messages=CHAT, steering=spec, condition=cond,
                                             monitor=[probe], **GREEDY)
    want = await ref.chat.completions.create(model="default", messages=CHAT, steering=spec, condition=cond,
                                             monitor=[probe], **GREEDY)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].projections.steered == want.choices[0].projections.steered
    torch.testing.assert_close(torch.tensor(got.choices[0].projections.values),
                               torch.tensor(want.choices[0].projections.values), rtol=1e-3, atol=2e-2)
    # streamed: the deltas name their positions with the same tokens (vLLM reports values before a step's token)
    chunks = [c async for c in ours.chat.completions.create_stream(
        model=vllm_model.model_name, messages=CHAT, steering=spec, condition=cond, monitor=[probe], **GREEDY)]
    tokens = [t for c in chunks if c.projections is not None for t in c.projections.tokens]
    assert tokens == got.choices[0].projections.tokens
