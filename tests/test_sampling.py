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
