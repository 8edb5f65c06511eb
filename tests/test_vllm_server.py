"""`workbench serve --backend vllm` as a process, driven by the thin API's HTTP client."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import torch

import workbench as wb
from conftest import free_port, stop_process

pytestmark = pytest.mark.integration
KEY = "vllm-test-key"
TOKYO = [{"role": "user", "content": "Give me tourist information about Tokyo."}]


@pytest.fixture(scope="module")
def vllm_served(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-vllm") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "workbench", "serve", "--backend", "vllm", "--enforce-eager",
                             "--port", str(port), "--api-key", KEY, "--max-tokens-limit", "40", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        assert proc.poll() is None, open(log.name).read()[-3000:]
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        stop_process(proc)
        pytest.fail("workbench serve --backend vllm did not come up: " + open(log.name).read()[-3000:])
    yield base
    stop_process(proc, timeout=60)
    log.close()


async def test_served_vllm_steers_streams_and_measures_like_the_hf_backend(vllm_served, default_model):
    client = wb.AsyncClient(base_url=vllm_served, api_key=KEY)
    pirate = default_model.features["concept/pirate"]
    variant = wb.Variant("default").set(pirate, 0.4)
    remote = await client.chat.completions.create(model=variant, messages=TOKYO, max_completion_tokens=30, temperature=0.0)
    [local] = await default_model.chat(TOKYO, wb.SamplingParams(temperature=0.0, max_tokens=30), steering=variant)
    [plain] = await default_model.chat(TOKYO, wb.SamplingParams(temperature=0.0, max_tokens=30))
    assert remote.choices[0].message.content == local.generated != plain.generated

    text = ""
    async for chunk in client.chat.completions.create_stream(model="default", messages=TOKYO, max_completion_tokens=30,
                                                             temperature=0.0):
        text += chunk.choices[0].delta.content or ""
    assert text == plain.generated

    norms = (await client.features.norms(model="default", messages=TOKYO, layers=[0, 6, 29])).to_dataframe()
    _, [h] = await default_model.chat(TOKYO, wb.SamplingParams(max_tokens=1), capture_layers=[6],
                                      chat_options={"add_generation_prompt": False})
    got = torch.tensor(norms[norms.layer == 6].sort_values("position").norm.to_numpy(), dtype=torch.float32)
    torch.testing.assert_close(got, h.hidden(6).norm(dim=-1), rtol=1e-3, atol=1e-2)
    assert httpx.get(f"{vllm_served}/health", timeout=30).json()["backend"] == "vllm"
    stats = httpx.get(f"{vllm_served}/v1/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert stats["engine"]["requests"] >= 3 and stats["active_requests"] == 0


async def test_max_tokens_limit_flag_refuses_long_requests_and_serves_the_next(vllm_served):
    client = wb.AsyncClient(base_url=vllm_served, api_key=KEY)
    with pytest.raises(wb.APIValidationError, match="limit of 40"):
        await client.chat.completions.create(model="default", messages=TOKYO, max_completion_tokens=41)
    ok = await client.chat.completions.create(model="default", messages=TOKYO, max_completion_tokens=40, temperature=0)
    assert ok.choices[0].message.content
