"""The engine contract (``workbench.engine.base.Backend``), checked on both backends with one fixture.

Each backend declares its ``capabilities``; what it declares must work, and what it does not
must be refused when the request is made (before the engine sees it).
"""

import asyncio

import pytest
import torch

import workbench as wb
from workbench.engine.base import Backend, Capabilities
from workbench.monitor import Probe

CHAT = [{"role": "user", "content": "Name a colour."}]
ALL_OPS = {"add", "projection_cap", "ablation", "sae_clamp"}


@pytest.fixture(params=["hf", "vllm"])
def backend(request):
    return request.getfixturevalue("default_model" if request.param == "hf" else "vllm_model")


def _ops(model):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(model.hidden_size, generator=g)
    k = 2
    sae = wb.SAEClampSpec(encoder=torch.randn(model.hidden_size, k, generator=g), encoder_bias=torch.zeros(k),
                          decoder=torch.randn(k, model.hidden_size, generator=g), decoder_bias=torch.zeros(model.hidden_size),
                          values=torch.ones(k))
    return {"add": wb.AddSpec(v), "projection_cap": wb.ProjectionCapSpec(v, max=1.0), "ablation": wb.AblationSpec(v, 0.5),
            "sae_clamp": sae}


def test_backend_implements_the_contract(backend):
    assert isinstance(backend, Backend) and isinstance(backend.capabilities, Capabilities)
    assert backend.capabilities.ops <= ALL_OPS and {"add", "projection_cap", "ablation"} <= backend.capabilities.ops


def test_declared_ops_run_and_the_others_are_refused_at_input(backend):
    requests_before = backend.stats.get("requests")
    for kind, op in _ops(backend).items():
        spec = wb.SteeringSpec({3: [op]})
        if kind in backend.capabilities.ops:
            [reply] = asyncio.run(backend.chat(CHAT, steering=spec, temperature=0.0, max_tokens=3))
            assert len(reply.token_ids) == 3
            continue
        with pytest.raises(wb.ValidationError, match=type(op).__name__):
            asyncio.run(backend.chat(CHAT, steering=spec, max_tokens=3))
        with pytest.raises(wb.ValidationError):
            asyncio.run(backend.apply_steering_spec(spec))
        with pytest.raises(wb.ValidationError):
            asyncio.run(backend.generate("Hi", steering=spec, max_tokens=3))
        assert backend.export_steering_spec().is_empty()
    declared = len([k for k in _ops(backend) if k in backend.capabilities.ops])
    if requests_before is not None:   # refused requests never reached the engine
        assert backend.stats["requests"] - requests_before == declared


def test_declared_capabilities_work(backend):
    caps = backend.capabilities
    probe = Probe("p", 4, torch.ones(backend.hidden_size))
    params = wb.SamplingParams(temperature=0.0, max_tokens=4, logprobs=2 if caps.logprobs else None)
    replies, [handle] = asyncio.run(backend.chat(CHAT, params, capture_layers=[2] if caps.capture else [],
                                                 monitor=[probe] if caps.monitor else None))
    if caps.monitor:
        assert len(replies[0].projections) == handle.prompt_token_ids.__len__() + 3
    if caps.capture:
        asyncio.run(backend.fetch_captures_batch([handle]))
        assert handle.hidden(2).shape[1] == backend.hidden_size
    [acts] = asyncio.run(backend.encode(["A short prompt."], layers=[1]))
    assert acts[1].shape[1] == backend.hidden_size
