"""The per-request sampler and SamplingParams conversions."""

import pytest
import torch

import workbench as wb
from workbench.sampling import make_generator, sample_token


def _logits():
    return torch.tensor([0.1, 2.0, 1.9, -1.0, 0.5])


def test_greedy_and_filters():
    greedy = wb.SamplingParams(temperature=0.0)
    assert sample_token(_logits(), greedy, None, None) == 1
    for params in (wb.SamplingParams(temperature=1.0, top_k=1, seed=0), wb.SamplingParams(temperature=1.0, top_p=0.01, seed=0)):
        gen = make_generator(params, "cpu")
        assert {sample_token(_logits(), params, gen, None) for _ in range(50)} == {1}
    top2 = wb.SamplingParams(temperature=5.0, top_k=2, seed=0)
    gen = make_generator(top2, "cpu")
    assert {sample_token(_logits(), top2, gen, None) for _ in range(200)} == {1, 2}


def test_repetition_penalty_moves_away_from_seen_tokens():
    params = wb.SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample_token(_logits(), params, None, torch.tensor([1])) == 2


def test_seeded_generators_repeat():
    params = wb.SamplingParams(temperature=1.0, seed=7)
    draws = [[sample_token(_logits(), params, g, None) for _ in range(30)] for g in
             (make_generator(params, "cpu"), make_generator(params, "cpu"))]
    assert draws[0] == draws[1]


def test_from_any_accepts_foreign_objects_and_kwargs():
    class VllmLike:
        temperature, top_p, top_k, max_tokens, seed, stop = 0.5, 0.9, -1, None, 3, "END"
    p = wb.SamplingParams.from_any(VllmLike())
    assert (p.temperature, p.top_k, p.max_tokens, p.stop) == (0.5, 0, 16, ["END"])
    assert wb.SamplingParams.from_any({"max_tokens": 5}, temperature=0).max_tokens == 5
    with pytest.raises(wb.ValidationError, match="top_k=-2 is out of range"):
        wb.SamplingParams(top_k=-2)
    with pytest.raises(wb.ValidationError, match="stop must be a list of non-empty strings"):
        wb.SamplingParams(stop=[""])


def test_vllm_sampling_params_are_honoured_or_refused_by_name():
    """Every vLLM SamplingParams field is carried over or, away from vLLM's default, refused naming it."""
    import vllm
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    theirs = vllm.SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, min_tokens=2, max_tokens=9, logprobs=3, seed=4, stop="END", stop_token_ids=[7],
        ignore_eos=True, skip_special_tokens=False, output_kind=RequestOutputKind.DELTA, extra_args={"x": 1})
    ours = wb.SamplingParams.from_any(theirs)
    assert ours == wb.SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=0, min_p=0.1, presence_penalty=0.5,
                                     frequency_penalty=-0.5, repetition_penalty=1.1, min_tokens=2, max_tokens=9,
                                     logprobs=3, seed=4, stop=["END"], stop_token_ids=[7], ignore_eos=True)
    refused = {"logit_bias": {1: 2.0}, "allowed_token_ids": [1, 2], "prompt_logprobs": 1, "bad_words": ["x"],
               "include_stop_str_in_output": True, "logprob_token_ids": [3], "thinking_token_budget": 4,
               "structured_outputs": StructuredOutputsParams(regex="a+")}
    for name, value in refused.items():
        with pytest.raises(wb.ValidationError, match=rf"SamplingParams\.{name}="):
            wb.SamplingParams.from_any(vllm.SamplingParams(**{name: value}))
    assert wb.SamplingParams.from_any(vllm.SamplingParams()) == wb.SamplingParams()


def test_new_options_are_validated_with_vllms_ranges():
    for bad, match in [({"presence_penalty": 2.5}, "presence_penalty=2.5 is out of range"),
                       ({"frequency_penalty": -3}, "frequency_penalty=-3 is out of range"),
                       ({"min_p": 1.5}, "min_p=1.5 is out of range"), ({"n": 0}, "n=0 is out of range"),
                       ({"min_tokens": 20, "max_tokens": 10}, "min_tokens=20 is over max_tokens=10"),
                       ({"logprobs": -2}, "logprobs=-2 is out of range")]:
        with pytest.raises(wb.ValidationError, match=match):
            wb.SamplingParams(**bad)
    assert wb.SamplingParams(logprobs=True).logprobs == 1  # vLLM reads True as 1
    p = wb.SamplingParams(n=3, seed=5)
    assert [(s.n, s.seed) for s in map(p.for_sample, range(3))] == [(1, 5), (1, 6), (1, 7)]
    assert wb.SamplingParams(n=2).for_sample(1).seed is None
