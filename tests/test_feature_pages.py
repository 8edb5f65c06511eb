"""Feature pages on the default model: top contexts, histogram, promoted tokens, HTML; over both API transports."""

from __future__ import annotations

import asyncio
import html

import pytest
import torch

import workbench as wb
from workbench.features.featureset import FeatureSet
from workbench.features.pages import library_texts, render_feature_page

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
SHIP = "Arr matey, hoist the Jolly Roger and find the buried treasure, ye scallywags!"
CORPUS = ["The quarterly report was filed with the accounting department on Monday.", SHIP,
          "Preheat the oven to 180 degrees and grease the baking tin."]


@pytest.fixture(scope="module")
def pirate(default_model):
    [feature] = default_model.features.search("pirate", top_k=1)
    assert feature.id == "concept/pirate"
    return feature


@pytest.fixture(scope="module")
def page(default_model, pirate):
    return asyncio.run(default_model.features.page(pirate, corpus=CORPUS, top_n=12))   # no loop runs in a fixture


async def reference_activations(model, feature, text: str) -> tuple[list[int], torch.Tensor]:
    """Token ids and per-token activations of ``text``: one ``model.encode`` of the text alone."""
    ids = model.tokenizer(text, add_special_tokens=True)["input_ids"]
    [hidden] = await model.encode([text], [feature.layer])
    return ids, FeatureSet([feature]).activations_from_hidden({feature.layer: hidden[feature.layer]})[:, 0]


def test_concept_top_contexts_are_its_own_examples(page, pirate):
    top = page.top_contexts
    assert list(top.activation) == sorted(top.activation, reverse=True)
    piratey = (top.group == pirate.id) | ((top.source == "corpus") & (top.text_index == 1))   # its examples, SHIP
    examples = library_texts()[1].count(pirate.id)
    assert piratey.head(5).all()                                     # the five best texts are pirate texts
    assert piratey.head(10).sum() == examples + 1                    # and all of them are in the top 10
    assert top.group.iloc[0] == pirate.id and top.group[top.source == "corpus"].isna().all()
    assert page.feature == pirate.to_item() and page.text_count == len(library_texts()[0]) + len(CORPUS)


async def test_corpus_text_max_token_is_the_reference_argmax(page, pirate, default_model):
    rows = page.top_contexts[page.top_contexts.source == "corpus"]
    assert list(rows.text_index) == [1]                              # the pirate line, not the report or the recipe
    row = rows.iloc[0]
    ids, acts = await reference_activations(default_model, pirate, SHIP)
    pos = 1 + int(acts[1:].argmax())                                # the first token is never scored
    assert row.position == pos and row.token == default_model.tokenizer.decode([ids[pos]])
    assert row.activation == pytest.approx(float(acts[pos]), rel=1e-3, abs=1e-3)
    window = range(row.context_start, row.context_start + len(row.context_tokens))
    assert row.context_start == max(0, pos - 12) and window.stop == min(len(ids), pos + 13)
    assert row.context_tokens == [default_model.tokenizer.decode([ids[p]]) for p in window]
    got = [float("nan") if a is None else a for a in row.context_activations]
    want = [float("nan") if p == 0 else float(acts[p]) for p in window]
    assert got == pytest.approx(want, rel=1e-3, abs=1e-3, nan_ok=True)


def test_histogram_counts_every_scored_token(page, default_model):
    texts = library_texts()[0] + CORPUS
    tokens = sum(len(default_model.tokenizer(t, add_special_tokens=True)["input_ids"]) - 1 for t in texts)
    assert sum(page.histogram.counts) == page.token_count == tokens
    edges = page.histogram.edges
    assert len(page.histogram.counts) == 30 and len(edges) == 31 and edges == sorted(edges)
    assert edges[-1] == pytest.approx(page.top_contexts.activation.max())


