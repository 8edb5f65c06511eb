"""Captures equal the model's own hidden states; message boundaries partition the prompt."""

import pytest
import torch

import workbench as wb
from conftest import assert_close_rel, reference_hidden

GREEDY = wb.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _layers(model):
    return [0, model.layer_count // 2, model.layer_count - 1]


async def test_generate_captures_equal_output_hidden_states(any_model):
    model = any_model
    layers = _layers(model)
    texts, handles = await model.generate(["Tell me about Tokyo", "Hi"], GREEDY, capture_layers=layers)
    await model.fetch_captures_batch(handles)
    for h in handles:
        gen = h.generated_token_ids
        assert len(gen) == 6
        tokens = h.prompt_token_ids + gen[:-1]
        assert h.token_ids == tokens
        hooked, hidden_states = reference_hidden(model, tokens, layers)
        for layer in layers:
            got = h.hidden(layer)
            assert got.shape == (h.prompt_len + len(gen) - 1, model.hidden_size)
            assert h.captures[layer][0]["hidden"] is got
            if layer < model.layer_count - 1:
                assert_close_rel(got, hidden_states[layer + 1])     # the model's own report
            assert_close_rel(got, hooked[layer])                    # plain forward hook (last layer too)
        # prompt and generated positions both covered: the generated part is not trivially equal
        assert not torch.equal(got[:h.prompt_len].mean(0), got[h.prompt_len:].mean(0))


async def test_chat_captures_and_boundaries(any_model):
    model = any_model
    conv = [
        {"role": "system", "content": "You are a math tutor."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 equals 4."},
        {"role": "user", "content": "What is 10*10?"},
    ]
    layers = _layers(model)
    responses, handles = await model.chat([conv, conv[:2]], GREEDY, capture_layers=layers)
    assert len(responses) == 2 and all(isinstance(r, wb.ChatResponse) for r in responses)
    for h, n_msgs in zip(handles, (4, 2)):
        b = h.message_boundaries
        assert len(b) == n_msgs
        assert b[0].start_token == 0 and b[-1].end_token == h.prompt_len
        assert all(x.end_token == y.start_token for x, y in zip(b, b[1:]))        # a partition
        assert all(x.num_tokens > 0 for x in b)
        assert [x.role for x in b] == [m["role"] for m in conv[:n_msgs]]
        for x in b:  # each message's own text sits in its token range
            assert x.content in model.tokenizer.decode(h.prompt_token_ids[x.start_token:x.end_token])
        tokens = h.token_ids
        hooked, _ = reference_hidden(model, tokens, layers)
        for layer in layers:
            assert_close_rel(h.hidden(layer), hooked[layer])
            for i, x in enumerate(b):
                assert torch.equal(h.get_message_activations(i, layer), h.hidden(layer)[x.start_token:x.end_token])
            last = h.get_message_activations(len(b) - 1, layer, include_generated=True)
            assert torch.equal(last, h.hidden(layer)[b[-1].start_token:])


async def test_norm_tables(tiny):
    conv = [{"role": "user", "content": "Hello there"}]
    _, [h] = await tiny.chat(conv, GREEDY, capture_layers=[1, 3])
    df = h.norms()
    assert set(df.columns) == {"layer", "position", "token", "message_idx", "role", "phase", "norm"}
    assert len(df) == 2 * len(h.token_ids)
    expected = h.hidden(3).norm(dim=-1)
    got = torch.tensor(df[df.layer == 3].sort_values("position").norm.to_list())
    torch.testing.assert_close(got, expected.double().float(), rtol=1e-5, atol=1e-5)
    assert (df[df.phase == "generated"].role == "assistant").all()
    assert (df[df.phase == "generated"].message_idx == 1).all()
    m = h.message_norms()
    row = m[(m.layer == 1) & (m.message_idx == 0)].iloc[0]
    acts = h.get_message_activations(0, 1)
    assert row.num_tokens == acts.shape[0]
    assert abs(row.norm - float(acts.norm(dim=-1).mean())) < 1e-3
    assert set(m.phase) == {"prompt", "generated"}


async def test_capture_handle_errors(tiny):
    texts, [h] = await tiny.generate("Hello", GREEDY, capture_layers=[1])
    with pytest.raises(wb.LayerOutOfRangeError, match="layer 2 was not captured"):
        h.hidden(2)
    with pytest.raises(wb.ValidationError, match="no message boundaries"):
        h.get_message_activations(0, 1)
    h.close()
    with pytest.raises(wb.ValidationError, match="not fetched"):
        h.hidden(1)


async def test_max_tokens_one_captures_prompt_only(tiny):
    _, [h] = await tiny.generate("Hello there", wb.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
                                 capture_layers=[0])
    assert h.hidden(0).shape[0] == h.prompt_len
