"""Concept directions from contrastive examples (the default concept library built from them: library.py).

A concept is trained by difference of means: the mean residual (per example, over the tokens of
its content, placed as an assistant reply inside the chat template) of the positive examples
minus that of the negative ones (by default the library's neutral sentences and the other
concepts' examples). That is the direction steering adds.

Reading a concept (inspect, activations, contrast) uses a second direction, as an SAE reads with
its encoder and writes with its decoder: Fisher's discriminant, the difference of means whitened
by the shrunk within-class covariance of the examples. The difference of means also points along
whatever else the positives share and the residual stream varies along anyway (the humour
direction read plain replies about as high as held-out jokes); whitening discounts those axes.
Measured on the library (benchmarks/concept_readout.py, held-out examples): the right concept
first for 40 % of them reading with the difference of means, 90 % with the discriminant (top 5:
76 % and 99 %).

Without an explicit layer the concept takes, among a band of early-middle layers, the one whose
direction separates the two sides best (difference of mean projections over their pooled
standard deviation). The band is 20-25 % of the depth (layers 6-7 of the default model's 30):
measured here (a strength x layer sweep of the pirate concept on two prompts), directions from
later layers separate better but their steering turns to gibberish at lower strengths (layer 9
at 0.5, layer 7 only at 0.6).

>>> feature = await model.features.add_concept("Talking about volcanoes", positive=[...])  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources

import torch

from ..chat import check_chat_options, render_chat
from ..errors import EmptyInputError, ValidationError
from .feature import Feature

LIBRARY_VERSION = 2   # 2: concepts carry a read direction (encoder)
_CHUNK = 32
READ_SHRINKAGE = 0.3
"""Weight of the scaled identity in the within-class covariance of :func:`fit_read_direction`.

