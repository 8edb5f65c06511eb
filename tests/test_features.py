"""Feature sets, SAEs in SAELens layout, Variant compilation, search (fast tests on the tiny model)."""

import json

import pytest
import torch

import workbench as wb
from workbench.features.search import LabelIndex

from conftest import same_logits, top_logits


def write_sae(path, d_in=64, d_sae=128, architecture="jumprelu", hook="blocks.2.hook_resid_post", k=None, seed=0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.2, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.2, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if architecture == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": architecture, "hook_name": hook, "apply_b_dec_to_input": True}
    if k:
        cfg["activation_fn_kwargs"] = {"k": k}
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


def reference_encode(w, h, architecture, k=None):
    pre = (h - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if architecture == "jumprelu":
        return torch.where(pre > w["threshold"], pre, torch.zeros_like(pre))
    if architecture == "topk":
        out = torch.zeros_like(pre)
        vals, idx = pre.topk(k, dim=-1)
        return out.scatter(-1, idx, vals.clamp(min=0))
    return pre.clamp(min=0)


@pytest.mark.parametrize("architecture, k", [("jumprelu", None), ("standard", None), ("topk", 8)])
def test_sae_loads_and_matches_reference(tmp_path, architecture, k):
    w = write_sae(tmp_path / "sae", architecture=architecture, k=k)
    sae = wb.SAE.load(tmp_path / "sae")
    assert (sae.layer, sae.d_in, sae.d_sae) == (2, 64, 128)
    h = torch.randn(7, 64)
    acts = sae.encode(h)
    torch.testing.assert_close(acts, reference_encode(w, h, architecture, k))
    torch.testing.assert_close(sae.decode(acts), acts @ w["W_dec"] + w["b_dec"])
    if architecture == "topk":
        assert int((acts > 0).sum(-1).max()) <= 8


def test_hook_names_map_to_layers(tmp_path):
    write_sae(tmp_path / "pre", hook="blocks.3.hook_resid_pre")
    assert wb.SAE.load(tmp_path / "pre").layer == 2
    write_sae(tmp_path / "odd", hook="something_else")
    with pytest.raises(wb.ValidationError, match="pass layer= explicitly"):
        wb.SAE.load(tmp_path / "odd")
    assert wb.SAE.load(tmp_path / "odd", layer=1).layer == 1


def test_labels_file_and_mismatch(tmp_path):
    write_sae(tmp_path / "sae")
    labels = [{"index": 5, "description": "pirate talk"}, {"index": 9, "description": "French words", "maxActApprox": 3.0}]
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    fs = wb.FeatureSet.from_sae(tmp_path / "sae", labels=tmp_path / "labels.json")
    assert len(fs) == 128 and fs[5].label == "pirate talk" and fs[9].max_activation == 3.0
    assert fs[7].label == "feature 7"
    (tmp_path / "bad.json").write_text(json.dumps([{"index": 500, "description": "nope"}]))
    with pytest.raises(wb.ValidationError, match="index 500 does not exist in an SAE with 128 features"):
        wb.FeatureSet.from_sae(tmp_path / "sae", labels=tmp_path / "bad.json")
    (tmp_path / "worse.json").write_text("{not json")
    with pytest.raises(wb.ValidationError, match="cannot read labels file"):
        wb.FeatureSet.from_sae(tmp_path / "sae", labels=tmp_path / "worse.json")
    with pytest.raises(wb.ValidationError, match="not an SAE folder"):
        wb.FeatureSet.from_sae(tmp_path / "nowhere")


@pytest.fixture
async def sae_model(tiny, tmp_path):
    w = write_sae(tmp_path / "sae", d_in=tiny.hidden_size)
    fs = wb.FeatureSet.from_sae(tmp_path / "sae")
    previous = getattr(tiny, "_features", None)
    tiny.features = fs
    yield tiny, fs, w
    tiny._features = previous


async def test_sae_clamp_sets_the_encoded_value_and_keeps_the_error(sae_model):
    model, fs, w = sae_model
    f = 11
    base = (await model.encode(["Hello there, how are you?"], [2]))[0][2]
    variant = wb.Variant(model.model_name).add_intervention(f, 2.0, mode="clamp")
    steered = (await model.encode(["Hello there, how are you?"], [2], steering=variant))[0][2]
    target = 2.0 * fs[f].max_activation
    # reference: encode, set the latent, decode, add back the reconstruction error
    acts = reference_encode(w, base, "jumprelu")
    error = base - (acts @ w["W_dec"] + w["b_dec"])
    acts[:, f] = target
    expected = acts @ w["W_dec"] + w["b_dec"] + error
    torch.testing.assert_close(steered, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steered, base)


async def test_add_mode_uses_strength_units(sae_model):
    model, fs, w = sae_model
    f = fs[3]
    spec = wb.Variant(model.model_name).add_intervention(3, 0.5).to_steering_spec(model)
    [op] = spec.layers[2].operations
    torch.testing.assert_close(op.vector, 0.5 * f.max_activation * w["W_dec"][3])
    zero = wb.Variant(model.model_name).add_intervention(3, 0.0)
    assert await model.generate("Hello", max_tokens=6, temperature=0, steering=zero) == \
        await model.generate("Hello", max_tokens=6, temperature=0)


def test_variant_semantics_and_errors(tiny):
    v = wb.Variant("default")
    assert v.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct" and v == "default"
    v.add_intervention(3, 0.4).add_intervention(3, 0.6, mode="clamp")
    assert v.get_interventions() == [{"index_in_sae": 3, "strength": 0.6, "mode": "clamp"}]
    v.set([{"id": "a", "index_in_sae": 1}, {"id": "b", "index_in_sae": 2}], 0.3)
    assert len(v.interventions) == 3 and not v.reset().interventions
    with pytest.raises(wb.ValidationError, match="strength must be finite"):
        v.add_intervention(1, float("nan"))
    with pytest.raises(wb.ValidationError, match="mode 'boost' is not allowed; allowed: \\['add', 'clamp'\\]"):
        v.add_intervention(1, 0.5, mode="boost")
    with pytest.raises(wb.ValidationError, match="this Variant is for"):
        wb.Variant("default").to_steering_spec(tiny)


async def test_unknown_features_and_duplicates(sae_model):
    model, fs, _ = sae_model
    with pytest.raises(wb.UnknownFeatureError, match="no feature with index_in_sae 999; indices in this set: 0..127"):
        await model.generate("Hi", max_tokens=2, steering=wb.Variant(model.model_name).add_intervention(999, 0.5))
    with pytest.raises(wb.UnknownFeatureError, match="unknown feature id 'nope'"):
        fs.get("nope")
    with pytest.raises(wb.ValidationError, match="duplicate feature id"):
        fs.add(fs[0])


async def test_featureset_save_load_round_trip(sae_model, tmp_path):
    model, fs, w = sae_model
    again = wb.FeatureSet.load(fs.save(tmp_path / "saved"))
    assert [f.to_item() for f in again] == [f.to_item() for f in fs]
    h = torch.randn(4, model.hidden_size)
    torch.testing.assert_close(again.activations_from_hidden({2: h}), fs.activations_from_hidden({2: h}))


async def test_inspect_logits_contrast_on_sae_features(sae_model):
    model, fs, w = sae_model
    conv = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "How are you today?"}]
    top = await fs.inspect(conv, top_k=5, aggregation_method="max")
    acts = await fs.activations(conv, aggregation_method="max")
    assert len(acts) == len(fs) and top[0][1] == pytest.approx(max(acts))
    token_acts = await fs.token_activations(conv)
    assert top[0][1] == pytest.approx(float(token_acts.max()))
    freq = await fs.activations(conv, aggregation_method="frequency")
    assert all(0.0 <= x <= 1.0 for x in freq)
    logits = await fs.logits(conv, top_k=5)
    assert len(logits) <= 5 and list(logits.values()) == sorted(logits.values(), reverse=True)
    steered = await fs.logits(conv, top_k=5, interventions=[{"index_in_sae": 4, "strength": 8.0}])
    assert steered != logits
    # start_idx/end_idx are slice bounds, as ids[start_idx:end_idx]: clamped to the length, negatives from the end
    from workbench.features.inspection import _render

    ids = _render(model, conv)

    full = await top_logits(model, ids, 5)
    assert same_logits(logits, full) and same_logits(await fs.logits(conv, top_k=5, end_idx=10_000), full)
    assert same_logits(await fs.logits(conv, top_k=5, start_idx=-10**6, end_idx=len(ids) + 1), full)
    for start, end in ((None, -2), (-3, None), (2, 6)):
        expected = await top_logits(model, ids[start:end], 5)
        assert not same_logits(expected, full)   # the slice matters, so the check below can tell slices apart
        assert same_logits(await fs.logits(conv, top_k=5, start_idx=start, end_idx=end), expected), (start, end)
    for start, end in ((4, 2), (len(ids), None), (None, -len(ids)), (None, 0)):
        with pytest.raises(wb.ValidationError, match="empty; the next-token logits need at least one token"):
            await fs.logits(conv, start_idx=start, end_idx=end)
    with pytest.raises(wb.ValidationError, match="end_idx must be an integer"):
        await fs.logits(conv, end_idx=2.5)
    with pytest.raises(wb.ValidationError, match="aggregation_method 'median' is not allowed"):
        await fs.inspect(conv, aggregation_method="median")
    with pytest.raises(wb.EmptyInputError, match="dataset_2 is empty"):
        await fs.contrast([conv], [])
    add, remove = await fs.contrast([conv], [[{"role": "user", "content": "Pirates sail the seas"}]], 3, 3)
    assert len(add) == 3 and len(remove) == 3 and not {f.id for f in add} & {f.id for f in remove}


