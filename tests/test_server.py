"""`workbench serve` as a process: auth, bad bodies, the registry's vllm-sdk and openai clients,
concurrent streams with different interventions, and client disconnects."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

import workbench as wb
from conftest import free_port, stop_process

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
KEY = "test-key-123"
TOKYO = [{"role": "user", "content": "Give me tourist information about Tokyo."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`workbench serve` in a subprocess on a free loopback port, with a key and a Llama alias."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--port", str(port), "--api-key", KEY,
                             "--served-model-name", LLAMA, "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log.name).read()[-2000:]
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield base
    stop_process(proc, timeout=30)
    log.close()


def _post(base, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base + path, headers=headers, timeout=120, **({"json": body} if body is not None else {}), **kw)


def test_auth_and_bad_bodies(served):
    ok = {"model": LLAMA, "messages": TOKYO, "max_completion_tokens": 4, "temperature": 0}
    assert _post(served, "/v1/chat/completions", ok, key=None).status_code == 401
    assert _post(served, "/v1/chat/completions", ok, key="wrong").status_code == 401
    assert httpx.post(served + "/v1/chat/completions", json=ok, headers={"x-api-key": KEY}, timeout=60).status_code == 200
    r = httpx.post(served + "/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["detail"]
    r = _post(served, "/v1/chat/completions", {**ok, "model": "gpt-9"})
    assert r.status_code == 400 and "unknown model 'gpt-9'" in r.json()["detail"]
    r = _post(served, "/v1/features/search", {"query": "pirate", "model_name": LLAMA, "top_k": 1000})
    assert r.status_code == 422 and "top_k" in r.json()["detail"]
    r = _post(served, "/v1/chat/completions", {**ok, "interventions": [{"index_in_sae": 4242, "strength": 0.5}]})
    assert r.status_code == 400 and "4242" in r.json()["detail"]
    r = httpx.post(served + "/v1/chat/completions", content=b"x" * (5 * 2**20),
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    again = _post(served, "/v1/chat/completions", ok)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]
    assert httpx.get(served + "/v1/models", headers={"x-api-key": KEY}).json()["data"][1]["id"] == LLAMA


async def test_vllm_sdk_client_runs_every_call(served, monkeypatch):
    import vllm_sdk.config
    from vllm_sdk import AsyncClient, Variant

    monkeypatch.setitem(vllm_sdk.config._MODEL_URLS, LLAMA, served)
    client = AsyncClient(api_key=KEY)
    variant = Variant(LLAMA)
    r = await client.chat.completions.create(model=variant, messages=TOKYO, max_completion_tokens=16, temperature=0.0)
    text = r.choices[0].message.content
    assert text
    streamed = ""
    async for chunk in client.chat.completions.create_stream(model=variant, messages=TOKYO, max_completion_tokens=16,
                                                              temperature=0.0):
        streamed += chunk.choices[0].delta.content or ""
    assert streamed == text
    found = await client.features.search(query="roleplay as pirate", model=variant, top_k=3)
    assert any(f.id == "concept/pirate" for f in found.data)
    reranked = await client.features.rerank(query="speak French", features=found.data, model=variant, top_k=3)
    assert len(reranked.data) == 3
    variant.set(features=[f for f in found.data if f.id == "concept/pirate"], strength=0.4)
    steered = await client.chat.completions.create(model=variant, messages=TOKYO, max_completion_tokens=16, temperature=0.0)
    assert steered.choices[0].message.content != text
    conv = TOKYO + [{"role": "assistant", "content": "Ahoy, matey! Tokyo be a fine port, arr!"}]
    insp = await client.features.inspect(messages=conv, model=variant, top_k=5)
    assert len(insp.features) == 5
    acts = await client.features.activations(messages=conv, model=variant)
    assert len(acts.activations) >= 40
    logits = await client.features.logits(messages=conv, model=variant, top_k=5)
    assert len(logits.logits) <= 5
    con = await client.features.contrast(dataset_1=[TOKYO], dataset_2=[conv], model=variant, k_to_add=3, k_to_remove=3)
    assert len(con.top_to_add) == 3


def test_openai_client(served):
    from openai import OpenAI

    client = OpenAI(base_url=served + "/v1", api_key=KEY)
    r = client.chat.completions.create(model=LLAMA, messages=TOKYO, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text
    stream = client.chat.completions.create(model=LLAMA, messages=TOKYO, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


async def test_sixteen_concurrent_streams_get_their_own_tokens(served):
    client = wb.AsyncClient(base_url=served, api_key=KEY)
    features = (await client.features.search("travel music food sports ocean", model=LLAMA, top_k=16)).data
    variants = [wb.Variant("default")] + [wb.Variant("default").set(f, 0.35) for f in features[:15]]

    async def one(variant):
        text = ""
        async for c in client.chat.completions.create_stream(model=variant, messages=TOKYO, max_completion_tokens=12,
                                                               temperature=0.0):
            text += c.choices[0].delta.content or ""
        return text

    together = await asyncio.gather(*(one(v) for v in variants))
    alone = [(await client.chat.completions.create(model=v, messages=TOKYO, max_completion_tokens=12,
                                                   temperature=0.0)).choices[0].message.content for v in variants]
    assert together == alone
    assert len(set(together)) > 8          # the interventions really differ


async def test_client_disconnect_stops_the_generation(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = httpx.get(served + "/v1/stats", headers=headers).json()
    body = {"model": LLAMA, "messages": TOKYO, "max_completion_tokens": 2000, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", served + "/v1/chat/completions", json=body, headers=headers) as response:
            lines = 0
            async for line in response.aiter_lines():
                lines += line.startswith("data: ")
                if lines >= 4:
                    break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(served + "/v1/stats", headers=headers).json()
        if stats["server"]["streams_aborted"] > before["server"]["streams_aborted"] and stats["active_requests"] == 0:
            break
        await asyncio.sleep(0.2)
    assert stats["server"]["streams_aborted"] == before["server"]["streams_aborted"] + 1
    assert stats["active_requests"] == 0
    assert stats["engine"]["tokens"] - before["engine"]["tokens"] < 1000     # stopped long before 2000 tokens


def test_without_a_key_the_server_binds_to_localhost_only():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--host", "0.0.0.0", "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={k: v for k, v in os.environ.items() if k != "WORKBENCH_API_KEY"})
    try:
        lines = []
        while not any("workbench serve: HuggingFaceTB" in l for l in lines) and len(lines) < 20:
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        assert "no --api-key, so binding to 127.0.0.1 only (not 0.0.0.0)" in text
        assert f"on http://127.0.0.1:{port}" in text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