Held-out accuracy on the library is flat from 0.1 to 0.6 (benchmarks/concept_readout.py); the
Ledoit-Wolf estimate (~0.01 here) shrinks too little for reading: 81 % top-1 against 90 %."""


def library_data() -> dict:
    """The shipped concept library: ``{"neutral": [...], "concepts": [{"id", "label", "positive"}]}``."""
    return json.loads(resources.files("workbench").joinpath("data/concepts.json").read_text(encoding="utf-8"))


def candidate_layers(model) -> list[int]:
    lo = max(0, round(0.2 * model.layer_count))
    hi = max(lo, min(model.layer_count - 1, int(0.25 * model.layer_count)))
    return list(range(lo, hi + 1))


_ASK = "Please say something."


def example_tokens(model, example) -> tuple[list[int], int, int]:
    """Token ids of an example in chat context, and the ``[start, end)`` range its content occupies.

    A text becomes the assistant's reply to a fixed request, so directions are learned where they
    are used: in replies inside the chat template. A conversation contributes its last message.
    """
    if isinstance(example, str):
        if not example.strip():
            raise EmptyInputError("concept examples must be non-empty strings or conversations")
        conv = [{"role": "user", "content": _ASK}, {"role": "assistant", "content": example}]
    elif isinstance(example, (list, tuple)) and example and isinstance(example[0], dict):
        conv = list(example)
    else:
        raise ValidationError(f"a concept example is a string or a conversation (list of messages), got {example!r}")
    if getattr(model.tokenizer, "chat_template", None) is None:
        text = conv[-1]["content"]
        ids = model.tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids, min(1, len(ids) - 1), len(ids)
    rendered = render_chat(model.tokenizer, conv, check_chat_options({"add_generation_prompt": False}))
    b = rendered.boundaries[-1]
    # the content proper: find where the message text starts and ends inside its boundary
    offsets = model.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    lo = rendered.text.rfind(conv[-1]["content"])
    hi = lo + len(conv[-1]["content"])
    inside = [i for i in range(b.start_token, b.end_token) if lo <= offsets[i][0] < hi] if lo >= 0 else []
    start, end = (inside[0], inside[-1] + 1) if inside else (b.start_token, b.end_token)
    return rendered.token_ids, start, end


async def example_stats(model, examples, layers, desc: str | None = None, last: bool = False):
    """Per example and layer, the sum of residuals over its content tokens; token counts; per-token norms.

    With ``last=True`` also the residual at each example's last content token (``[examples, layers, hidden]``).
    """
    from tqdm.auto import tqdm

    items = [example_tokens(model, e) for e in examples]
    sums = torch.zeros(len(items), len(layers), model.hidden_size)
    counts = torch.zeros(len(items))
    norms = [[] for _ in layers]
    lasts = torch.zeros(len(items), len(layers), model.hidden_size) if last else None
    bar = tqdm(total=len(items), desc=desc, unit="text", disable=desc is None, leave=False)
    for first in range(0, len(items), _CHUNK):
        batch = items[first:first + _CHUNK]
        outs = await model.encode([ids for ids, _, _ in batch], layers, steering=_empty())
        for k, (out, (_, a, b)) in enumerate(zip(outs, batch)):
            for j, layer in enumerate(layers):
                h = out[layer][a:b]
                sums[first + k, j] = h.sum(0)
                norms[j].append(h.norm(dim=-1))
                if last:
                    lasts[first + k, j] = h[-1]
            counts[first + k] = b - a
        bar.update(len(batch))
    bar.close()
    if last:
        return sums, counts, [torch.cat(n) for n in norms], lasts
    return sums, counts, [torch.cat(n) for n in norms]


def _empty():
    from ..steering import SteeringSpec

    return SteeringSpec()


def fit_read_direction(pos_means: torch.Tensor, neg_means: torch.Tensor,
                       shrinkage: float = READ_SHRINKAGE) -> torch.Tensor:
    """The unit read direction of a concept: Fisher's discriminant of per-example mean residuals.

    ``solve((1 - a) S + a (tr S / d) I, mean(pos) - mean(neg))`` with ``S`` the within-class
    covariance of both sides; with no spread to estimate (one example a side), the difference of means.

    >>> r = fit_read_direction(torch.randn(8, 576) + 1.0, torch.randn(40, 576))
    """
    diff = (pos_means.mean(0) - neg_means.mean(0)).double()
    resid = torch.cat([pos_means - pos_means.mean(0), neg_means - neg_means.mean(0)]).double()
    cov = resid.T @ resid / len(resid)
    level = float(cov.trace()) / cov.shape[0]
    if level <= 0.0:
        r = diff
    else:
        r = torch.linalg.solve((1 - shrinkage) * cov + shrinkage * level * torch.eye(cov.shape[0], dtype=cov.dtype), diff)
    return (r / r.norm()).float()


def fit_direction(pos_sums, pos_counts, neg_sums, neg_counts, layers):
    """Pick the layer and direction that separate positives from negatives best.

    Returns ``(layer, unit direction, separation, positive token mean)``.
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
            best = (layer, u, sep, pos_sums[:, j].sum(0) / pos_counts.sum())
    if best is None:
        raise ValidationError("the positive and negative examples give identical means; use different examples")
    return best


