"""The thin API over both transports (in-process and a real uvicorn server): wire compatibility
with vllm-sdk's schemas, client methods, errors."""

import pytest
import vllm_sdk.schemas as sdk
from conftest import same_logits, top_logits

import workbench as wb
from workbench.api import schemas as ours

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
HELLO = [{"role": "user", "content": "Say hello in one sentence."}]


@pytest.fixture(scope="module", params=["inprocess", "http"])
def transport(request):
    return request.param


@pytest.fixture(scope="module")
def client(request, transport, default_model):
    if transport == "inprocess":
        return wb.AsyncClient(default_model, aliases=[LLAMA])
    return wb.AsyncClient(base_url=request.getfixturevalue("http_server"))


def _roundtrip(ours_obj, sdk_cls):
    """Our response, as JSON, validates with the vllm-sdk package's own schema."""
    return sdk_cls.model_validate_json(ours_obj.model_dump_json())


async def test_chat_completion_matches_engine_and_sdk_schema(client, default_model):
    r = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=20, temperature=0.0)
    [direct] = await default_model.chat(HELLO, wb.SamplingParams(temperature=0.0, max_tokens=20))
    assert r.choices[0].message.content == direct.generated
    assert r.usage.completion_tokens == len(direct.token_ids) and r.usage.total_tokens > r.usage.completion_tokens
    parsed = _roundtrip(r, sdk.ChatCompletionResponse)
    assert parsed.choices[0].message.content == direct.generated


async def test_stream_chunks_add_up_and_validate(client):
    text, chunks = "", []
    async for chunk in client.chat.completions.create_stream(model=LLAMA, messages=HELLO, max_completion_tokens=20,
                                                               temperature=0.0):
        chunks.append(chunk)
        text += chunk.choices[0].delta.content or ""
    full = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=20, temperature=0.0)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason is not None
    for c in chunks:
        _roundtrip(c, sdk.ChatCompletionChunk)


