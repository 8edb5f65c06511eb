"""Inspect, activations, logits and contrast: what features a conversation activates.

All take chat messages (rendered with the model's chat template, no generation prompt) and
optional interventions, and run one forward pass per conversation that stops after the deepest
layer a feature reads. Aggregation is over the tokens of the messages' contents: role markers
and text the template injects (a default system prompt) are left out, and so is the very first
token (it carries massive residual outliers).
"""

from __future__ import annotations

import torch

from ..chat import check_chat_options, normalize_conversations, render_chat
from ..errors import EmptyInputError, ValidationError
from ..steering import SteeringSpec

AGGREGATIONS = ("mean", "max", "sum", "frequency")


def _steering(model, features, interventions) -> SteeringSpec:
    if interventions is None:
        return SteeringSpec()
    if isinstance(interventions, SteeringSpec):
        return interventions
    from .variant import compile_interventions

    if hasattr(interventions, "interventions"):       # a Variant (its raw spec, if any, follows)
        from ..steering import merge_specs

        spec = compile_interventions(list(interventions.interventions), features)
        extra = getattr(interventions, "spec", None)
        return spec if extra is None else merge_specs(spec, extra.validate(model.hidden_size, model.layer_count))
    return compile_interventions(list(interventions), features)


def _render(model, messages) -> list[int]:
    return _render_with_content(model, messages)[0]


def _render_with_content(model, messages) -> tuple[list[int], torch.Tensor]:
    """Token ids of the rendered conversation, and a mask of the tokens inside message contents.

    Role markers and text the template injects (e.g. a default system prompt) are not part of
    the conversation a researcher inspects, and they light up generic directions.
    """
    ids, owner = _render_with_owner(model, messages)
    return ids, owner >= 0


def _render_with_owner(model, messages) -> tuple[list[int], torch.Tensor]:
    """Token ids and, per token, the index of the message whose content holds it (-1: template text)."""
    messages = [m.model_dump() if hasattr(m, "model_dump") else m for m in (messages or [])]
    convs, single = normalize_conversations(messages)
    if not single:
        raise ValidationError("expected one conversation (a list of messages)")
    rendered = render_chat(model.tokenizer, convs[0], check_chat_options({"add_generation_prompt": False}))
    offsets = model.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, pos = [], 0
    for i, m in enumerate(convs[0]):
        at = rendered.text.find(m["content"], pos) if m["content"] else -1
        if at >= 0:
            spans.append((at, at + len(m["content"]), i))
            pos = at + len(m["content"])
    owner = torch.tensor([next((i for a, b, i in spans if a <= o[0] < b), -1) for o in offsets[: len(rendered.token_ids)]],
                         dtype=torch.long)
    if not bool((owner >= 0).any()):
        owner[:] = 0
    return rendered.token_ids, owner


async def token_activations(model, features, conversations, interventions=None) -> list[torch.Tensor]:
    """Per conversation, ``[content tokens, len(features)]`` activations over the messages' own tokens."""
    if not len(features):
        raise ValidationError("the feature set is empty")
    spec = _steering(model, features, interventions)
    rendered = [_render_with_content(model, conv) for conv in conversations]
    outs = await model.encode([ids for ids, _ in rendered], features.layers(), steering=spec)
    acts = []
    for out, (_, mask) in zip(outs, rendered):
        mask = mask.clone()
        mask[0] = mask.numel() == 1  # the first token carries massive outliers
        acts.append(features.activations_from_hidden(out)[mask])
    return acts


async def token_table(model, features, messages, feature_keys=None, interventions=None) -> dict:
    """Per content token: its text, its message and the activations of ``feature_keys`` (default: all).

    Returns ``{"tokens": [str], "message_idx": [int], "features": [Feature], "activations": [features, tokens]}``,
    the data of a token-by-feature heatmap; the first token is left out as in ``inspect``.
    """
    if not len(features):
        raise ValidationError("the feature set is empty")
    chosen = list(features) if not feature_keys else [features.get(k) for k in feature_keys]
    ids, owner = _render_with_owner(model, messages)
    [out] = await model.encode([ids], features.layers(), steering=_steering(model, features, interventions))
    keep = owner >= 0
    keep[0] = keep.numel() == 1
    acts = features.activations_from_hidden(out)[keep]
    cols = torch.tensor([features.position(f) for f in chosen], dtype=torch.long)
    kept = [i for i in range(len(ids)) if bool(keep[i])]
    return {"tokens": [model.tokenizer.decode([ids[i]]) for i in kept], "message_idx": [int(owner[i]) for i in kept],
            "features": chosen, "activations": acts[:, cols].T.tolist()}