def test_lexical_fallback_ranks_by_word_overlap():
    ix = LabelIndex(["Speaking French", "Pirate speech and sailors", "Cooking recipes"], semantic=False)
    assert ix.search("roleplay as a pirate", 1)[0][0] == 1
    assert ix.search("speak french", 1)[0][0] == 0


def test_semantic_search_and_rerank():
    labels = ["Pirate speech: talking like a pirate", "Speaking French", "Formal business tone", "Jokes and humour"]
    ix = LabelIndex(labels)
    assert ix.semantic
    assert ix.search("roleplay as pirate", 1)[0][0] == 0
    assert ix.search("speak French", 1)[0][0] == 1
    assert ix.search("funny", 1)[0][0] == 3


def test_read_direction_is_the_shrunk_discriminant_and_discounts_shared_noise():
    from workbench.features.concepts import fit_read_direction

    g = torch.Generator().manual_seed(0)

    def sample(n, mean):
        # axis 1 varies a lot in both classes (a topic every text has some of); axis 0 carries the concept
        return torch.randn(n, 8, generator=g) * torch.tensor([0.3, 4.0, 1, 1, 1, 1, 1, 1]) + mean

    shift = torch.tensor([1.0, 2.0, 0, 0, 0, 0, 0, 0])
    pos, neg = sample(40, shift), sample(200, torch.zeros(8))
    r = fit_read_direction(pos, neg, shrinkage=0.3)
    # the reference: solve((1 - a) S + a tr(S)/d I, mean difference) with the within-class covariance S
    resid = torch.cat([pos - pos.mean(0), neg - neg.mean(0)]).double()
    s = resid.T @ resid / len(resid)
    ref = torch.linalg.solve(0.7 * s + 0.3 * s.trace() / 8 * torch.eye(8, dtype=s.dtype), (pos.mean(0) - neg.mean(0)).double())
    torch.testing.assert_close(r, (ref / ref.norm()).float())
    dom = pos.mean(0) - neg.mean(0)
    dom = dom / dom.norm()
    # held-out separation (difference of projected means over pooled std) is better along r than along the mean difference
    tp, tn = sample(400, shift), sample(400, torch.zeros(8))

    def separation(u):
        a, b = tp @ u, tn @ u
        return float((a.mean() - b.mean()) / ((a.var() + b.var()) / 2).sqrt())

    assert separation(r) > 2 * separation(dom)
    assert abs(float(r[0])) > abs(float(dom[0]))
    # nothing to whiten with one example a side: the difference of means
    one = fit_read_direction(pos[:1], neg[:1])
    torch.testing.assert_close(one, (pos[0] - neg[0]) / (pos[0] - neg[0]).norm())


