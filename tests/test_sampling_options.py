"""vLLM's sampling options on the hf backend, against references computed here from the model's own logits.

Each reference is one plain forward of ``model.hf_model`` over prompt + generated tokens (no engine,
no cache), processed with the formulas of vLLM's sampler written out in this file.
"""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.outputs import CompletionOutput, RequestOutput

APPLES = "apple apple apple apple apple apple"
YES_NO = [{"role": "user", "content": "Answer with one word: is the sky blue?"}]


def ref_rows(model, prompt_ids, out_ids) -> torch.Tensor:
    """``[len(out_ids), vocab]``: the model's raw logits before each generated token."""
    with torch.no_grad():
        logits = model.hf_model(input_ids=torch.tensor([list(prompt_ids) + list(out_ids)])).logits[0].float()
    p = len(prompt_ids)
    return logits[p - 1:p - 1 + len(out_ids)]


def prompt_ids(model, text: str) -> list:
    return model.tokenizer(text, add_special_tokens=True)["input_ids"]


def chat_ids(model, messages) -> list:
    text = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_ids(model) -> set:
    """The ids the model's configs call end-of-sequence (what min_tokens must hold back)."""
    gen = model.hf_model.generation_config.eos_token_id
    ids = {model.tokenizer.eos_token_id, model.hf_model.config.eos_token_id, *(gen if isinstance(gen, list) else [gen])}
    return {int(i) for i in ids if i is not None}


