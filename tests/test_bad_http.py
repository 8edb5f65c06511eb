"""The bad-input catalogue over HTTP: every bad body gets a 4xx JSON ``detail`` (never a 5xx), and the
next valid request still gets the right answer. The engine-level catalogue is tests/test_errors.py."""

import json
import math

import httpx
import pytest

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
HI = [{"role": "user", "content": "Say hello."}]
CHAT = "/v1/chat/completions"
OK = {"model": "default", "messages": HI, "max_completion_tokens": 8, "temperature": 0.0}


def chat(**changes):
    body = dict(OK)
    for k, v in changes.items():
        if v is _DROP:
            body.pop(k)
        else:
            body[k] = v
    return body


_DROP = object()
VEC = [0.01] * 576


def spec(layer=6, vector=VEC, kind="add", **kw):
    return {"layers": {str(layer): [dict({"type": kind, "vector": vector, "scale": 1.0}, **kw)]}}


# name -> (path, body or raw bytes, headers, allowed statuses, a word the detail must contain)
CATALOGUE = {
    "messages not a list": (CHAT, chat(messages="hello"), None, {422}, "messages"),
    "messages empty": (CHAT, chat(messages=[]), None, {422}, "messages"),
    "messages missing": (CHAT, chat(messages=_DROP), None, {422}, "messages"),
    "unknown role": (CHAT, chat(messages=[{"role": "robot", "content": "hi"}]), None, {422}, "role"),
    "content not a string": (CHAT, chat(messages=[{"role": "user", "content": 42}]), None, {422}, "content"),
    "only empty contents": (CHAT, chat(messages=[{"role": "system", "content": ""}, {"role": "user", "content": " "}]),
                            None, {400}, "no text"),
    "negative temperature": (CHAT, chat(temperature=-0.5), None, {422}, "temperature"),
    "zero max tokens": (CHAT, chat(max_completion_tokens=0), None, {422}, "max_completion_tokens"),
    "negative max tokens": (CHAT, chat(max_tokens=-4), None, {422}, "max_tokens"),
    "top_p zero": (CHAT, chat(top_p=0.0), None, {422}, "top_p"),
    "n = 0": (CHAT, chat(n=0), None, {422}, "n"),
    "n over OpenAI's 128": (CHAT, chat(n=129), None, {422}, "n"),
    "presence penalty out of range": (CHAT, chat(presence_penalty=2.5), None, {422}, "presence_penalty"),
    "top_logprobs over 20": (CHAT, chat(logprobs=True, top_logprobs=21), None, {422}, "top_logprobs"),
    "top_logprobs without logprobs": (CHAT, chat(top_logprobs=2), None, {400}, "top_logprobs needs logprobs"),
    "logprobs while streaming": (CHAT, chat(logprobs=True, stream=True), None, {400}, "stream=true"),
    "n > 1 while streaming": (CHAT, chat(n=2, stream=True), None, {400}, "stream=true"),
    "min_tokens over max tokens": (CHAT, chat(min_tokens=20), None, {400}, "min_tokens=20"),
    "seed not an integer": (CHAT, chat(seed="abc"), None, {422}, "seed"),
    "stop not a string": (CHAT, chat(stop=5), None, {422}, "stop"),
    "repetition penalty zero": (CHAT, chat(repetition_penalty=0), None, {422}, "repetition_penalty"),
    "unknown model": (CHAT, chat(model="gpt-9"), None, {400}, "unknown model"),
    "unknown feature index": (CHAT, chat(interventions=[{"index_in_sae": 9999, "strength": 0.5}]), None, {400}, "9999"),
    "strength not a number": (CHAT, chat(interventions=[{"index_in_sae": 0, "strength": "big"}]), None, {422}, "strength"),
    "strength NaN": (CHAT, chat(interventions=[{"index_in_sae": 0, "strength": math.nan}]), None, {400, 422}, "strength"),
    "unknown mode": (CHAT, chat(interventions=[{"index_in_sae": 0, "strength": 0.5, "mode": "multiply"}]), None,
                     {400, 422}, "mode"),
    "steering vector of wrong size": (CHAT, chat(steering=spec(vector=[1.0, 2.0])), None, {400}, "hidden size"),
    "steering vector with NaN": (CHAT, chat(steering=spec(vector=[math.nan] * 576)), None, {400}, "non-finite"),
    "steering vector overflowing float32": (CHAT, chat(steering=spec(vector=[1e39] * 576)), None, {400}, "non-finite"),
    "steering strength overflowing inside the model": (CHAT, chat(steering=spec(vector=[4.0] * 576, scale=1e38)), None,
                                                       {400}, "inf/NaN"),
    "steering layer out of range": (CHAT, chat(steering=spec(layer=99)), None, {400}, "out of range"),
    "steering negative layer": (CHAT, chat(steering=spec(layer=-1)), None, {400}, "out of range"),
    "steering unknown op": (CHAT, chat(steering=spec(kind="rotate")), None, {400}, "rotate"),
    "steering not a mapping": (CHAT, chat(steering=[1, 2]), None, {422}, "steering"),
    "prompt longer than the context": (CHAT, chat(messages=[{"role": "user", "content": "hello " * 9000}]), None,
                                       {400}, "tokens"),
    "malformed JSON": (CHAT, b'{"model": "default", "messages": [', {"content-type": "application/json"}, {400, 422}, "JSON"),
    "invalid UTF-8": (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                      {"content-type": "application/json"}, {400}, "UTF-8"),
    "wrong content type": (CHAT, b"model=default", {"content-type": "text/plain"}, {415}, "application/json"),
    "body over the size limit": (CHAT, chat(messages=[{"role": "user", "content": "x" * (5 * 2**20)}]), None, {413},
                                 "limit"),
    "search top_k zero": ("/v1/features/search", {"query": "pirate", "model_name": LLAMA, "top_k": 0}, None, {422}, "top_k"),
    "search top_k too large": ("/v1/features/search", {"query": "pirate", "model_name": LLAMA, "top_k": 500}, None, {422},
                               "top_k"),
    "search without query": ("/v1/features/search", {"model_name": LLAMA}, None, {422}, "query"),
    "inspect unknown aggregation": ("/v1/chat_attribution/inspect", {"model": LLAMA, "messages": HI,
                                                                     "aggregation_method": "median"}, None, {422},
                                    "aggregation_method"),
    # start_idx/end_idx are slice bounds (negative and past-the-end ones are fine): an empty slice is not
    "logits empty slice": ("/v1/chat_attribution/logits", {"model": LLAMA, "messages": HI, "start_idx": 5, "end_idx": 2},
                           None, {400}, "start_idx:end_idx"),
    "logits index not an integer": ("/v1/chat_attribution/logits", {"model": LLAMA, "messages": HI, "end_idx": 2.5},
                                    None, {422}, "end_idx"),
    "contrast datasets not lists": ("/v1/chat_attribution/contrast", {"model": LLAMA, "dataset_1": "a", "dataset_2": "b"},
                                    None, {422}, "dataset_1"),
    "norms layer out of range": ("/v1/chat_attribution/norms", {"model": LLAMA, "messages": HI, "layers": [99]}, None,
                                 {400}, "99"),
    "token activations unknown feature": ("/v1/chat_attribution/token_activations",
                                          {"model": LLAMA, "messages": HI, "features": ["concept/nope"]}, None, {400},
                                          "nope"),
    "rerank features not a list": ("/v1/features/rerank", {"query": "x", "model_name": LLAMA, "features": "pirate"},
                                   None, {422}, "features"),
    "unknown route": ("/v1/nope", {}, None, {404}, ""),
}


