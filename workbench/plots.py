"""Figure builders: API results and DataFrames in, plotly figures out (the widgets use the same ones).

Pure functions, no widgets: what a panel shows, plain code can build, save and put in a paper.
Norm statistics leave out position 0 (the first token carries massive residual outliers) and
use the median over a message's tokens by default, for the same reason.

>>> r = client.features.norms(model="default", messages=chat)          # doctest: +SKIP
>>> fig = wb.plots.layer_norms(r, by="role")                             # doctest: +SKIP
>>> wb.plots.export(fig, "figures/norms.png")                               # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .errors import ValidationError

STATS = ("median", "mean", "max")
# one colour per group (role / message), shared by its baseline and steered lines
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#ff7f0e")
FORMATS = ("html", "png", "svg", "pdf", "json")


def _go():
    try:
        import plotly.graph_objects as go
    except ImportError as exc:  # plotly is an extra: pip install steering-workbench[widgets]
        raise ImportError("plots need plotly: pip install 'steering-workbench[widgets]'") from exc
    return go


def _style(fig):
    """A light look, set directly: plotly's named templates cost ~30 ms per figure to build, which a
    panel redrawing on every turn pays on the kernel's event loop."""
    grid = "#e5ecf6"
    fig.update_layout(paper_bgcolor="white", plot_bgcolor="white", font={"size": 12})
    fig.update_xaxes(gridcolor=grid, zerolinecolor=grid, linecolor="#9aa5b1", showgrid=True)
    fig.update_yaxes(gridcolor=grid, zerolinecolor=grid, linecolor="#9aa5b1", showgrid=True)
    return fig


def norms_frame(norms) -> pd.DataFrame:
    """A norms table as a DataFrame: accepts a ``NormsResponse``, a ``CaptureHandle`` or a DataFrame."""
    if norms is None:
        return pd.DataFrame(columns=["layer", "position", "token", "message_idx", "role", "norm"])
    if hasattr(norms, "to_dataframe"):
        return norms.to_dataframe()
    if hasattr(norms, "norms") and callable(norms.norms):
        return norms.norms()
    if isinstance(norms, pd.DataFrame):
        missing = {"layer", "message_idx", "role", "norm"} - set(norms.columns)
        if missing:
            raise ValidationError(f"a norms table needs the columns {sorted(missing)}")
        return norms
    raise ValidationError(f"expected a NormsResponse, CaptureHandle or DataFrame, got {type(norms).__name__}")


def _stat(stat: str) -> str:
    if stat not in STATS:
        raise ValidationError(f"stat {stat!r} is not allowed; allowed: {list(STATS)}")
    return stat


def _select(df: pd.DataFrame, layers) -> pd.DataFrame:
    if "position" in df.columns:
        df = df[df.position > 0]
    if layers is not None:
        df = df[df.layer.isin(list(layers))]
    return df


def layer_table(norms, by: str = "role", stat: str = "median", layers=None) -> pd.DataFrame:
    """Per layer and per group (``role`` or ``message``), the ``stat`` of the token norms."""
    if by not in ("role", "message"):
        raise ValidationError(f"by={by!r} is not allowed; allowed: ['role', 'message']")
    df = _select(norms_frame(norms), layers)
    if by == "message":
        df = df.assign(group=[f"{m}: {r}" for m, r in zip(df.message_idx, df.role)])
    else:
        df = df.assign(group=df.role)
    return df.groupby(["group", "layer"], sort=True).norm.agg(_stat(stat)).reset_index()


def message_table(norms, stat: str = "median", layers=None) -> pd.DataFrame:
    """Messages x layers: the ``stat`` of each message's token norms (rows ``"i: role"``)."""
    df = _select(norms_frame(norms), layers)
    table = df.groupby(["message_idx", "role", "layer"]).norm.agg(_stat(stat)).unstack("layer")
    table.index = [f"{m}: {r}" for m, r in table.index]
    return table