async def test_chat_completion_logprobs_n_and_sampling_extras(client, default_model):
    """OpenAI's ``logprobs``/``top_logprobs`` equal the model's own log-softmax; ``n`` seeded choices are the
    engine's single requests with seed + i; the vLLM server's sampling extras ride along."""
    import torch

    tok = default_model.tokenizer
    r = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=8, temperature=0.0,
                                             logprobs=True, top_logprobs=3)
    [direct] = await default_model.chat(HELLO, wb.SamplingParams(temperature=0.0, max_tokens=8))
    prompt = tok(tok.apply_chat_template(HELLO, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = default_model.hf_model(input_ids=torch.tensor([prompt + direct.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(prompt) - 1:len(prompt) - 1 + len(direct.token_ids)], dim=-1)
    content = r.choices[0].logprobs.content
    assert len(content) == len(direct.token_ids) == r.usage.completion_tokens
    for t, (token_id, entry) in enumerate(zip(direct.token_ids, content)):
        assert entry.token == tok.decode([token_id]) and entry.bytes == list(entry.token.encode("utf-8", "replace"))
        assert abs(entry.logprob - float(ref[t, token_id])) < 1e-4
        top = torch.topk(ref[t], 3)
        assert [e.token for e in entry.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert all(abs(e.logprob - v) < 1e-4 for e, v in zip(entry.top_logprobs, top.values.tolist()))
    parsed = _roundtrip(r, sdk.ChatCompletionResponse)  # vllm-sdk reads them as a plain dict
    assert parsed.choices[0].logprobs["content"][0]["token"] == content[0].token
    plain = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=2, temperature=0.0)
    assert plain.choices[0].logprobs is None

    extras = dict(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, top_k=50, min_p=0.05)
    r2 = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=6, seed=3, n=2, **extras)
    assert [c.index for c in r2.choices] == [0, 1]
    solo = [(await default_model.chat(HELLO, wb.SamplingParams(max_tokens=6, seed=3 + j, **extras)))[0] for j in range(2)]
    assert [c.message.content for c in r2.choices] == [s.generated for s in solo]
    assert r2.usage.completion_tokens == sum(len(s.token_ids) for s in solo)
    _roundtrip(r2, sdk.ChatCompletionResponse)

    with pytest.raises(wb.APIValidationError, match="stream=true") as info:
        async for _ in client.chat.completions.create_stream(model=LLAMA, messages=HELLO, max_completion_tokens=2,
                                                              logprobs=True):
            pass
    assert info.value.status_code == 400
    with pytest.raises(wb.APIValidationError, match="top_logprobs needs logprobs") as info:
        await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=2, top_logprobs=2)
    assert info.value.status_code == 400


async def test_variant_interventions_ride_along(client, default_model):
    pirate = default_model.features["concept/pirate"]
    variant = wb.Variant("default").set(pirate, 0.4)
    tokyo = [{"role": "user", "content": "Give me tourist information about Tokyo."}]
    via_client = await client.chat.completions.create(model=variant, messages=tokyo, max_completion_tokens=30,
                                                      temperature=0.0)
    [direct] = await default_model.chat(tokyo, wb.SamplingParams(temperature=0.0, max_tokens=30), steering=variant)
    [plain] = await default_model.chat(tokyo, wb.SamplingParams(temperature=0.0, max_tokens=30))
    assert via_client.choices[0].message.content == direct.generated != plain.generated


async def test_feature_routes_validate_with_the_sdk(client):
    found = await client.features.search("roleplay as pirate", model=LLAMA, top_k=3)
    assert "concept/pirate" in [f.id for f in found.data]
    _roundtrip(found, sdk.FeatureSearchResponse)
    reranked = await client.features.rerank("speak French", features=found.data + (
        await client.features.search("French", model=LLAMA, top_k=1)).data, model=LLAMA, top_k=2)
    assert reranked.data[0].id == "concept/french"
    _roundtrip(reranked, sdk.FeatureRerankResponse)
    pirate_chat = [{"role": "user", "content": "Tell me about Tokyo."},
                   {"role": "assistant", "content": "Ahoy, matey! Tokyo be a fine port, arr, with treasure for ye!"}]
    insp = await client.features.inspect(model=LLAMA, messages=pirate_chat, top_k=5)
    assert "concept/pirate" in [f.feature.id for f in insp.features]
    _roundtrip(insp, sdk.FeatureInspectionResponse)
    acts = await client.features.activations(model=LLAMA, messages=pirate_chat)
    assert len(acts.activations) >= 40
    _roundtrip(acts, sdk.ActivationsResponse)
    logits = await client.features.logits(model=LLAMA, messages=pirate_chat, top_k=10)
    assert len(logits.logits) <= 10
    _roundtrip(logits, sdk.LogitsResponse)
    con = await client.features.contrast(model=LLAMA, dataset_1=[HELLO], dataset_2=[pirate_chat], k_to_add=3, k_to_remove=3)
    assert len(con.top_to_add) == 3 and len(con.top_to_remove) == 3
    _roundtrip(con, sdk.ContrastResponse)


async def test_norms_route(client, default_model):
    r = await client.features.norms(model="default", messages=HELLO, layers=[0, 6, 29])
    df = r.to_dataframe()
    assert set(df.layer) == {0, 6, 29}
    _, [h] = await default_model.chat(HELLO, wb.SamplingParams(max_tokens=1), capture_layers=[6],
                                      chat_options={"add_generation_prompt": False})
    expected = h.hidden(6).norm(dim=-1)
    got = df[df.layer == 6].sort_values("position").norm.to_numpy()
    assert len(got) == expected.shape[0] and abs(got - expected.numpy()).max() < 1e-3 * float(expected.max())


async def test_token_activations_route_agrees_with_activations(client):
    """The heatmap's per-token table: its mean over tokens is the ``activations`` route's mean."""
    chat = HELLO + [{"role": "assistant", "content": "Arr, ahoy matey!"}]
    r = await client.features.token_activations(model="default", messages=chat,
                                                features=["concept/pirate", "concept/french"])
    assert [f.id for f in r.features] == ["concept/pirate", "concept/french"]
    assert len(r.tokens) == len(r.message_idx) == len(r.activations[0]) > 5
    assert set(r.message_idx) == {0, 1} and "".join(r.tokens).strip().endswith("matey!")
    means = (await client.features.activations(model="default", messages=chat)).activations
    # activations come in feature-set order, and the library's index_in_sae is that position
    for f, row in zip(r.features, r.activations):
        assert abs(sum(row) / len(row) - means[f.index_in_sae]) < 1e-4 * max(1.0, abs(means[f.index_in_sae]))
    df = r.to_dataframe()
    assert len(df) == 2 * len(r.tokens) and set(df.feature_id) == {"concept/pirate", "concept/french"}
    with pytest.raises(wb.APIValidationError, match="unknown feature id"):
        await client.features.token_activations(model="default", messages=chat, features=["concept/nope"])


async def test_a_raw_steering_spec_rides_along_with_interventions(client, default_model):
    """The workbench extension ``steering`` (a SteeringSpec dict) applies after the interventions."""
    pirate = default_model.features["concept/pirate"]
    extra = wb.SteeringSpec(layers={3: [wb.AblationSpec(pirate.direction, scale=0.0)],
                                    pirate.layer: [wb.ProjectionCapSpec(pirate.direction, max=0.2 * pirate.scale)]})
    variant = wb.Variant("default").set(pirate, strength=0.5).add_spec(extra)
    r = await client.chat.completions.create(model=variant, messages=HELLO, max_completion_tokens=16, temperature=0.0)
    [direct] = await default_model.chat(HELLO, wb.SamplingParams(temperature=0.0, max_tokens=16), steering=variant)
    [only_ivs] = await default_model.chat(HELLO, wb.SamplingParams(temperature=0.0, max_tokens=16),
                                          steering=wb.Variant("default").set(pirate, strength=0.5))
    assert r.choices[0].message.content == direct.generated != only_ivs.generated
    norms = await client.features.norms(HELLO, model=variant, layers=[pirate.layer])
    _, [h] = await default_model.chat(HELLO, wb.SamplingParams(max_tokens=1), capture_layers=[pirate.layer],
                                      steering=variant, chat_options={"add_generation_prompt": False})
    assert abs(norms.to_dataframe().norm.max() - float(h.hidden(pirate.layer).norm(dim=-1).max())) < 1e-2
    with pytest.raises(wb.APIValidationError, match="hidden size"):
        await client.chat.completions.create(model="default", messages=HELLO, max_completion_tokens=2,
                                             steering={"layers": {"3": [{"type": "add", "vector": [1.0, 2.0]}]}})


def test_sdk_requests_parse_into_our_schemas():
    req = sdk.ChatCompletionRequest(model=LLAMA, messages=[sdk.ChatMessage(role="user", content="hi")],
                                    interventions=[sdk.InterventionSpec(index_in_sae=3, strength=0.5)])
    ours.ChatCompletionRequest.model_validate_json(req.model_dump_json())
    ours.ContrastRequest.model_validate_json(sdk.ContrastRequest(
        model=LLAMA, dataset_1=[[sdk.ChatMessage(role="user", content="a")]],
        dataset_2=[[sdk.ChatMessage(role="user", content="b")]]).model_dump_json())


@pytest.mark.parametrize("call, status, match", [
    (lambda c: c.chat.completions.create(model="no-such-model", messages=HELLO), 400, "unknown model 'no-such-model'"),
    (lambda c: c.features.search("x", model=LLAMA, top_k=500), 422, "top_k"),
    (lambda c: c.chat.completions.create(model=LLAMA, messages=HELLO, interventions=[{"index_in_sae": 999, "strength": 1}]),
     400, "no feature with index_in_sae 999"),
    (lambda c: c.chat.completions.create(model=LLAMA, messages=[]), 422, "messages"),
    (lambda c: c.features.logits(model=LLAMA, messages=HELLO, start_idx=5, end_idx=2), 400, "start_idx:end_idx"),
    (lambda c: c.chat.completions.create(model=LLAMA, messages=HELLO, interventions=[{"index_in_sae": 0, "strength": "big"}]),
     422, "strength must be a number"),
])
async def test_errors_carry_status_and_detail(client, call, status, match):
    with pytest.raises(wb.APIValidationError, match=match) as info:
        await call(client)
    assert info.value.status_code == status and isinstance(info.value, wb.WorkbenchError)
    ok = await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=3, temperature=0.0)
    assert ok.choices[0].message.content