async def library_stats(model, layers=None):
    """Per-example statistics of the library (neutral sentences, then every concept's examples).

    Kept on the model and, for the default layers, on disk beside the trained library, so that
    training a new concept later does not encode the whole library again.
    """
    cache = model.__dict__.setdefault("_library_stats", {})
    layers = tuple(layers or candidate_layers(model))
    disk = cache_dir(model) / f"stats-{'-'.join(map(str, layers))}.safetensors"
    if layers not in cache and disk.is_file():
        from safetensors.torch import load_file

        t = load_file(str(disk))
        cache[layers] = (t["sums"], t["counts"], [t["median_norms"][j:j + 1] for j in range(len(layers))], t["owner"])
    if layers not in cache:
        data = library_data()
        texts, owner = list(data["neutral"]), [-1] * len(data["neutral"])
        for ci, concept in enumerate(data["concepts"]):
            texts += concept["positive"]
            owner += [ci] * len(concept["positive"])
        sums, counts, norms = await example_stats(model, texts, list(layers), desc="Training the concept library (one time)")
        # only medians of the per-token norms are used (feature scales): keep those
        medians = torch.stack([n.median() for n in norms])
        cache[layers] = (sums, counts, [medians[j:j + 1] for j in range(len(layers))], torch.tensor(owner))
        from safetensors.torch import save_file

        disk.parent.mkdir(parents=True, exist_ok=True)
        save_file({"sums": sums, "counts": counts, "median_norms": medians, "owner": torch.tensor(owner)}, str(disk))
    return cache[layers]


def concept_feature(model, label, fid, index, layers, ps, pc, ns, nc, neutral_sums, neutral_counts, norms,
                    shrinkage: float | None = READ_SHRINKAGE) -> Feature:
    """A concept Feature from per-example sums; ``shrinkage=None`` reads with the steering direction."""
    chosen, u, sep, pos_tok = fit_direction(ps, pc, ns, nc, layers)
    j = layers.index(chosen)
    encoder = None if shrinkage is None else \
        fit_read_direction(ps[:, j] / pc[:, None], ns[:, j] / nc[:, None], shrinkage)
    r = u if encoder is None else encoder
    bias = float((neutral_sums[:, j].sum(0) / neutral_counts.sum()) @ r)   # ~0 on neutral text
    return Feature(id=fid, label=label, layer=chosen, index_in_sae=index, direction=u, encoder=encoder,
                   scale=float(norms[j].median()), kind="concept", bias=bias, span=max(float(pos_tok @ r) - bias, 1e-3))


METHODS = ("mean_diff", "caa", "pca", "probe")
"""How a concept's steering direction is fitted from its examples (all deterministic):

- ``mean_diff``: difference of the mean residuals of positives and negatives (over content tokens);
- ``caa``: contrastive activation addition: the mean difference of *paired* examples at their last
  content token (Rimsky et al.; pairs are positive i with negative i, cycling the negatives);
- ``pca``: the first principal direction of the paired differences of mean residuals (repeng's
  PCA of differences, uncentred so the shared shift counts; sign towards the positives);
- ``probe``: the weight vector of an L2-regularised logistic regression separating positive from
  negative mean residuals (standardised features, mapped back to the residual space).
"""