@pytest.fixture(scope="module")
def http(http_server):
    with httpx.Client(base_url=http_server, timeout=120) as client:
        expected = client.post(CHAT, json=OK).json()["choices"][0]["message"]["content"]
        yield client, expected


def test_the_catalogue_has_at_least_30_distinct_bad_inputs():
    assert len(CATALOGUE) >= 30


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_bad_input_gets_a_4xx_detail_and_the_next_request_is_right(http, name):
    client, expected = http
    path, body, headers, statuses, word = CATALOGUE[name]
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers=headers)
    else:
        r = client.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code in statuses, (r.status_code, r.text[:300])
    detail = r.json().get("detail", "")
    assert isinstance(detail, str) and detail, r.text[:300]
    assert word.lower() in detail.lower(), detail[:300]
    after = client.post(CHAT, json=OK)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected


def test_cors_is_off_and_only_the_api_routes_exist(http):
    client, _ = http
    r = client.options(CHAT, headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in {k.lower() for k in r.headers}
    r = client.post(CHAT, json=OK, headers={"Origin": "https://evil.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in {k.lower() for k in r.headers}
    paths = set(client.get("/openapi.json").json()["paths"])
    from workbench.api.transports import ROUTES

    # nothing that runs code or reads files from a path a request names: the API routes, models, health, stats
    assert paths == set(ROUTES) | {"/v1/models", "/health", "/v1/stats"}