def penalized(row, params, prompt, generated) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt + generated, then frequency and presence over generated only."""
    row = row.clone()
    seen = sorted(set(prompt) | set(generated))
    if params.get("repetition_penalty", 1.0) != 1.0 and seen:
        rp = params["repetition_penalty"]
        picked = row[seen]
        row[seen] = torch.where(picked > 0, picked / rp, picked * rp)
    for token in set(generated):
        count = generated.count(token)
        row[token] -= params.get("frequency_penalty", 0.0) * count + params.get("presence_penalty", 0.0)
    return row


@pytest.mark.parametrize("penalties", [
    {"repetition_penalty": 1.3}, {"presence_penalty": 1.5}, {"frequency_penalty": 0.8},
    {"repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": 0.4},
], ids=["repetition", "presence", "frequency", "all"])
async def test_greedy_decoding_honours_penalties(any_model, penalties):
    model = any_model
    ids = prompt_ids(model, APPLES)
    base = dict(temperature=0.0, max_tokens=40, ignore_eos=True)
    [plain] = await model.generate([ids], **base, raw_output=True)
    [got] = await model.generate([ids], **base, **penalties, raw_output=True)
    out = got.outputs[0].token_ids
    assert len(out) == 40
    rows = ref_rows(model, ids, out)
    for t, token in enumerate(out):
        want = int(penalized(rows[t], penalties, ids, out[:t]).argmax())
        assert token == want, f"step {t}: engine picked {token}, the penalized reference argmax is {want}"
    assert out != plain.outputs[0].token_ids  # the penalties changed the reply (else the check above proves little)


async def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings(default_model):
    model = default_model
    ids = chat_ids(model, YES_NO)
    eos = eos_ids(model)
    [plain] = await model.generate([ids], temperature=0.0, max_tokens=40)
    plain_ids = model.tokenizer(plain, add_special_tokens=False)["input_ids"]
    assert len(plain_ids) < 12  # the model stops early on its own: min_tokens has something to hold back
    [held] = await model.generate([ids], temperature=0.0, max_tokens=40, min_tokens=12, raw_output=True)
    out = held.outputs[0].token_ids
    assert len(out) >= 12 and not eos & set(out[:12])
    rows = ref_rows(model, ids, out)
    for t, token in enumerate(out):
        row = rows[t].clone()
        if t < 12:
            row[sorted(eos)] = float("-inf")
        assert token == int(row.argmax()), f"step {t}"
    # a stop token id is held back the same way: the reply's second token, forbidden until 3 tokens exist
    [first] = await model.generate([ids], temperature=0.0, max_tokens=6, raw_output=True)
    banned = first.outputs[0].token_ids[1]
    [again] = await model.generate([ids], temperature=0.0, max_tokens=6, min_tokens=3, stop_token_ids=[banned],
                                   raw_output=True)
    out2 = again.outputs[0].token_ids
    row = ref_rows(model, ids, out2[:2])[1].clone()
    row[sorted(eos | {banned})] = float("-inf")
    assert out2[1] != banned and out2[1] == int(row.argmax())
    # stop strings are looked for only after min_tokens tokens (vLLM's rule)
    [stopped] = await model.generate([ids], temperature=0.0, max_tokens=12, stop=["sky"])
    [late] = await model.generate([ids], temperature=0.0, max_tokens=12, stop=["sky"], min_tokens=5)
    assert "sky" in plain and "sky" not in stopped and "sky" in late


async def test_min_p_keeps_only_tokens_near_the_most_likely(default_model):
    model = default_model
    ids = prompt_ids(model, "Once upon a time")
    temp, min_p = 1.5, 0.2
    common = dict(temperature=temp, seed=3, max_tokens=24, ignore_eos=True, raw_output=True)
    [with_min_p] = await model.generate([ids], min_p=min_p, **common)
    [without] = await model.generate([ids], **common)

    def below(out) -> list:
        probs = torch.softmax(ref_rows(model, ids, out) / temp, dim=-1)
        return [t for t, tok in enumerate(out) if probs[t, tok] < min_p * probs[t].max() * 0.999]

    assert below(with_min_p.outputs[0].token_ids) == []
    assert below(without.outputs[0].token_ids)  # without min_p such tokens do get sampled: the check can fail


async def test_logprobs_are_the_raw_log_softmax_of_the_models_logits(any_model):
    model = any_model
    ids = prompt_ids(model, "The capital of France is")
    # temperature and a penalty change the sampling distribution, not the reported (raw) logprobs
    [got] = await model.generate([ids], temperature=0.7, repetition_penalty=1.2, seed=1, max_tokens=12,
                                 ignore_eos=True, logprobs=4, raw_output=True)
    c = got.outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 12
    ref = torch.log_softmax(ref_rows(model, ids, c.token_ids), dim=-1)
    for t, (token, step) in enumerate(zip(c.token_ids, c.logprobs)):
        top = torch.topk(ref[t], 4)
        assert set(step) == {token, *top.indices.tolist()}
        for tid, lp in step.items():
            assert abs(lp.logprob - float(ref[t, tid])) < 1e-4, (t, tid, lp.logprob, float(ref[t, tid]))
            assert lp.decoded_token == model.tokenizer.decode([tid])
        assert [step[i].rank for i in top.indices.tolist()] == [1, 2, 3, 4]
        assert step[token].rank == int((ref[t] >= ref[t, token]).sum())
    want = sum(float(ref[t, tok]) for t, tok in enumerate(c.token_ids))
    assert abs(c.cumulative_logprob - want) < 1e-3
    [zero] = await model.generate([ids], temperature=0.0, max_tokens=4, logprobs=0, raw_output=True)
    assert [list(step) for step in zero.outputs[0].logprobs] == [[t] for t in zero.outputs[0].token_ids]
    [none] = await model.generate([ids], temperature=0.0, max_tokens=4, raw_output=True)
    assert none.outputs[0].logprobs is None and none.outputs[0].cumulative_logprob is None


async def test_raw_output_is_shaped_like_vllms(tiny):
    model = tiny
    text = "Hello there, how are"
    ids = [5, 17, 42, 9]
    outs = await model.generate([text, ids], temperature=1.0, seed=2, n=2, max_tokens=6, ignore_eos=True,
                                raw_output=True)
    assert [type(o) for o in outs] == [RequestOutput, RequestOutput]
    assert outs[0].prompt == text and outs[1].prompt is None
    assert outs[0].prompt_token_ids == prompt_ids(model, text) and outs[1].prompt_token_ids == ids
    for o in outs:
        assert o.finished and [c.index for c in o.outputs] == [0, 1] and isinstance(o.request_id, str)
        for c in o.outputs:
            assert isinstance(c, CompletionOutput) and len(c.token_ids) == 6 and c.finish_reason == "length"
            assert c.text == model.tokenizer.decode(c.token_ids, skip_special_tokens=True)
            assert c.cumulative_logprob is None and c.logprobs is None
    # chat: the rendered prompt, and the generated text without the prefill
    prefill = YES_NO + [{"role": "assistant", "content": "Hello there"}]
    opts = {"continue_final_message": True, "add_generation_prompt": False}
    [reply] = await model.chat(prefill, temperature=0.0, max_tokens=6, chat_options=opts)
    [raw], [handle] = await model.chat(prefill, temperature=0.0, max_tokens=6, chat_options=opts, raw_output=True,
                                       capture_layers=[1])
    rendered = model.tokenizer.apply_chat_template(prefill, tokenize=False, continue_final_message=True)
    assert raw.prompt == rendered and raw.outputs[0].text == reply.generated and not raw.outputs[0].text.startswith("Hello")
    assert raw.outputs[0].token_ids == reply.token_ids and handle.hidden(1).shape[0] == len(handle.token_ids)


async def test_n_samples_are_seeded_per_sample_and_prompt_major(tiny):
    model = tiny
    params = dict(temperature=1.0, seed=11, max_tokens=10, ignore_eos=True)
    texts = await model.generate("The quick brown", n=3, **params)
    assert len(texts) == 3 and len(set(texts)) > 1
    assert await model.generate("The quick brown", n=3, **params) == texts  # reproducible
    for j in range(3):  # sample j is the single request with seed + j
        assert await model.generate("The quick brown", **{**params, "seed": 11 + j}) == [texts[j]]
    chats = [YES_NO, [{"role": "user", "content": "Name three colours."}]]
    replies = await model.chat(chats, n=2, **params)
    assert len(replies) == 4
    for i, chat in enumerate(chats):
        for j in range(2):
            [solo] = await model.chat(chat, **{**params, "seed": 11 + j})
            assert replies[2 * i + j].token_ids == solo.token_ids
    greedy = await model.generate("The quick brown", n=2, temperature=0.0, max_tokens=8)
    assert greedy[0] == greedy[1]
    replies, handles = await model.chat(chats, n=2, capture_layers=[2], **params)
    assert [h.generated_token_ids for h in handles] == [r.token_ids for r in replies]
    with pytest.raises(wb.ValidationError, match="n=2"):
        async for _ in model.stream_chat(YES_NO, n=2, max_tokens=4):
            pass
