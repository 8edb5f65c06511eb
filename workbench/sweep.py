"""Strength sweeps: one feature (or vector) applied at a grid of layers x strengths, with side effects.

Per cell: a greedy text sample, the feature's own activation on that sample (read unsteered, as
``inspect`` reads it), an optional score of your own (e.g. a word count), and the mean KL
divergence of next-token distributions on held-out text against the unsteered model. Strength is
in docs/DESIGN.md's units at every layer: ``s`` adds ``s x`` the median residual norm *of that layer*.

>>> df = await wb.strength_sweep(model, model.features["concept/pirate"], layers=[4, 7, 10],
...                              strengths=[0, 0.2, 0.4, 0.6])                      # doctest: +SKIP
>>> wb.plots.strength_sweep(df)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import ValidationError
from .sampling import SamplingParams
from .steering import AddSpec, SteeringSpec

DEFAULT_PROMPT = "Give me tourist information about Tokyo."


def _direction(model, feature) -> tuple[torch.Tensor, object]:
    """(unit direction, the Feature or None) for a Feature, a feature id / index, or a raw vector."""
    if isinstance(feature, (str, int)) and not isinstance(feature, bool):
        feature = model.features.get(feature)
    if hasattr(feature, "direction"):
        d = feature.direction.float()
        return d / d.norm(), feature
    v = torch.as_tensor(feature, dtype=torch.float32).flatten()
    if v.numel() != model.hidden_size or not bool(torch.isfinite(v).all()) or float(v.norm()) == 0:
        raise ValidationError(f"a sweep takes a Feature, a feature id or a finite non-zero [{model.hidden_size}] vector")
    return v / v.norm(), None


async def layer_scales(model, layers) -> dict[int, float]:
    """Median per-token residual norm at each layer on the concept library's neutral sentences (kept on the model)."""
    from .features.concepts import example_stats, library_data

    known = model.__dict__.setdefault("_layer_scales", {})
    missing = [layer for layer in dict.fromkeys(layers) if layer not in known]
    if missing:
        _, _, norms = await example_stats(model, library_data()["neutral"], missing)
        known.update({layer: float(n.median()) for layer, n in zip(missing, norms)})
    return {layer: known[layer] for layer in layers}


def _kl(steered: torch.Tensor, base: torch.Tensor) -> float:
    """KL(steered || baseline) of next-token distributions, in nats."""
    p = torch.log_softmax(steered.double(), -1)
    q = torch.log_softmax(base.double(), -1)
    return float((p.exp() * (p - q)).sum())


async def strength_sweep(model, feature, layers=None, strengths=(0.0, 0.15, 0.3, 0.45, 0.6), prompt: str = DEFAULT_PROMPT,
                         heldout=None, max_tokens: int = 40, score=None) -> pd.DataFrame:
    """Sweep ``feature`` over ``layers`` x ``strengths``; one row per cell.

    Columns: layer, strength, text, activation (the feature's own, on the sample; NaN for a raw
    vector), score (``score(text)`` when given), kl (nats, mean over ``heldout`` texts; default: the
    library's neutral sentences).
    """
    from .features.concepts import library_data

    if isinstance(feature, (str, int)) or hasattr(feature, "direction"):
        await model.load_features()   # looked up in, and its activation read through, model.features
    u, feat = _direction(model, feature)
    if layers is None:
        layers = sorted({max(0, feat.layer - 3), feat.layer, min(model.layer_count - 1, feat.layer + 3)}) if feat else [
            model.layer_count // 4]
    layers = [model.check_layer(layer) for layer in layers]
    strengths = [float(s) for s in strengths]
    if not strengths:
        raise ValidationError("strengths must not be empty")
    heldout = list(heldout or library_data()["neutral"][:8])
    scales = await layer_scales(model, layers)
    cells = [(layer, s) for layer in layers for s in strengths]
    specs = [SteeringSpec(layers={layer: [AddSpec(u * (s * scales[layer]))]}) for layer, s in cells]
    chat = [{"role": "user", "content": prompt}]
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    bar = tqdm(total=3, desc="strength sweep", leave=False)
    replies = await asyncio.gather(*(model.chat(chat, sampling, steering=spec) for spec in specs))
    texts = [r[0].generated for r in replies]
    bar.update()
    base = await asyncio.gather(*(model.next_token_logits(t, steering=SteeringSpec()) for t in heldout))
    steered = await asyncio.gather(*(model.next_token_logits(t, steering=spec) for spec in specs for t in heldout))
    kls = [sum(_kl(steered[i * len(heldout) + j], base[j]) for j in range(len(heldout))) / len(heldout)
           for i in range(len(cells))]
    bar.update()
    acts = [float("nan")] * len(cells)
    if feat is not None:
        for i, text in enumerate(texts):
            table = await model.features.token_table([*chat, {"role": "assistant", "content": text or " "}], [feat.id])
            own = [a for a, m in zip(table["activations"][0], table["message_idx"]) if m == 1]
            acts[i] = sum(own) / len(own) if own else float("nan")
    bar.update()
    bar.close()
    return pd.DataFrame({"layer": [c[0] for c in cells], "strength": [c[1] for c in cells], "text": texts,
                         "activation": acts, "score": [float(score(t)) if score else float("nan") for t in texts],
                         "kl": kls})