def test_promoted_tokens_are_the_lens_of_the_direction(page, pirate, default_model):
    from workbench.lens import direction_tokens

    lens = direction_tokens(default_model, pirate, top_k=20)
    assert list(page.promoted.token) == list(lens.promoted.token)
    assert list(page.suppressed.token) == list(lens.suppressed.token)


async def test_second_page_at_a_layer_reuses_the_library(default_model, pirate):
    import time

    await default_model.features.page(pirate, top_n=1)
    t0 = time.perf_counter()
    again = await default_model.features.page(pirate.id, corpus=["Ahoy!"], top_n=3)
    assert time.perf_counter() - t0 < 5.0 and len(again.top_contexts) == 3   # only "Ahoy!" was encoded


async def test_bad_arguments_name_the_value(default_model, pirate):
    fs = default_model.features
    with pytest.raises(wb.ValidationError, match="top_n must be an integer >= 1"):
        await fs.page(pirate, top_n=0)
    with pytest.raises(wb.EmptyInputError, match=r"corpus\[1\] is empty"):
        await fs.page(pirate, corpus=["fine", "  "])
    with pytest.raises(wb.EmptyInputError, match="nothing to read"):
        await fs.page(pirate, include_library=False)
    with pytest.raises(wb.UnknownFeatureError):
        await fs.page("concept/no-such-thing")


@pytest.fixture(scope="module", params=["inprocess", "http"])
def client(request, default_model):
    if request.param == "inprocess":
        return wb.AsyncClient(default_model, aliases=[LLAMA])
    return wb.AsyncClient(base_url=request.getfixturevalue("http_server"))


async def test_api_page_is_the_engine_page(client, page, pirate):
    r = await client.features.page(pirate.id, model=LLAMA, corpus=CORPUS, top_n=12)
    assert r.object == "feature.page" and r.feature.id == pirate.id
    want, got = page.to_dict(), r.model_dump()
    assert (got["text_count"], got["token_count"], got["histogram"]["counts"]) == \
        (want["text_count"], want["token_count"], want["histogram"]["counts"])
    same = ("text_index", "source", "group", "position", "token", "context_start", "context_tokens")
    assert [{k: c[k] for k in same} for c in got["contexts"]] == [{k: c[k] for k in same} for c in want["contexts"]]
    for a, b in zip(got["contexts"], want["contexts"]):   # a batch may be split differently: float noise only
        assert a["activation"] == pytest.approx(b["activation"], rel=1e-4, abs=1e-4)
        assert [x or 0.0 for x in a["context_activations"]] == \
            pytest.approx([x or 0.0 for x in b["context_activations"]], rel=1e-4, abs=1e-4)
    assert got["promoted"] == want["promoted"] and got["suppressed"] == want["suppressed"]
    assert render_feature_page(got) == r.to_html()          # what the widgets draw, from the response alone
    for c in want["contexts"]:
        assert html.escape(c["token"], quote=True) in r.to_html()


def test_sync_client_page(default_model, pirate):
    r = wb.Client(default_model).features.page(pirate, model="default", corpus=SHIP, top_n=2, window=2, bins=5,
                                                 include_library=False)
    assert [c.source for c in r.contexts] == ["corpus"] and len(r.contexts[0].context_tokens) <= 5
    assert len(r.histogram.counts) == 5 and sum(r.histogram.counts) == r.token_count


async def test_html_escapes_text_and_has_no_script(default_model, pirate):
    evil = "<script>alert('arr')</script> Arr matey, ye scurvy dog & <b>bold</b> pirate!"
    page = await default_model.features.page(pirate, corpus=[evil], include_library=False)
    out = page._repr_html_()
    assert "<script" not in out.lower() and "<b>bold" not in out
    assert "&lt;" in out and "&amp;" in out
    top = page.top_contexts.token[0].replace("\n", "\u21b5")
    assert f"<b>{html.escape(top, quote=True)}</b>" in out                # the max token is bold
