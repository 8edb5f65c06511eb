"""Concept directions from contrastive examples, and the default concept library.

A concept is trained by difference of means: the mean residual (per example, over its tokens
but the first, which carries massive outliers) of the positive examples minus that of the
negative ones (the library's neutral sentences when none are given). Without an explicit layer
the concept takes, among a band of early-middle layers, the one whose direction separates the
two sides best (difference of mean projections over their pooled standard deviation). The band
is 20-30 % of the depth (layers 6-9 of the default model's 30): measured here, directions from
later layers separate better but steer worse (see NOTES on the default model).

>>> feature = await model.features.add_concept("Talking about volcanoes", positive=[...])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import torch

from ..chat import check_chat_options, render_chat
from ..errors import EmptyInputError, ValidationError
from .featureset import Feature, FeatureSet

LIBRARY_VERSION = 1
_CHUNK = 32


def library_data() -> dict:
    """The shipped concept library: ``{"neutral": [...], "concepts": [{"id", "label", "positive"}]}``."""
    return json.loads(resources.files("workbench").joinpath("data/concepts.json").read_text(encoding="utf-8"))


def candidate_layers(model) -> list[int]:
    lo = max(0, round(0.2 * model.layer_count))
    hi = max(lo, min(model.layer_count - 1, round(0.3 * model.layer_count)))
    return list(range(lo, hi + 1))


def _prompt_ids(model, example) -> list[int]:
    if isinstance(example, str):
        if not example.strip():
            raise EmptyInputError("concept examples must be non-empty strings or conversations")
        return model.tokenizer(example, add_special_tokens=True)["input_ids"]
    if isinstance(example, (list, tuple)) and example and isinstance(example[0], dict):
        return render_chat(model.tokenizer, list(example), check_chat_options({"add_generation_prompt": False})).token_ids
    raise ValidationError(f"a concept example is a string or a conversation (list of messages), got {example!r}")


async def example_stats(model, examples, layers, desc: str | None = None):
    """Per example and layer, the sum of residuals over its tokens but the first; token counts; per-token norms."""
    from tqdm.auto import tqdm

    ids = [_prompt_ids(model, e) for e in examples]
    sums = torch.zeros(len(ids), len(layers), model.hidden_size)
    counts = torch.zeros(len(ids))
    norms = [[] for _ in layers]
    bar = tqdm(total=len(ids), desc=desc, unit="text", disable=desc is None, leave=False)
    for start in range(0, len(ids), _CHUNK):
        batch = ids[start:start + _CHUNK]
        outs = await model.encode(batch, layers, steering=_empty())
        for k, out in enumerate(outs):
            for j, layer in enumerate(layers):
                h = out[layer]
                h = h[1:] if h.shape[0] > 1 else h
                sums[start + k, j] = h.sum(0)
                norms[j].append(h.norm(dim=-1))
            counts[start + k] = max(out[layers[0]].shape[0] - 1, 1)
        bar.update(len(batch))
    bar.close()
    return sums, counts, [torch.cat(n) for n in norms]


def _empty():
    from ..steering import SteeringSpec

    return SteeringSpec()


def fit_direction(pos_sums, pos_counts, neg_sums, neg_counts, layers, neutral=None):
    """Pick the layer and direction that separate positives from negatives best.

    Returns ``(layer, unit direction, separation, pos token mean, neg token mean)``.
    """
    best = None
    pos_means = pos_sums / pos_counts[:, None, None]
    neg_means = neg_sums / neg_counts[:, None, None]
    for j, layer in enumerate(layers):
        d = pos_means[:, j].mean(0) - neg_means[:, j].mean(0)
        if float(d.norm()) == 0.0:
            continue
        u = d / d.norm()
        pp, pn = pos_means[:, j] @ u, neg_means[:, j] @ u
        pooled = (pp.var(unbiased=False) + pn.var(unbiased=False)) / 2
        sep = float((pp.mean() - pn.mean()) / torch.sqrt(pooled + 1e-6))
        if best is None or sep > best[2]:
            pos_tok = pos_sums[:, j].sum(0) / pos_counts.sum()
            best = (layer, u, sep, pos_tok)
    if best is None:
        raise ValidationError("the positive and negative examples give identical means; use different examples")
    return best


async def neutral_stats(model, layers) -> dict:
    """``{layer: (token mean [hidden], median token norm)}`` on the library's neutral sentences (cached on the model)."""
    cache = model.__dict__.setdefault("_neutral_stats", {})
    missing = [l for l in layers if l not in cache]
    if missing:
        sums, counts, norms = await example_stats(model, library_data()["neutral"], missing)
        for j, layer in enumerate(missing):
            cache[layer] = (sums[:, j].sum(0) / counts.sum(), float(norms[j].median()))
    return {l: cache[l] for l in layers}


