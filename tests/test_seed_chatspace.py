"""chatspace users' code runs unchanged: its constructor, single-layer API, spec views, replies as text.

The vLLM engine here is the session's shared one (conftest ``vllm_model``), built the chatspace way:
``VLLMSteerModel(VLLMSteeringConfig(model_name=<local path>, gpu_memory_utilization=0.9, ...),
bootstrap_layers=(2, 4, 6))`` with no ``enforce_eager`` (compiled mode is the default).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import subprocess
import sys

import pytest
import torch

import workbench as wb
from workbench.smoke import smoke

pytestmark = pytest.mark.integration

PROMPT = "Question: What is the capital of France? Answer:"
GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=24)
TOKYO = [{"role": "user", "content": "Tell me about Tokyo in two sentences."}]


@pytest.fixture(params=["hf", "vllm"])
def backend_model(request, default_model):
    model = default_model if request.param == "hf" else request.getfixturevalue("vllm_model")
    yield model
    asyncio.run(model.clear_all_vectors())


def vectors(model, n=3, seed=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(model.hidden_size, generator=g) for _ in range(n)]


# ---------------------------------------------------------------------------------- the constructor
def test_the_chatspace_constructor_builds_a_compiled_engine_on_a_local_path(vllm_model, vllm_model_log):
    assert isinstance(vllm_model, wb.VLLMSteerModel) and vllm_model.backend == "vllm"
    assert vllm_model.model_name == str(wb.resolve_model("default"))  # chatspace code passes it to AutoTokenizer
    assert vllm_model.cfg.gpu_memory_utilization == 0.9 and vllm_model.max_model_len == 1024
    assert vllm_model.enforce_eager is False  # compiled stays the default
    assert vllm_model.target_layer == 2  # chatspace: the first bootstrap layer is the set_vector target
    said = [r for r in vllm_model_log if "compiled mode" in r]
    assert len(said) == 1, said  # said once, not per request


def test_bootstrap_layers_are_checked():
    with pytest.raises(wb.LayerOutOfRangeError, match="bootstrap layer 30 is out of range; allowed 0..29"):
        wb.VLLMSteerModel(wb.VLLMSteeringConfig(model_name="default"), bootstrap_layers=(2, 30), show_progress=False)


# ---------------------------------------------------------------------------------- single-layer API
def test_set_target_layer_and_set_vector_steer_that_layer_like_a_per_request_spec(backend_model):
    m = backend_model
    [v] = vectors(m, 1)
    v = v / v.norm() * 60.0
    m.set_target_layer(6)
    asyncio.run(m.set_vector(v))
    assert torch.equal(m.current_vector(), v) and torch.equal(m.current_vector(6), v)
    assert torch.equal(m.current_vector(5), torch.zeros(m.hidden_size))
    [global_text] = asyncio.run(m.generate(PROMPT, GREEDY))
    [per_request] = asyncio.run(m.generate(PROMPT, GREEDY, steering=wb.SteeringSpec(layers={6: [wb.AddSpec(v)]})))
    [baseline] = asyncio.run(m.generate(PROMPT, GREEDY, steering=wb.SteeringSpec()))
    assert global_text == per_request != baseline
    asyncio.run(m.set_vector(None))  # chatspace: None clears the target layer
    assert asyncio.run(m.generate(PROMPT, GREEDY)) == [baseline]
    with pytest.raises(wb.LayerOutOfRangeError, match="layer_idx 30 is out of range"):
        m.set_target_layer(30)


def test_set_vector_needs_a_target_layer_on_a_model_without_one(tiny):
    assert tiny.target_layer is None
    with pytest.raises(wb.ValidationError, match="call model.set_target_layer"):
        asyncio.run(tiny.set_vector(torch.ones(tiny.hidden_size)))


def test_clear_layer_vector_clears_what_chatspace_clears_and_export_fills_the_chatspace_fields(backend_model):
    m = backend_model
    a, b, c = vectors(m)
    [baseline] = asyncio.run(m.generate(PROMPT, GREEDY))
    asyncio.run(m.set_layer_vector(4, a * 0.2))
    asyncio.run(m.set_layer_projection_cap(4, b, min=-2.0, max=2.0))
    asyncio.run(m.set_layer_ablation(4, c, scale=0.5))
    asyncio.run(m.set_layer_ablation(9, c, scale=0.0))
    spec = m.export_steering_spec()
    layer4, layer9 = spec.layers[4], spec.layers[9]
    assert torch.equal(layer4.add.vector, a * 0.2) and layer4.add.scale == 1.0
    assert torch.equal(layer4.add.materialize(), a * 0.2)
    assert torch.equal(layer4.projection_cap.vector, b) and (layer4.projection_cap.min, layer4.projection_cap.max) == (-2.0, 2.0)
    assert torch.equal(layer4.ablation.vector, c) and layer4.ablation.scale == 0.5
    assert layer9.add is None and layer9.projection_cap is None and layer9.ablation.scale == 0.0
    [steered] = asyncio.run(m.generate(PROMPT, GREEDY))
    assert steered != baseline
    asyncio.run(m.clear_layer_vector(4))  # vector, cap and ablation of layer 4 go; layer 9 stays
    assert sorted(m.export_steering_spec().layers) == [9]
    asyncio.run(m.set_layer_vector(9, None))  # chatspace: a None vector clears the layer
    assert m.export_steering_spec().is_empty()
    assert asyncio.run(m.generate(PROMPT, GREEDY)) == [baseline]


def test_layer_views_are_filled_only_when_chatspace_can_express_the_layer():
    a, b = torch.randn(8), torch.randn(8)
    plain = wb.LayerSteeringSpec(add=wb.AddSpec(a), projection_cap=wb.ProjectionCapSpec(b, max=1.0))
    assert torch.equal(plain.add.vector, a) and plain.projection_cap.max == 1.0 and plain.ablation is None
    assert [type(op) for op in plain.operations] == [wb.AddSpec, wb.ProjectionCapSpec]
    two_adds = wb.LayerSteeringSpec(operations=[wb.AddSpec(a), wb.AddSpec(b)])
    cap_first = wb.LayerSteeringSpec(operations=[wb.ProjectionCapSpec(b, max=1.0), wb.AddSpec(a)])
    for layer in (two_adds, cap_first):
        assert layer.add is None and layer.projection_cap is None and layer.ablation is None
    plain.ablation = wb.AblationSpec(a, scale=0.0)  # chatspace-style assignment keeps the canonical order
    plain.add = None
    assert [type(op) for op in plain.operations] == [wb.ProjectionCapSpec, wb.AblationSpec]
    with pytest.raises(wb.ValidationError, match="expected a AddSpec"):
        plain.add = wb.AblationSpec(a)
    with pytest.raises(wb.ValidationError, match="expected a ProjectionCapSpec"):
        wb.LayerSteeringSpec(projection_cap=wb.AddSpec(a))


# ---------------------------------------------------------------------------------- replies as text
def test_a_chat_response_is_its_text(capsys):
    r = wb.ChatResponse(prefill='{"a": ', generated="1}", token_ids=[5, 6], finish_reason="stop")
    assert r == '{"a": 1}' and r[:4] == '{"a"' and len(r) == 8 and isinstance(r, str)
    assert f"{r:>10}|" == '  {"a": 1}|' and r + "!" == '{"a": 1}!' and "a" in r and r.upper() == '{"A": 1}'
    print(r)
    assert capsys.readouterr().out == '{"a": 1}\n'
    assert json.loads(json.dumps({"reply": r})) == {"reply": '{"a": 1}'}
    back = pickle.loads(pickle.dumps(r))
    assert (back.prefill, back.generated, back.token_ids, back.finish_reason) == ('{"a": ', "1}", [5, 6], "stop")
    assert r.to_message() == {"role": "assistant", "content": '{"a": 1}'} and r.has_prefill


def test_replies_work_where_chatspace_code_uses_text(backend_model):
    [reply] = asyncio.run(backend_model.chat(TOKYO, GREEDY))
    assert reply == reply.generated and reply[:10] == reply.generated[:10] and len(reply) == len(reply.generated)
    assert f"Response: {reply[:50]}..." == f"Response: {reply.generated[:50]}..."


# ---------------------------------------------------------------------------------- chat_options
def test_chat_options_pass_any_template_keyword(backend_model):
    template = ("{% for m in messages %}<{{ m['role'] }}|{{ persona }}> {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant|{{ persona }}>{% endif %}")
    options = {"chat_template": template, "persona": "pirate", "enable_thinking": False}
    _, [h] = asyncio.run(backend_model.chat(TOKYO, wb.SamplingParams(temperature=0, max_tokens=2),
                                            chat_options=options, capture_layers=[0]))
    text = backend_model.tokenizer.decode(h.prompt_token_ids)
    assert text.startswith("<user|pirate> Tell me about Tokyo") and text.endswith("<assistant|pirate>")
    assert [b.role for b in h.message_boundaries] == ["user"]


# ---------------------------------------------------------------------------------- smoke
def test_smoke_reports_steering_and_its_removal(default_model):
    result = asyncio.run(smoke(default_model, layer=6, scale=60.0, max_tokens=16))
    assert result.ok and result.changed and result.restored == result.baseline
    null = asyncio.run(smoke(default_model, layer=6, scale=0.0, max_tokens=16))
    assert not null.changed and not null.ok and "steering changed the reply: NO" in null.report()


def test_the_smoke_command_runs_and_exits_by_its_verdict():
    cmd = [sys.executable, "-m", "workbench", "smoke", "--backend", "hf", "--layer", "6", "--max-tokens", "12"]
    good = subprocess.run(cmd + ["--scale", "60"], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "layer 6, |vector| = 60" in good.stdout and "steering changed the reply: yes" in good.stdout
    bad = subprocess.run(cmd + ["--scale", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "steering changed the reply: NO" in bad.stdout