def fit_steering_direction(method: str, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """The unit steering direction of ``method`` from per-example rows ``pos`` / ``neg`` ([n, hidden]).

    For ``caa`` the rows are last-token residuals; for the others mean residuals. Negatives are
    paired with positives by cycling them.

    >>> d = fit_steering_direction("pca", torch.randn(8, 16) + 1.0, torch.randn(8, 16))
    """
    if method not in METHODS:
        raise ValidationError(f"method {method!r} is unknown; allowed: {list(METHODS)}")
    pos, neg = pos.double(), neg.double()
    paired = neg[torch.arange(len(pos)) % len(neg)]
    mean_diff = pos.mean(0) - neg.mean(0)
    if method == "mean_diff":
        d = mean_diff
    elif method == "caa":
        d = (pos - paired).mean(0)
    elif method == "pca":
        diffs = pos - paired
        d = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
        d = d if float(d @ diffs.mean(0)) >= 0 else -d
    else:
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([pos, neg])
        mu, sd = x.mean(0), x.std(0) + 1e-6
        y = [1] * len(pos) + [0] * len(neg)
        clf = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")  # lbfgs from zeros: deterministic
        clf.fit(((x - mu) / sd).numpy(), y)
        d = torch.as_tensor(clf.coef_[0], dtype=torch.float64) / sd
    if float(d.norm()) == 0.0 or not bool(torch.isfinite(d).all()):
        raise ValidationError(f"the examples give no {method} direction (identical sides?); use different examples")
    return (d / d.norm()).float()


async def train_concept(model, label: str, positive, negative=None, layer: int | None = None,
                        feature_id: str | None = None, index_in_sae: int = 0, method: str = "mean_diff") -> Feature:
    """A concept feature from contrastive examples (texts or conversations).

    Without ``negative``, the contrast is the library's neutral sentences plus every library
    concept's examples: what the new concept has that ordinary and other styled replies lack
    (the paired methods, ``caa`` and ``pca``, pair the positives with the neutral sentences).
    ``method`` fits the steering direction (see ``METHODS``); the layer is chosen as for
    ``mean_diff`` and reading always uses the discriminant.
    """
    if method not in METHODS:
        raise ValidationError(f"method {method!r} is unknown; allowed: {list(METHODS)}")
    if not isinstance(label, str) or not label.strip():
        raise ValidationError(f"a concept needs a non-empty label, got {label!r}")
    if not positive:
        raise EmptyInputError("add_concept needs at least one positive example")
    layers = [model.check_layer(layer)] if layer is not None else candidate_layers(model)
    lsums, lcounts, lnorms, owner = await library_stats(model, layers)
    neutral = owner == -1
    ps, pc, _, plast = await example_stats(model, list(positive), layers, desc=f"concept {label[:30]!r}", last=True)
    if negative:
        ns, nc, _, nlast = await example_stats(model, list(negative), layers, last=True)
        pair_sums, pair_counts, pair_last = ns, nc, nlast
    else:
        ns, nc = lsums, lcounts
        pair_sums, pair_counts, pair_last = lsums[neutral], lcounts[neutral], None
    norms = [n for n in lnorms]
    feature = concept_feature(model, label, feature_id or f"concept/{slug(label)}", index_in_sae, layers, ps, pc, ns, nc,
                              lsums[neutral], lcounts[neutral], norms)
    if method != "mean_diff":
        j = layers.index(feature.layer)
        if method == "caa":
            if pair_last is None:  # the neutral sentences' last tokens are not in the library cache
                texts = library_data()["neutral"][: len(positive)]
                _, _, _, pair_last = await example_stats(model, texts, layers, last=True)
            feature.direction = fit_steering_direction(method, plast[:, j], pair_last[:, j])
        elif method == "pca":
            feature.direction = fit_steering_direction(method, ps[:, j] / pc[:, None], pair_sums[:, j] / pair_counts[:, None])
        else:
            feature.direction = fit_steering_direction(method, ps[:, j] / pc[:, None], ns[:, j] / nc[:, None])
        feature.method = method
    return feature


def slug(text: str) -> str:
    """An id- and file-safe form of ``text``: lower case, other characters as ``-``, at most 48 characters."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:48] or "concept"


def cache_dir(model):
    """The folder of ``model``'s trained concept library and its statistics (keyed by the library's data)."""
    from ..models import workbench_home

    data = json.dumps(library_data(), sort_keys=True)
    key = hashlib.sha256(f"{LIBRARY_VERSION}|{model.model_name}|{model.hidden_size}|{model.layer_count}|{data}".encode())
    name = slug(model.model_name.rsplit("/", 1)[-1])[:32]
    return workbench_home() / "concept-library" / f"{name}-{key.hexdigest()[:16]}"


RECOMMENDED_STRENGTH = (0.3, 0.5)
"""Strengths (mode add) that visibly steer the default model with library concepts; 0.4 is a good start.

Measured on the default model: below 0.3 little changes; from about 0.6 replies turn to gibberish."""

__all__ = ["train_concept", "candidate_layers", "fit_read_direction", "fit_steering_direction", "concept_feature",
           "example_stats", "example_tokens", "library_data", "library_stats", "METHODS", "RECOMMENDED_STRENGTH"]