def layer_norms(baseline=None, steered=None, by: str = "role", stat: str = "median", layers=None,
                title: str | None = None):
    """Lines of norm vs layer, one per role (or message); baseline dashed, steered solid."""
    go = _go()
    fig = go.Figure()
    colours: dict = {}
    for name, norms, dash in (("baseline", baseline, "dash"), ("steered", steered, "solid")):
        if norms is None:
            continue
        table = layer_table(norms, by, stat, layers)
        for group, rows in table.groupby("group", sort=True):
            colour = colours.setdefault(group, PALETTE[len(colours) % len(PALETTE)])
            fig.add_trace(go.Scatter(x=rows.layer.tolist(), y=rows.norm.tolist(), mode="lines+markers",
                                     name=f"{name} · {group}", line={"dash": dash, "color": colour},
                                     legendgroup=str(group),
                                     meta={"variant": name, "group": str(group)}))
    fig.update_layout(title=title or f"Residual norm per layer ({stat} over tokens)", xaxis_title="layer",
                      yaxis_title=f"{stat} token norm", height=380,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"font": {"size": 10}})
    return _style(fig)


def message_heatmap(norms, stat: str = "median", layers=None, title: str | None = None, baseline=None):
    """Messages x layers heatmap of norms; with ``baseline=``, the steered minus baseline difference."""
    go = _go()
    table = message_table(norms, stat, layers)
    label = "norm"
    if baseline is not None:
        base = message_table(baseline, stat, layers)
        table = table.subtract(base.reindex(index=table.index, columns=table.columns))
        label = "Δ norm (steered − baseline)"
    fig = go.Figure(go.Heatmap(z=table.to_numpy().tolist(), x=[int(c) for c in table.columns], y=list(table.index),
                               colorscale="RdBu_r" if baseline is not None else "Viridis",
                               zmid=0 if baseline is not None else None, colorbar={"title": {"text": label}}))
    fig.update_layout(title=title or f"Per-message {label} ({stat} over tokens)", xaxis_title="layer",
                      yaxis={"autorange": "reversed", "title": "message"},
                      height=max(240, 60 + 40 * len(table.index)), margin={"l": 110, "r": 20, "t": 50, "b": 50})
    return _style(fig)


def short_label(label: str, width: int = 40) -> str:
    """A feature label for an axis: the part before a colon, at most ``width`` characters."""
    head = str(label).split(":")[0].strip() or str(label)
    return head if len(head) <= width else head[: width - 1] + "…"


def _inspection_pairs(result) -> list[tuple[str, float]]:
    if hasattr(result, "features"):            # FeatureInspectionResponse
        return [(short_label(x.feature.label), float(x.activation)) for x in result.features]
    return [(short_label(getattr(f, "label", str(f))), float(a)) for f, a in result]


def top_features(result, baseline=None, title: str | None = None):
    """Horizontal bars of the most active features (an ``inspect`` result); ``baseline=`` overlays a second one."""
    go = _go()
    fig = go.Figure()
    for name, res in (("baseline", baseline), ("steered" if baseline is not None else "activation", result)):
        if res is None:
            continue
        pairs = _inspection_pairs(res)
        fig.add_trace(go.Bar(x=[a for _, a in pairs][::-1], y=[lbl for lbl, _ in pairs][::-1], orientation="h",
                             name=name))
    fig.update_layout(title=title or "Top features in the conversation", xaxis_title="activation", barmode="group",
                      height=max(260, 60 + 26 * max((len(t.y) for t in fig.data), default=1)),
                      margin={"l": 160, "r": 20, "t": 50, "b": 50})
    return _style(fig)


