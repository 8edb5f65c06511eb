"""Feature pages: where a feature fires in a corpus, how its activations spread, which tokens it writes.

A page reads one feature over a corpus: the concept library's example texts (its neutral sentences
and every concept's examples, ``data/concepts.json``) plus texts you pass. Each text is encoded on
its own as plain text (the tokenizer's special tokens, no chat template, no steering), and the
feature's activation is computed per token as inspect computes it (featureset.py). The first token
of every text is left out of the ranking and the histogram: it carries massive residual outliers.

A page holds the top contexts (each text's most activating token, best texts first, with ``window``
tokens either side), a histogram of every scored token's activation, and the tokens the feature's
direction promotes and suppresses through the unembedding (``lens.direction_tokens``). The
library's residuals at a layer stay on the model, so a second page at that layer only encodes your
texts. ``render_feature_page`` draws a page (or the API's response) as self-contained HTML.

This module imports torch and pandas only inside the functions that compute a page, so the thin
API's light client can render a response with it.

>>> page = await model.features.page("concept/pirate", corpus=["Arr, hoist the sails, matey!"])  # doctest: +SKIP
>>> page.top_contexts[["source", "token", "activation"]].head(3)                              # doctest: +SKIP
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from ..errors import EmptyInputError, ValidationError

ENCODE_BATCH = 32          # texts per model.encode call
PROGRESS_FROM = 64         # a progress bar for corpora of at least this many texts
CACHED_LAYERS = 4          # layers whose library residuals stay on the model (each ~30 MB on the default model)
CONTEXT_COLUMNS = ["text_index", "source", "group", "position", "token", "activation", "context_start",
                   "context_tokens", "context_activations"]


@dataclass
class Histogram:
    """``counts[i]`` tokens have an activation in ``[edges[i], edges[i + 1])`` (the last bin includes its right edge)."""

    counts: list[int]
    edges: list[float]


@dataclass
class FeaturePage:
    """One feature over a corpus; in a notebook it displays as HTML (``_repr_html_``).

    ``top_contexts`` has one row per text (its most activating token), best first, with the columns
    ``CONTEXT_COLUMNS``: ``text_index`` (in the library's text list or in your ``corpus``),
    ``source`` ("library" / "corpus"), ``group`` (a library text's concept id, or "neutral"),
    ``position`` / ``token`` / ``activation`` of the max token, and the window around it
    (``context_tokens`` from ``context_start`` on, with ``context_activations``; None for an
    unscored first token).
    """

    feature: dict
    top_contexts: object = field(repr=False)              # pandas DataFrame
    histogram: Histogram = field(repr=False)
    promoted: object = field(repr=False)                  # DataFrame: token, token_id, score
    suppressed: object = field(repr=False)
    text_count: int = 0
    token_count: int = 0                                  # scored tokens: sum(histogram.counts)

    def to_dict(self) -> dict:
        """The page as plain data: the fields of the API's ``FeaturePageResponse``."""
        def rows(df) -> list[dict]:
            return [{"token": str(r.token), "token_id": int(r.token_id), "score": float(r.score)} for r in df.itertuples()]

        contexts = [{"text_index": int(r.text_index), "source": r.source,
                     "group": r.group if isinstance(r.group, str) else None, "position": int(r.position),
                     "token": r.token, "activation": float(r.activation), "context_start": int(r.context_start),
                     "context_tokens": list(r.context_tokens), "context_activations": list(r.context_activations)}
                    for r in self.top_contexts.itertuples()]
        return {"feature": dict(self.feature), "contexts": contexts,
                "histogram": {"counts": list(self.histogram.counts), "edges": list(self.histogram.edges)},
                "promoted": rows(self.promoted), "suppressed": rows(self.suppressed),
                "text_count": self.text_count, "token_count": self.token_count}

    def __repr__(self) -> str:
        top = ", ".join(f"{r.token!r} {r.activation:.2f}" for r in self.top_contexts.head(3).itertuples())
        return (f"<FeaturePage {self.feature.get('id')!r} (layer {self.feature.get('layer')}): {self.text_count} texts, "
                f"{self.token_count} tokens; top: {top or 'none'}>")

    def _repr_html_(self) -> str:
        return render_feature_page(self)


# -- computing a page ----------------------------------------------------------------------------
def library_texts() -> tuple[list[str], list[str]]:
    """The library's texts and, per text, its group: ``"neutral"`` or the concept's feature id."""
    from .concepts import library_data

    data = library_data()
    texts, groups = list(data["neutral"]), ["neutral"] * len(data["neutral"])
    for concept in data["concepts"]:
        texts += concept["positive"]
        groups += [f"concept/{concept['id']}"] * len(concept["positive"])
    return texts, groups


async def _encode(model, texts: list[str], layer: int, desc: str) -> tuple[list[list[int]], list]:
    """Token ids and residuals ``[tokens, hidden]`` (float32, CPU) at ``layer`` of every text, in batches."""
    from tqdm.auto import tqdm

    from ..steering import SteeringSpec

    ids = [model.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
    hidden = []
    bar = tqdm(total=len(texts), desc=desc, unit="text", disable=len(texts) < PROGRESS_FROM, leave=False)
    try:
        for first in range(0, len(ids), ENCODE_BATCH):
            batch = ids[first:first + ENCODE_BATCH]
            outs = await model.encode(batch, [layer], steering=SteeringSpec())   # explicit: no global steering
            hidden += [out[layer].float().cpu() for out in outs]
            bar.update(len(batch))
    finally:
        bar.close()
    return ids, hidden


async def _library(model, layer: int):
    """The library's ``(texts, groups, ids, residuals)`` at ``layer``, encoded once per model and layer."""
    cache = model.__dict__.setdefault("_page_library", {})
    if layer not in cache:
        texts, groups = library_texts()
        ids, hidden = await _encode(model, texts, layer, f"Reading the concept library at layer {layer} (once)")
        while len(cache) >= CACHED_LAYERS:
            cache.pop(next(iter(cache)))
        cache[layer] = (texts, groups, ids, hidden)
    return cache[layer]


def _check(corpus, top_n, window, bins, include_library) -> list[str]:
    if corpus is None:
        corpus = []
    elif isinstance(corpus, str):
        corpus = [corpus]
    if not isinstance(corpus, (list, tuple)) or not all(isinstance(t, str) for t in corpus):
        raise ValidationError(f"corpus must be a list of strings, got {type(corpus).__name__}")
    empty = [i for i, t in enumerate(corpus) if not t.strip()]
    if empty:
        raise EmptyInputError(f"corpus[{empty[0]}] is empty; every corpus text needs some content")
    for name, value, lo in (("top_n", top_n, 1), ("window", window, 0), ("bins", bins, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValidationError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not corpus and not include_library:
        raise EmptyInputError("nothing to read: pass a corpus or include_library=True")
    return list(corpus)


async def feature_page(model, feature, corpus=None, *, top_n: int = 10, window: int = 12, bins: int = 30,
                       include_library: bool = True, features=None) -> FeaturePage:
    """A feature's page: top contexts in the library and ``corpus``, activation histogram, promoted tokens.

    Args:
        feature: a ``Feature`` or its id / ``index_in_sae`` in ``features`` (default ``model.features``).
        corpus: your texts (strings), read beside the library's (``include_library``).
        top_n: how many texts' contexts to keep; ``window``: tokens either side of the max token;
            ``bins``: histogram bins.

    >>> page = await wb.features.pages.feature_page(model, "concept/pirate", ["Ahoy, me hearties!"])  # doctest: +SKIP
    """
    import numpy as np
    import pandas as pd

    from ..lens import direction_tokens

    corpus = _check(corpus, top_n, window, bins, include_library)
    fs = features if features is not None else await model.load_features()
    feat = feature if hasattr(feature, "direction") and hasattr(feature, "layer") else fs.get(feature)
    layer = model.check_layer(feat.layer)

    sources: list[tuple[str, int, str | None, list[int], object]] = []   # (source, index, group, ids, hidden)
    if include_library:
        _, groups, ids, hidden = await _library(model, layer)
        sources += [("library", i, g, t, h) for i, (g, t, h) in enumerate(zip(groups, ids, hidden))]
    if corpus:
        ids, hidden = await _encode(model, corpus, layer, f"Reading {len(corpus)} texts at layer {layer}")
        sources += [("corpus", i, None, t, h) for i, (t, h) in enumerate(zip(ids, hidden))]

    decode = model.tokenizer.decode
    best, scored = [], []
    for n, (*_, h) in enumerate(sources):
        acts = fs.activations_of(feat, h).tolist()
        if len(acts) < 2:
            continue   # only the unscored first token
        scored.extend(acts[1:])
        pos = 1 + max(range(len(acts) - 1), key=lambda i: acts[1 + i])
        best.append((acts[pos], n, pos, acts))
    best.sort(key=lambda b: -b[0])   # stable: ties keep corpus order
    rows = []
    for act, n, pos, acts in best[:top_n]:
        source, index, group, ids, _ = sources[n]
        lo, hi = max(0, pos - window), min(len(ids), pos + window + 1)
        rows.append({"text_index": index, "source": source, "group": group, "position": pos, "token": decode([ids[pos]]),
                     "activation": float(act), "context_start": lo,
                     "context_tokens": [decode([t]) for t in ids[lo:hi]],
                     "context_activations": [None if p == 0 else float(acts[p]) for p in range(lo, hi)]})
    counts, edges = np.histogram(np.asarray(scored, dtype=np.float64), bins=bins) if scored else \
        (np.zeros(bins, dtype=int), np.linspace(0.0, 1.0, bins + 1))
    lens = direction_tokens(model, feat, top_k=20)
    table = pd.DataFrame(rows, columns=CONTEXT_COLUMNS)
    table["group"] = table["group"].astype(object).where(table["group"].notna(), None)   # corpus texts: None, not NaN
    return FeaturePage(feature=feat.to_item(), top_contexts=table,
                       histogram=Histogram([int(c) for c in counts], [float(e) for e in edges]),
                       promoted=lens.promoted, suppressed=lens.suppressed, text_count=len(sources),
                       token_count=len(scored))


# -- drawing a page --------------------------------------------------------------------------------
def _as_dict(page) -> dict:
    if hasattr(page, "to_dict"):
        return page.to_dict()
    if hasattr(page, "model_dump"):
        return page.model_dump()
    if isinstance(page, dict):
        return page
    raise ValidationError(f"render_feature_page takes a FeaturePage, a FeaturePageResponse or its dict, got {type(page).__name__}")


def _token(text: str) -> str:
    return html.escape(text.replace("\n", "\u21b5"), quote=True)


def _tokens_html(tokens, activations, max_index: int, top: float) -> str:
    out = []
    for i, (tok, act) in enumerate(zip(tokens, activations)):
        alpha = 0.0 if act is None or not math.isfinite(act) or top <= 0 else min(1.0, max(0.0, act / top))
        title = "first token (not scored)" if act is None else f"{act:.3f}"
        style = f"background:rgba(255,140,0,{alpha:.2f});border-radius:2px"
        body = f"<b>{_token(tok)}</b>" if i == max_index else _token(tok)
        out.append(f'<span title="{title}" style="{style}">{body}</span>')
    return "".join(out)


def _chips(rows, colour: str) -> str:
    return " ".join(f'<span title="{float(r["score"]):.3f}" style="background:{colour};padding:0 3px;margin:1px;'
                    f'border-radius:3px;white-space:pre">{_token(str(r["token"]))}</span>' for r in rows) or "<i>none</i>"


def render_feature_page(page) -> str:
    """Self-contained HTML (no script) of a ``FeaturePage``, a ``FeaturePageResponse`` or its dict.

    Top contexts with every token's background by its activation (the max token bold; hover for the
    value), the activation histogram as small bars, and the promoted / suppressed tokens.

    >>> html = render_feature_page(await client.features.page("concept/pirate", model="default"))  # doctest: +SKIP
    """
    d = _as_dict(page)
    f = d["feature"]
    contexts = d["contexts"]
    top = max([c["activation"] for c in contexts] + [0.0])
    head = (f'<div style="margin-bottom:6px"><b>{html.escape(str(f.get("label", "")))}</b> '
            f'<code>{html.escape(str(f.get("id", "")))}</code> &middot; layer {int(f.get("layer", 0))} &middot; '
            f'{int(d["text_count"])} texts, {int(d["token_count"])} tokens</div>')
    rows = []
    for rank, c in enumerate(contexts, 1):
        where = html.escape(c["source"] + (f' {c["group"]}' if c.get("group") else "") + f' #{c["text_index"]}')
        body = _tokens_html(c["context_tokens"], c["context_activations"], c["position"] - c["context_start"], top)
        rows.append(f'<tr><td style="text-align:right;padding-right:6px">{rank}</td>'
                    f'<td style="text-align:right;padding-right:8px">{float(c["activation"]):.3f}</td>'
                    f'<td style="color:#666;padding-right:8px;white-space:nowrap">{where}</td>'
                    f'<td style="white-space:pre-wrap;text-align:left">{body}</td></tr>')
    table = ('<table class="wb-feature-contexts" style="border-collapse:collapse;font-size:12px">'
             '<tr><th>#</th><th>max</th><th>text</th><th style="text-align:left">context</th></tr>'
             + "".join(rows) + "</table>") if rows else "<i>no contexts</i>"
    counts, edges = d["histogram"]["counts"], d["histogram"]["edges"]
    peak = max(counts + [1])
    bars = "".join(f'<div title="{edges[i]:.3f} .. {edges[i + 1]:.3f}: {n}" style="flex:1;margin-right:1px;'
                   f'background:#4a78c2;height:{max(1, round(40 * n / peak)) if n else 0}px"></div>'
                   for i, n in enumerate(counts))
    hist = (f'<div style="margin-top:8px">activations of {sum(counts)} tokens '
            f'({edges[0]:.2f} .. {edges[-1]:.2f}):</div>'
            f'<div class="wb-feature-histogram" style="display:flex;align-items:flex-end;height:42px;width:300px;'
            f'border-bottom:1px solid #999">{bars}</div>') if counts else ""
    lens = (f'<div style="margin-top:8px">promotes: {_chips(d["promoted"], "#d7f0d2")}</div>'
            f'<div>suppresses: {_chips(d["suppressed"], "#f6d5d5")}</div>')
    return f'<div class="wb-feature-page" style="font-family:sans-serif;font-size:13px">{head}{table}{hist}{lens}</div>'
