"""Integration on the real default model (SmolLM2-135M-Instruct from the registry package)."""

import re

import torch

import workbench as wb

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=40)
TOKYO = [{"role": "user", "content": "Tell me about Tokyo in two sentences."}]
PIRATE = ["Arr matey, hoist the sails and swab the deck!", "Shiver me timbers, where be me buried treasure?",
          "Ahoy, ye scurvy dogs, the captain wants his grog!", "Yo ho ho, we sail the seven seas for plunder, arr!"]
PLAIN = ["Please remember to close the window before leaving.", "Where did you put the keys to the car?",
         "The manager wants the report by Friday afternoon.", "We will travel to the coast for the weekend."]
PIRATE_WORDS = re.compile(r"\b(arr+|matey|ahoy|ye|treasure|ship|sea|seas|sail|pirate|captain|aye|plunder|grog|me hearties)\b", re.I)


def test_default_resolves_to_cached_hf_folder():
    path = wb.resolve_model("default")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert wb.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == path
    assert wb.resolve_model(str(path)) == path.resolve()


def test_default_model_properties(default_model):
    m = default_model
    assert (m.model_name, m.backend, m.layer_count, m.hidden_size) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "hf", 30, 576)
    assert m.tokenizer.eos_token == "<|im_end|>"


async def _pirate_spec(model, layer=6, strength=0.5):
    """Difference of means between pirate and plain sentences, scaled to 0.5 x the median residual norm."""
    _, handles = await model.generate(PIRATE + PLAIN, wb.SamplingParams(max_tokens=1), capture_layers=[layer])
    means = [h.hidden(layer)[1:].mean(0) for h in handles]
    direction = torch.stack(means[:4]).mean(0) - torch.stack(means[4:]).mean(0)
    norms = torch.cat([h.hidden(layer)[1:].norm(dim=-1) for h in handles])
    vector = direction / direction.norm() * norms.median() * strength
    return wb.SteeringSpec(layers={layer: [wb.AddSpec(vector)]})


async def test_steered_chat_differs_and_clearing_restores_baseline(default_model):
    m = default_model
    [baseline] = await m.chat(TOKYO, GREEDY)
    assert "Tokyo" in baseline.generated
    spec = await _pirate_spec(m)
    [steered] = await m.chat(TOKYO, GREEDY, steering=spec)
    assert steered.generated != baseline.generated
    await m.apply_steering_spec(spec)
    [global_steered] = await m.chat(TOKYO, GREEDY)
    assert global_steered.generated == steered.generated
    await m.clear_all_vectors()
    [restored] = await m.chat(TOKYO, GREEDY)
    assert restored.generated == baseline.generated and restored.token_ids == baseline.token_ids
    # the direction steers towards its concept, not just somewhere else
    assert len(PIRATE_WORDS.findall(steered.generated)) > len(PIRATE_WORDS.findall(baseline.generated))


async def test_stream_matches_chat_on_default_model(default_model):
    chunks = [c async for c in default_model.stream_chat(TOKYO, GREEDY)]
    [reply] = await default_model.chat(TOKYO, GREEDY)
    assert len([c for c in chunks if c.text]) > 5
    assert "".join(c.text for c in chunks) == reply.generated


async def test_prefill_and_multi_turn(default_model):
    m = default_model
    prefill = '{"explanation": "'
    conv = [{"role": "user", "content": "Explain rain in JSON format"}, {"role": "assistant", "content": prefill}]
    [r] = await m.chat(conv, GREEDY, chat_options={"continue_final_message": True, "add_generation_prompt": False})
    assert r.has_prefill and r.prefill == prefill and r.full_text().startswith(prefill) and r.generated
    _, [h] = await m.chat(conv, GREEDY, chat_options={"continue_final_message": True}, capture_layers=[3])
    assert not m.tokenizer.decode(h.prompt_token_ids).rstrip().endswith("<|im_end|>")
    history = TOKYO + [(await m.chat(TOKYO, GREEDY))[0].to_message(), {"role": "user", "content": "And Kyoto?"}]
    [second] = await m.chat(history, GREEDY)
    assert second.generated and second.finish_reason in ("stop", "length")


async def test_custom_chat_template(default_model):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
    _, [h] = await default_model.chat(TOKYO, wb.SamplingParams(temperature=0, max_tokens=3),
                                     chat_options={"chat_template": template}, capture_layers=[0])
    assert default_model.tokenizer.decode(h.prompt_token_ids).startswith("[user] Tell me about Tokyo")