def token_heatmap(table, highlight: str | None = None, title: str | None = None):
    """Features x tokens heatmap of a ``token_activations`` result; ``highlight`` (a feature id) goes on top."""
    go = _go()
    feats = list(table.features)
    rows = list(table.activations)
    if highlight is not None:
        order = sorted(range(len(feats)), key=lambda i: feats[i].id != highlight)
        feats, rows = [feats[i] for i in order], [rows[i] for i in order]
    ticks = [f"{i}:{t!r}"[:24] for i, t in enumerate(table.tokens)]
    fig = go.Figure(go.Heatmap(z=rows, x=list(range(len(table.tokens))), y=[short_label(f.label) for f in feats],
                               customdata=[[t] * 1 for t in table.tokens], colorscale="Magma",
                               hovertemplate="token %{x}<br>%{y}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title or "Feature activation per token",
                      xaxis={"tickmode": "array", "tickvals": list(range(len(ticks))), "ticktext": ticks,
                             "tickangle": -60, "tickfont": {"size": 9}},
                      yaxis={"autorange": "reversed"}, height=max(260, 120 + 24 * len(feats)),
                      margin={"l": 160, "r": 20, "t": 50, "b": 110})
    return _style(fig)


def strength_sweep(sweep, concept: str = "activation", title: str | None = None):
    """Layers x strengths heatmaps of a ``wb.strength_sweep`` table: the concept measure and the KL side effect.

    ``concept`` is the column shown on the left (``"activation"``, the feature's own, or ``"score"``,
    yours); hovering a cell shows its text sample.
    """
    go = _go()
    from plotly.subplots import make_subplots

    if concept not in ("activation", "score"):
        raise ValidationError(f"concept={concept!r} is not allowed; allowed: ['activation', 'score']")
    df = sweep.sort_values(["layer", "strength"])
    layers = sorted(df.layer.unique().tolist())
    strengths = sorted(df.strength.unique().tolist())

    def grid(column):
        return [[float(df[(df.layer == l) & (df.strength == s)][column].iloc[0]) for s in strengths] for l in layers]

    def hover(l, s):
        row = df[(df.layer == l) & (df.strength == s)].iloc[0]
        text = str(row.text).replace("\n", " ")
        wrapped = "<br>".join(text[i:i + 60] for i in range(0, min(len(text), 240), 60))
        return f"layer {l}, strength {s:g}<br>{concept} {row[concept]:.3g} · KL {row.kl:.3g} nats<br><i>{wrapped}</i>"

    texts = [[hover(l, s) for s in strengths] for l in layers]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.24,
                        subplot_titles=(f"concept: {concept}", "side effect: KL to baseline (nats)"))
    x = [f"{s:g}" for s in strengths]
    y = [str(l) for l in layers]
    fig.add_trace(go.Heatmap(z=grid(concept), x=x, y=y, text=texts, hoverinfo="text", colorscale="Viridis",
                             colorbar={"x": 0.39, "thickness": 14, "title": {"text": concept}}, name=concept), 1, 1)
    fig.add_trace(go.Heatmap(z=grid("kl"), x=x, y=y, text=texts, hoverinfo="text", colorscale="Inferno",
                             colorbar={"thickness": 14, "title": {"text": "KL"}}, name="kl"), 1, 2)
    for col in (1, 2):
        fig.update_xaxes(title_text="strength (× median residual norm)", row=1, col=col)
        fig.update_yaxes(title_text="layer", row=1, col=col)
    fig.update_layout(title=title or "Strength sweep", height=max(300, 140 + 50 * len(layers)),
                      margin={"l": 60, "r": 20, "t": 80, "b": 60})
    return _style(fig)