def test_a_concept_reads_with_its_encoder_and_steers_with_its_direction(tmp_path):
    d = 16
    direction, encoder = torch.zeros(d), torch.zeros(d)
    direction[0], encoder[1] = 1.0, 1.0
    f = wb.Feature(id="c", label="c", layer=0, index_in_sae=0, direction=direction, encoder=encoder, scale=2.0,
                   bias=0.5, span=2.0)
    fs = wb.FeatureSet([f])
    h = torch.randn(3, d)
    torch.testing.assert_close(fs.activations_from_hidden({0: h})[:, 0], (h[:, 1] - 0.5) / 2.0)
    torch.testing.assert_close(fs.op_for(f, 0.5, "add").vector, 0.5 * 2.0 * direction)
    again = wb.FeatureSet.load(fs.save(tmp_path / "saved"))
    torch.testing.assert_close(again["c"].encoder, encoder)
    torch.testing.assert_close(again.activations_from_hidden({0: h}), fs.activations_from_hidden({0: h}))
    plain = wb.Feature(id="v", label="v", layer=0, index_in_sae=1, direction=direction)
    assert plain.read_direction() is direction
    with pytest.raises(wb.ValidationError, match="encoder and direction differ in size"):
        wb.FeatureSet([wb.Feature(id="x", label="x", layer=0, index_in_sae=0, direction=direction, encoder=torch.ones(3))])
    with pytest.raises(wb.ValidationError, match="encoder must be a finite 1-D vector"):
        wb.FeatureSet([wb.Feature(id="x", label="x", layer=0, index_in_sae=0, direction=direction,
                                  encoder=torch.full((d,), float("nan")))])