def aggregate(acts: torch.Tensor, method: str, threshold: torch.Tensor) -> torch.Tensor:
    if method not in AGGREGATIONS:
        raise ValidationError(f"aggregation_method {method!r} is not allowed; allowed: {list(AGGREGATIONS)}")
    if method == "mean":
        return acts.mean(0)
    if method == "max":
        return acts.max(0).values
    if method == "sum":
        return acts.sum(0)
    return (acts > threshold).float().mean(0)


def _check_top_k(top_k, n, name="top_k"):
    if top_k is None:
        return n
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValidationError(f"{name}={top_k!r} is out of range; allowed an integer >= 1")
    return min(top_k, n)


async def inspect(model, features, messages, top_k: int = 10, aggregation_method: str = "mean", interventions=None):
    """The ``top_k`` features most active over the conversation: ``[(Feature, activation)]``, best first."""
    k = _check_top_k(top_k, len(features))
    aggregate(torch.zeros(1, 1), aggregation_method, torch.zeros(1))  # validate early
    [acts] = await token_activations(model, features, [messages], interventions)
    agg = aggregate(acts, aggregation_method, features.active_threshold())
    vals, idx = torch.topk(agg, k)
    feats = list(features)
    return [(feats[int(i)], float(v)) for v, i in zip(vals, idx)]


async def activations(model, features, messages, aggregation_method: str = "mean", interventions=None) -> list[float]:
    """One aggregated activation per feature (length = feature count)."""
    aggregate(torch.zeros(1, 1), aggregation_method, torch.zeros(1))
    [acts] = await token_activations(model, features, [messages], interventions)
    return aggregate(acts, aggregation_method, features.active_threshold()).tolist()


async def logits(model, features, messages, top_k: int | None = None, start_idx: int | None = None,
                 end_idx: int | None = None, interventions=None) -> dict:
    """Next-token logits (decoded token -> logit) after tokens ``ids[start_idx:end_idx]`` of the rendered conversation.

    The bounds are Python slice bounds (clamped to the length, negative ones counting from the end),
    so ``end_idx`` past the conversation means "to the end", as it does for a list.
    """
    ids = _render(model, messages)
    n = len(ids)
    for name, v in (("start_idx", start_idx), ("end_idx", end_idx)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValidationError(f"{name} must be an integer, got {v!r}")
    start, end, _ = slice(start_idx, end_idx).indices(n)
    if start >= end:
        raise ValidationError(f"tokens [start_idx:end_idx] = [{start_idx}:{end_idx}] of the {n}-token conversation are "
                              f"empty; the next-token logits need at least one token")
    spec = _steering(model, features, interventions)
    row = await model.next_token_logits(ids[start:end], steering=spec)
    k = _check_top_k(top_k, row.numel())
    vals, idx = torch.topk(row, k)
    out: dict = {}
    for v, i in zip(vals.tolist(), idx.tolist()):
        tok = model.tokenizer.decode([i])
        if tok not in out:  # several ids can decode to one string: keep the largest logit
            out[tok] = v
    return out


async def contrast(model, features, dataset_1, dataset_2, k_to_add: int = 10, k_to_remove: int = 10,
                   interventions_1=None, interventions_2=None):
    """Features more active in ``dataset_1`` (``top_to_add``) and in ``dataset_2`` (``top_to_remove``).

    Ranked by a standardized difference: the difference of the datasets' mean activations divided
    by the feature's per-token standard deviation over both datasets.
    """
    for name, ds in (("dataset_1", dataset_1), ("dataset_2", dataset_2)):
        if not ds:
            raise EmptyInputError(f"{name} is empty; give at least one conversation")
        normalize_conversations(list(ds))
    ka, kr = _check_top_k(k_to_add, len(features), "k_to_add"), _check_top_k(k_to_remove, len(features), "k_to_remove")
    a1 = await token_activations(model, features, list(dataset_1), interventions_1)
    a2 = await token_activations(model, features, list(dataset_2), interventions_2)
    m1 = torch.stack([a.mean(0) for a in a1]).mean(0)
    m2 = torch.stack([a.mean(0) for a in a2]).mean(0)
    std = torch.cat(a1 + a2).std(0, unbiased=False)
    d = (m1 - m2) / (std + 1e-3)
    feats = list(features)
    add = [feats[int(i)] for i in torch.argsort(d, descending=True)[:ka]]
    remove = [feats[int(i)] for i in torch.argsort(d)[:kr]]
    return add, remove