def export(fig, path, format: str | None = None, scale: float = 2.0) -> Path:
    """Write ``fig`` as HTML (offline, plotly.js inlined), PNG, SVG, PDF or JSON, by suffix or ``format``.

    Static images use kaleido, which drives a Chromium found on PATH (``BROWSER_PATH`` overrides);
    HTML and JSON need no browser.
    """
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValidationError(f"format {fmt!r} is not allowed; allowed: {list(FORMATS)}")
    if path.suffix.lstrip(".").lower() != fmt:
        path = path.with_suffix("." + fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "html":
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
    elif fmt == "json":
        fig.write_json(str(path))
    else:
        fig.write_image(str(path), format=fmt, scale=scale)
    return path


EVAL_SCORES = ("concept", "instruction", "fluency", "hm")


def steering_scores(evaluation, title: str | None = None):
    """Mean concept / instruction / fluency / harmonic score against strength, a line per layer.

    Takes a ``wb.evaluate_steering`` table or ``best_steering(...).sweep``; the best cell (highest mean
    harmonic score) is ringed.

    >>> fig = wb.plots.steering_scores(await wb.evaluate_steering(model, "concept/pirate", strengths=[0.2, 0.4]))  # doctest: +SKIP
    """
    go = _go()
    from plotly.subplots import make_subplots

    missing = {"layer", "strength", *EVAL_SCORES} - set(evaluation.columns)
    if missing:
        raise ValidationError(f"an evaluation table needs the columns {sorted(missing)}")
    # a line per layer (and per repetition penalty, when the sweep tried several)
    keys = ["layer"] + (["repetition_penalty"] if evaluation.get("repetition_penalty", pd.Series([1.0])).nunique() > 1 else [])
    table = evaluation.groupby([*keys, "strength"], as_index=False)[list(EVAL_SCORES)].mean()
    best = table.sort_values("hm", ascending=False, kind="stable").iloc[0]
    names = {"concept": "concept", "instruction": "instruction", "fluency": "fluency", "hm": "harmonic mean"}
    fig = make_subplots(rows=1, cols=4, subplot_titles=[names[s] for s in EVAL_SCORES], shared_yaxes=True,
                        horizontal_spacing=0.04)
    for i, (key, rows) in enumerate(table.groupby(keys, sort=True)):
        key = key if isinstance(key, tuple) else (key,)
        name = f"layer {key[0]:g}" + (f", rep. penalty {key[1]:g}" if len(key) > 1 else "")
        rows = rows.sort_values("strength")
        for col, score in enumerate(EVAL_SCORES, start=1):
            fig.add_trace(go.Scatter(x=rows.strength, y=rows[score], mode="lines+markers", name=name,
                                     legendgroup=name, showlegend=col == 1,
                                     line={"color": PALETTE[i % len(PALETTE)], "dash": "dot" if len(key) > 1 and key[1] != 1.0 else "solid"}), 1, col)
    fig.add_trace(go.Scatter(x=[best.strength], y=[best.hm], mode="markers", name=f"best: layer {best.layer:g}, {best.strength:g}",
                             marker={"size": 16, "symbol": "circle-open", "color": "black", "line": {"width": 2}}), 1, 4)
    fig.update_yaxes(range=[0, 2.05])
    fig.update_yaxes(title_text="score (0-2)", row=1, col=1)
    fig.update_xaxes(title_text="strength")
    fig.update_layout(title=title or f"Steering quality ({evaluation.attrs.get('judge', 'offline')} judge)", height=360,
                      margin={"l": 60, "r": 20, "t": 80, "b": 60})
    return _style(fig)


def steering_comparison(results, title: str | None = None):
    """Grouped bars per concept: fixed-strength difference of means, each method at its auto setting, prompting.

    Takes the table ``benchmarks/steering_eval.py`` writes (columns ``concept``, ``fixed_mean_diff``,
    ``auto_<method>``, ``prompting``); the last group is the mean over concepts.
    """
    go = _go()
    df = results.copy()
    methods = [c.removeprefix("auto_") for c in df.columns
               if c.startswith("auto_") and not c.endswith(("_setting", "_concept", "_instruction", "_fluency"))]
    bars = [("fixed_mean_diff", "difference of means at 0.4")] + [(f"auto_{m}", f"{m}, auto") for m in methods]
    bars += [("prompting", "prompting")]
    mean = {c: df[c].mean() for c, _ in bars}
    x = list(df.concept) + ["mean"]
    fig = go.Figure()
    for i, (column, name) in enumerate(bars):
        fig.add_trace(go.Bar(x=x, y=list(df[column]) + [mean[column]], name=name,
                             marker_color=PALETTE[i % len(PALETTE)]))
    fig.update_layout(barmode="group", title=title or "Steering quality on held-out prompts (harmonic mean, 0-2)",
                      yaxis_title="harmonic mean of concept, instruction, fluency", height=380,
                      margin={"l": 60, "r": 20, "t": 60, "b": 60})
    return _style(fig)


# -- monitoring and lenses -----------------------------------------------------------------------
def projections_data(data) -> dict:
    """Monitored values as a plain dict (``names, layers, values [position][probe], tokens, prompt_len,
    boundaries [int], roles, steered``): accepts a ``workbench.monitor.Projections``, the API's
    ``ProjectionsBody`` or such a dict."""
    if hasattr(data, "to_dict") and hasattr(data, "names"):       # monitor.Projections
        d = data.to_dict()
    elif hasattr(data, "model_dump"):                              # ProjectionsBody
        d = data.model_dump()
    elif isinstance(data, dict):
        d = dict(data)
    else:
        raise ValidationError(f"expected Projections, a ProjectionsBody or a dict, got {type(data).__name__}")
    missing = {"names", "values", "prompt_len"} - set(d)
    if missing:
        raise ValidationError(f"projections need the keys {sorted(missing)}")
    bounds = list(d.get("boundaries") or [])
    roles = list(d.get("roles") or [getattr(b, "role", "") for b in bounds])
    values = d["values"]
    values = values.tolist() if hasattr(values, "tolist") else [list(row) for row in values]
    return {"names": list(d["names"]), "layers": list(d.get("layers") or [None] * len(d["names"])),
            "values": values, "tokens": list(d.get("tokens") or []), "prompt_len": int(d["prompt_len"]),
            "boundaries": [int(getattr(b, "start_token", b)) for b in bounds], "roles": roles,
            "steered": list(d["steered"]) if d.get("steered") is not None else None}


def _runs(flags) -> list[tuple[int, int]]:
    """``[(first, last)]`` of each run of True in ``flags``."""
    runs, start = [], None
    for i, flag in enumerate(list(flags) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def projections(data, threshold=None, probes=None, title: str | None = None):
    """Probe values over token positions: a line per probe, dashed lines at message starts and at the
    reply (``prompt_len``), the threshold as a horizontal line, steered positions shaded.

    ``threshold``: a number, a list of numbers, or ``{probe: number}`` (drawn in that probe's colour).
    Shapes carry names (``boundary``, ``reply``, ``threshold``, ``steered``), so code can find them.

    >>> [reply] = await model.chat(chat, monitor=["concept/pirate"], max_tokens=32)   # doctest: +SKIP
    >>> wb.plots.projections(reply.projections, threshold=0.5)                        # doctest: +SKIP
    """
    go = _go()
    d = projections_data(data)
    names = d["names"] if probes is None else [n for n in d["names"] if n in set(probes)]
    n = len(d["values"])
    x = list(range(n))
    tokens = [d["tokens"][p] if p < len(d["tokens"]) else "" for p in x]
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(d["names"])}
    fig = go.Figure()
    for name in names:
        k = d["names"].index(name)
        layer = d["layers"][k]
        fig.add_trace(go.Scatter(
            x=x, y=[row[k] for row in d["values"]], text=tokens, mode="lines+markers", marker={"size": 4},
            name=f"{name} (layer {layer})" if layer is not None else name, line={"color": colours[name]},
            meta={"probe": name, "layer": layer},
            hovertemplate=f"{name}<br>position %{{x}}: %{{text}}<br>value %{{y:.3f}}<extra></extra>"))
    shapes, notes = [], []
    for b, role in zip(d["boundaries"], d["roles"] + [""] * len(d["boundaries"])):
        shapes.append({"type": "line", "name": "boundary", "x0": b - 0.5, "x1": b - 0.5, "xref": "x", "y0": 0, "y1": 1,
                       "yref": "y domain", "line": {"dash": "dot", "color": "#9aa5b1", "width": 1}})
        notes.append({"x": b - 0.5, "y": 1.0, "xref": "x", "yref": "y domain", "text": role, "showarrow": False,
                      "xanchor": "left", "yanchor": "top", "font": {"size": 10, "color": "#6b7785"}})
    P = d["prompt_len"]
    shapes.append({"type": "line", "name": "reply", "x0": P - 0.5, "x1": P - 0.5, "xref": "x", "y0": 0, "y1": 1,
                   "yref": "y domain", "line": {"dash": "dash", "color": "#333", "width": 1.5}})
    notes.append({"x": P - 0.5, "y": 1.0, "xref": "x", "yref": "y domain", "text": "reply", "showarrow": False,
                  "xanchor": "left", "yanchor": "bottom", "font": {"size": 10}})
    if threshold is not None:
        items = (threshold.items() if isinstance(threshold, dict)
                 else [(None, t) for t in (threshold if isinstance(threshold, (list, tuple)) else [threshold])])
        for probe, t in items:
            shapes.append({"type": "line", "name": "threshold", "x0": 0, "x1": 1, "xref": "x domain", "y0": float(t),
                           "y1": float(t), "yref": "y",
                           "line": {"dash": "dash", "color": colours.get(probe, "#b00020"), "width": 1.5}})
    for first, last in _runs(d["steered"] or []):
        shapes.append({"type": "rect", "name": "steered", "x0": first - 0.5, "x1": last + 0.5, "xref": "x", "y0": 0,
                       "y1": 1, "yref": "y domain", "fillcolor": "#ff7f0e", "opacity": 0.15, "line": {"width": 0},
                       "layer": "below"})
    steered = sum(bool(s) for s in d["steered"] or [])
    fig.update_layout(title=title or ("Probe values per token" + (f" · {steered} steered" if d["steered"] else "")),
                      xaxis_title="token position (prompt, then reply)", yaxis_title="probe value",
                      xaxis={"range": [-0.5, max(n, P + 1) - 0.5]}, shapes=shapes, annotations=notes, height=340,
                      margin={"l": 60, "r": 20, "t": 50, "b": 50}, legend={"font": {"size": 10}},
                      hovermode="closest")
    return _style(fig)


def _lens_dict(result) -> dict:
    if hasattr(result, "to_dict") and hasattr(result, "top_probs"):    # lens.LogitLens
        return result.to_dict()
    if hasattr(result, "model_dump"):                                   # LogitLensResponse
        return result.model_dump()
    if isinstance(result, dict) and {"layers", "tokens", "top_tokens", "top_probs"} <= set(result):
        return result
    raise ValidationError(f"expected a LogitLens, a LogitLensResponse or its dict, got {type(result).__name__}")


def logit_lens(result, title: str | None = None):
    """Layers x positions heatmap of the logit lens: colour = the top-1 prediction's probability, text = it.

    Hovering a cell shows the top-k predictions of that layer at that position.

    >>> wb.plots.logit_lens(await wb.logit_lens(model, chat, top_k=3))     # doctest: +SKIP
    """
    go = _go()
    d = _lens_dict(result)
    layers, tokens = list(d["layers"]), list(d["tokens"])
    probs = [[float(cell[0]) for cell in row] for row in d["top_probs"]]
    top1 = [[cell[0] for cell in row] for row in d["top_tokens"]]
    hover = [[f"layer {layer} · position {p} ({tokens[p]!r})<br>"
              + "<br>".join(f"{t!r}: {float(q):.2f}" for t, q in zip(d["top_tokens"][li][p], d["top_probs"][li][p]))
              for p in range(len(tokens))] for li, layer in enumerate(layers)]
    ticks = [f"{i}:{t!r}"[:20] for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=probs, x=list(range(len(tokens))), y=layers, text=top1, texttemplate="%{text}",
                               textfont={"size": 8}, customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                               colorscale="Blues", zmin=0, zmax=1, colorbar={"title": {"text": "top-1 prob"}}))
    fig.update_layout(title=title or "Logit lens: each layer's top next-token prediction",
                      xaxis={"tickmode": "array", "tickvals": list(range(len(ticks))), "ticktext": ticks,
                             "tickangle": -60, "tickfont": {"size": 9}, "title": "position"},
                      yaxis={"title": "layer"}, height=max(320, 120 + 16 * len(layers)),
                      margin={"l": 60, "r": 20, "t": 50, "b": 110})
    return _style(fig)