async def train_concept(model, label: str, positive, negative=None, layer: int | None = None,
                        feature_id: str | None = None, index_in_sae: int = 0) -> Feature:
    """A concept feature from contrastive examples (texts or conversations)."""
    if not isinstance(label, str) or not label.strip():
        raise ValidationError(f"a concept needs a non-empty label, got {label!r}")
    if not positive:
        raise EmptyInputError("add_concept needs at least one positive example")
    layers = [model.check_layer(layer)] if layer is not None else candidate_layers(model)
    neutral = await neutral_stats(model, layers)
    ps, pc, _ = await example_stats(model, list(positive), layers, desc=f"concept {label[:30]!r}")
    if negative:
        ns, nc, _ = await example_stats(model, list(negative), layers)
    else:
        ns, nc, _ = await example_stats(model, library_data()["neutral"], layers)
    chosen, u, sep, pos_tok = fit_direction(ps, pc, ns, nc, layers)
    mean_neutral, median_norm = neutral[chosen]
    bias = float(mean_neutral @ u)
    span = max(float(pos_tok @ u) - bias, 1e-3)
    return Feature(id=feature_id or f"concept/{_slug(label)}", label=label, layer=chosen, index_in_sae=index_in_sae,
                   direction=u, scale=median_norm, kind="concept", bias=bias, span=span)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48] or "concept"


def _cache_dir(model):
    from ..models import workbench_home

    data = json.dumps(library_data(), sort_keys=True)
    key = hashlib.sha256(f"{LIBRARY_VERSION}|{model.model_name}|{model.hidden_size}|{model.layer_count}|{data}".encode())
    slug = _slug(model.model_name.rsplit("/", 1)[-1])[:32]
    return workbench_home() / "concept-library" / f"{slug}-{key.hexdigest()[:16]}"


async def concept_library(model, retrain: bool = False) -> FeatureSet:
    """The default concept library for ``model``: trained on first use (progress bar), then loaded from cache."""
    from tqdm.auto import tqdm

    path = _cache_dir(model)
    if (path / "features.json").is_file() and not retrain:
        return FeatureSet.load(path)
    data = library_data()
    layers = candidate_layers(model)
    neutral = await neutral_stats(model, layers)
    texts, owner = [], []
    for ci, concept in enumerate(data["concepts"]):
        texts += concept["positive"]
        owner += [ci] * len(concept["positive"])
    sums, counts, _ = await example_stats(model, texts, layers, desc="Training the concept library (one time)")
    ns, nc, _ = await example_stats(model, data["neutral"], layers)
    owner_t = torch.tensor(owner)
    fs = FeatureSet(name="concepts")
    for ci, concept in enumerate(tqdm(data["concepts"], desc="fitting directions", leave=False)):
        sel = owner_t == ci
        chosen, u, sep, pos_tok = fit_direction(sums[sel], counts[sel], ns, nc, layers)
        mean_neutral, median_norm = neutral[chosen]
        bias = float(mean_neutral @ u)
        fs.add(Feature(id=f"concept/{concept['id']}", label=concept["label"], layer=chosen, index_in_sae=ci,
                       direction=u, scale=median_norm, kind="concept", bias=bias,
                       span=max(float(pos_tok @ u) - bias, 1e-3)))
    fs.save(path)
    return fs


RECOMMENDED_STRENGTH = (0.3, 0.7)
"""Strengths (mode add) that visibly steer the default model with library concepts; 0.5 is a good start.

Measured: around 1.0 and above replies turn to gibberish (the added vector is as long as a typical
residual)."""

__all__ = ["concept_library", "train_concept", "candidate_layers", "RECOMMENDED_STRENGTH"]