async def test_logits_indices_are_python_slice_bounds(client, default_model):
    """``end_idx`` past the end clamps (as ``list[:10**5]`` does) and negative bounds count from the end."""
    from workbench.features.inspection import _render

    ids = _render(default_model, HELLO)

    full = await top_logits(default_model, ids, 10)
    for start, end in ((None, 10**5), (-10**5, len(ids) + 1), (None, None)):
        r = await client.features.logits(model=LLAMA, messages=HELLO, top_k=10, start_idx=start, end_idx=end)
        assert same_logits(r.logits, full) and r.usage.total_tokens == len(ids), (start, end)
    for start, end in ((None, -3), (-4, None), (1, len(ids) - 1)):
        expected = await top_logits(default_model, ids[start:end], 10)
        assert not same_logits(expected, full)   # the slice matters, so the check below tells slices apart
        r = await client.features.logits(model=LLAMA, messages=HELLO, top_k=10, start_idx=start, end_idx=end)
        assert same_logits(r.logits, expected), (start, end)


def test_sync_client(request, transport, default_model):
    if transport == "inprocess":
        client = wb.Client(default_model, aliases=[LLAMA])
    else:
        client = wb.Client(base_url=request.getfixturevalue("http_server"))
    r = client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=8, temperature=0.0)
    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create_stream(model=LLAMA, messages=HELLO, max_completion_tokens=8, temperature=0.0)]
    assert "".join(pieces) == r.choices[0].message.content
    assert client.features.search("speak French", model="default", top_k=1).data[0].id == "concept/french"
    assert [m.id for m in client.models().data] == ["HuggingFaceTB/SmolLM2-135M-Instruct", LLAMA]


async def test_unreachable_server_is_a_connection_error():
    from conftest import free_port

    client = wb.AsyncClient(base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(wb.APIConnectionError, match="cannot reach"):
        await client.chat.completions.create(model=LLAMA, messages=HELLO, max_completion_tokens=2)
    assert isinstance(wb.APIConnectionError("x"), wb.WorkbenchError)