def _token_scores(rows) -> list[tuple[str, float]]:
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):           # a DataFrame
        rows = rows.to_dict("records")
    out = []
    for r in rows:
        r = r if isinstance(r, dict) else (r.model_dump() if hasattr(r, "model_dump") else vars(r))
        out.append((str(r["token"]), float(r["score"])))
    return out


def direction_tokens(result, title: str | None = None):
    """Two bar charts: the tokens a direction promotes and the ones it suppresses (``lens.direction``).

    >>> wb.plots.direction_tokens(wb.direction_tokens(model, model.features["concept/pirate"]))   # doctest: +SKIP
    """
    go = _go()
    from plotly.subplots import make_subplots

    get = (lambda k: getattr(result, k)) if not isinstance(result, dict) else result.__getitem__
    promoted, suppressed = _token_scores(get("promoted")), _token_scores(get("suppressed"))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("promoted", "suppressed"), horizontal_spacing=0.25)
    for col, (name, pairs, colour) in enumerate((("promoted", promoted, "#2ca02c"),
                                                 ("suppressed", suppressed, "#d62728")), start=1):
        fig.add_trace(go.Bar(x=[s for _, s in pairs][::-1], y=[repr(t) for t, _ in pairs][::-1], orientation="h",
                             name=name, marker_color=colour, meta={"side": name}), 1, col)
    fig.update_layout(title=title or "Tokens the direction writes toward (unembedding)", showlegend=False,
                      height=max(260, 80 + 18 * max(len(promoted), len(suppressed), 1)),
                      margin={"l": 100, "r": 20, "t": 60, "b": 40})
    fig.update_xaxes(title_text="logit score")
    return _style(fig)
