"""Steering evaluation: the offline judge validated on texts of known quality, vector methods, auto choice."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

import workbench as wb
from workbench.evaluation import (
    TUNING_PROMPTS, Concept, OfflineJudge, OpenAIJudge, _baselines, best_steering, distinct_n, evaluate_steering,
    harmonic_mean, parse_rating,
)
from workbench.features.concepts import METHODS, fit_steering_direction, library_data
from workbench.lens import Unembedding

PROMPTS = TUNING_PROMPTS[:3]
PIRATE_TOKYO = ("Arr, matey! Tokyo be a grand port fer any sailor: climb Tokyo Tower to spy the harbour, then "
                "plunder the fish market o' Tsukiji fer the finest treasure o' the sea, ye scallywag!")


# ---------------------------------------------------------------------------------- pure logic
def test_distinct_n_and_harmonic_mean():
    assert distinct_n("a b c d", 2) == 1.0 and distinct_n("ye mates ye mates ye mates", 2) == 0.4
    assert distinct_n("", 3) == 1.0
    assert harmonic_mean(2.0, 2.0, 2.0) == 2.0 and harmonic_mean(1.0, 2.0, 0.0) == 0.0
    assert math.isclose(harmonic_mean(1.0, 2.0, 2.0), 3 / (1 + 0.5 + 0.5))
    assert math.isnan(harmonic_mean(1.0, float("nan"), 2.0))


def test_parse_rating():
    assert parse_rating("Rating: [[2]]") == 2.0 and parse_rating("[[ 0 ]] because") == 0.0
    assert parse_rating("Rating: 1") == 1.0 and parse_rating("I would give it a 1.") == 1.0
    assert math.isnan(parse_rating("seven")) and math.isnan(parse_rating("")) and parse_rating("[[7]] 2") == 2.0


def test_every_method_recovers_a_planted_direction_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(64, generator=g)
    d = d / d.norm()
    noise_axis = torch.nn.functional.normalize(torch.randn(64, generator=g), dim=0)  # an axis both sides vary along
    def side(n, shift):
        return torch.randn(n, 64, generator=g) * 0.3 + torch.randn(n, 1, generator=g) * 1.0 * noise_axis + shift * d
    pos, neg = side(16, 2.0), side(16, 0.0)
    for method in METHODS:
        got = fit_steering_direction(method, pos, neg)
        assert torch.equal(got, fit_steering_direction(method, pos.clone(), neg.clone())), method  # same data, same vector
        assert abs(float(got.norm()) - 1.0) < 1e-5
        assert float(got @ d) > 0.5, (method, float(got @ d))  # points towards the positives' shift
    # the reference formulas, written here: CAA = mean paired difference, PCA = top right singular vector
    caa = (pos - neg).mean(0)
    assert torch.allclose(fit_steering_direction("caa", pos, neg), caa / caa.norm(), atol=1e-5)
    v = torch.linalg.svd((pos - neg).double()).Vh[0].float()
    assert torch.allclose(fit_steering_direction("pca", pos, neg).abs(), v.abs(), atol=1e-4)
    with pytest.raises(wb.ValidationError, match="method 'magic' is unknown"):
        fit_steering_direction("magic", pos, neg)


def test_the_unembedding_gives_the_models_own_logits(tiny, tiny_dir):
    ids = tiny.tokenizer("Pirates sail the seven seas", add_special_tokens=True)["input_ids"]
    last = tiny.layer_count - 1
    [acts] = asyncio.run(tiny.encode([ids], [last], steering=wb.SteeringSpec()))
    with torch.no_grad():
        want = tiny.hf_model(input_ids=torch.tensor([ids])).logits[0].float()
    for lens in (Unembedding.of(tiny), Unembedding.from_folder(tiny_dir)):
        got = lens.logits(acts[last])
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max())), float((got - want).abs().max())


# ---------------------------------------------------------------------------------- the offline judge, validated
@pytest.fixture(scope="module")
def judged(default_model):
    """Scores of texts whose quality is known, for the pirate concept on three prompts."""
    m = default_model
    base = asyncio.run(_baselines(m, PROMPTS, wb.evaluation.DEFAULT_SAMPLING))
    pirate = next(c for c in library_data()["concepts"] if c["id"] == "pirate")
    rng = random.Random(1)

    def shuffled(text):
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    cases = {
        "baseline": [base[p] for p in PROMPTS],
        "concept examples": pirate["positive"][:3],
        "shuffled": [shuffled(base[p]) for p in PROMPTS],
        "loop": ["Arr matey, arr matey, arr matey, arr matey, arr matey, arr matey, arr matey, arr matey."] * 3,
        "other prompt's reply": [base[PROMPTS[(i + 1) % 3]] for i in range(3)],
    }
    judge = OfflineJudge()
    out = {}
    for name, replies in cases.items():
        out[name] = asyncio.run(judge.judge(m, Concept.of(m.features["concept/pirate"]), PROMPTS, replies, base))
    styled = asyncio.run(judge.judge(m, Concept.of(m.features["concept/pirate"]), [PROMPTS[0]] * 3,
                                     [PIRATE_TOKYO, base[PROMPTS[0]], pirate["positive"][4]], base))
    return out, styled


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_the_offline_judge_scores_texts_of_known_quality_as_expected(judged):
    out, _ = judged
    assert mean(out["baseline"], "concept") <= 0.3
    assert mean(out["baseline"], "instruction") >= 1.8 and mean(out["baseline"], "fluency") >= 1.5
    assert mean(out["concept examples"], "concept") >= 1.5
    assert mean(out["shuffled"], "fluency") <= 0.4 < mean(out["baseline"], "fluency")
    assert mean(out["loop"], "fluency") == 0.0
    assert mean(out["other prompt's reply"], "instruction") <= 0.6
    for rows in out.values():
        assert all(0.0 <= r[k] <= 2.0 for r in rows for k in ("concept", "instruction", "fluency"))


def test_a_styled_answer_beats_a_plain_one_and_an_off_topic_styled_text(judged):
    _, (styled, plain, off_topic) = judged
    hm = [harmonic_mean(r["concept"], r["instruction"], r["fluency"]) for r in (styled, plain, off_topic)]
    assert hm[0] > hm[1] and hm[0] > hm[2], hm
    assert styled["concept"] > plain["concept"] and styled["instruction"] > off_topic["instruction"]


# ---------------------------------------------------------------------------------- evaluate / best
def test_evaluate_steering_rows_and_strength_zero_is_the_baseline(default_model):
    f = default_model.features["concept/pirate"]
    df = asyncio.run(evaluate_steering(default_model, f, PROMPTS[:2], layers=[f.layer], strengths=[0.0, 0.45]))
    assert len(df) == 4 and set(df.columns) >= {"prompt", "layer", "strength", "reply", "concept", "instruction",
                                                "fluency", "hm", "nll", "distinct_1", "distinct_2", "distinct_3"}
    base = asyncio.run(_baselines(default_model, PROMPTS[:2], wb.evaluation.DEFAULT_SAMPLING))
    zero = df[df.strength == 0.0]
    assert list(zero.reply) == [base[p] for p in PROMPTS[:2]]  # strength 0 adds nothing
    by = df.groupby("strength")[["concept", "hm"]].mean()
    assert by.loc[0.45, "concept"] > by.loc[0.0, "concept"]  # the recommended strength expresses the concept
    for h, row in zip(df.hm, df.itertuples()):
        assert math.isclose(h, harmonic_mean(row.concept, row.instruction, row.fluency))
    with pytest.raises(wb.ValidationError, match="give concept="):
        asyncio.run(evaluate_steering(default_model, wb.SteeringSpec(), PROMPTS[:1]))


def test_best_steering_picks_the_cell_with_the_highest_mean_score(default_model):
    f = default_model.features["concept/pirate"]
    best = asyncio.run(best_steering(default_model, f, PROMPTS[:2], layers=[f.layer, f.layer + 3],
                                     strengths=[0.0, 0.4, 1.2]))
    table = best.table
    top = table.hm.max()
    assert best.hm == top and table[(table.layer == best.layer) & (table.strength == best.strength)].hm.iloc[0] == top
    assert best.strength == 0.4  # 0 does not express the concept; 1.2 x the residual norm is gibberish
    [(layer, ops)] = best.spec.layers.items()
    assert layer == best.layer and isinstance(ops.operations[0], wb.AddSpec)
    fig = wb.plots.steering_scores(best.sweep)
    assert len(fig.data) == 2 * 4 + 1


def test_add_concept_with_a_method_over_the_api(default_model):
    client = wb.Client(default_model)
    pirate = next(c for c in library_data()["concepts"] if c["id"] == "pirate")
    before = [f.id for f in default_model.features]
    try:
        got = {m: client.features.add_concept(f"pirates {m}", pirate["positive"], model="default", method=m)
               for m in ("mean_diff", "pca")}
        again = client.features.add_concept("pirates pca", pirate["positive"], model="default", method="pca")
        fs = default_model.features
        a, b, c = fs[got["mean_diff"].feature.id], fs[got["pca"].feature.id], fs[again.feature.id]
        assert got["pca"].method == "pca" and b.method == "pca" and a.method == "mean_diff"
        assert torch.equal(b.direction, c.direction) and not torch.equal(a.direction, b.direction)
        assert float(b.direction @ fs["concept/pirate"].direction) > 0.3  # still the pirate direction
        with pytest.raises(wb.APIValidationError):
            client.features.add_concept("x", ["y"], model="default", method="magic")
    finally:
        for fid in [f.id for f in default_model.features if f.id not in before]:
            default_model.features.remove(fid)


def test_the_openai_judge_asks_a_workbench_server(http_server, default_model):
    judge = OpenAIJudge(http_server, model="meta-llama/Llama-3.1-8B-Instruct", prefill=True)
    rows = asyncio.run(judge.judge(default_model, Concept("pirate speech"), PROMPTS[:2],
                                   ["Arr matey, Tokyo be grand.", "Bicycles have two wheels."], {}))
    assert len(rows) == 2
    values = [r[k] for r in rows for k in ("concept", "instruction", "fluency")]
    assert all(math.isnan(v) or 0.0 <= v <= 2.0 for v in values)
    assert sum(not math.isnan(v) for v in values) >= 3  # the prefill makes even the small model answer a number
    with pytest.raises(wb.ValidationError, match="answered 4"):
        asyncio.run(OpenAIJudge(http_server, model="no-such-model").judge(default_model, Concept("x"), ["p"], ["r"], {}))


async def test_the_auto_button_sets_the_dial_to_the_best_layer_and_strength(default_model):
    from widgets import SteeringDials

    pirate = default_model.features["concept/pirate"]
    before = [f.id for f in default_model.features]
    dials = SteeringDials(default_model)
    try:
        dials.add_feature(pirate, strength=0.1)
        dials.rows[0].auto.click()
        await dials.wait()
        got = dials.last_auto
        assert dials.error.value == "" and got is not None
        assert got.hm == max(r.hm for r in got.table) and len(got.table) == 30  # 3 layers x 5 strengths x 2 penalties
        assert dials.repetition_penalty == got.repetition_penalty in (1.0, 1.3)
        [row] = dials.rows
        assert row.slider.value == got.strength and row.key == got.feature.id
        assert default_model.features[row.key].layer == got.layer  # a feature at the chosen layer is dialled
        [iv] = dials.variant.interventions
        assert iv.strength == got.strength and f"layer {got.layer}" in dials.summary.value
    finally:
        for fid in [f.id for f in default_model.features if f.id not in before]:
            default_model.features.remove(fid)
