"""Figure builders (workbench.plots) and the strength sweep: what is drawn is the data, exports are real files."""

import math

import pandas as pd
import pytest

import workbench as wb
from workbench import plots

PIRATE = ("arr", "ahoy", "matey", " ye ", "yer", "aye", "treasure", "ship", "captain", "sail")


def _norms(n_layers=4, roles=("user", "assistant"), tokens=6, bump=0.0):
    rows = []
    for layer in range(n_layers):
        for m, role in enumerate(roles):
            for t in range(tokens):
                pos = m * tokens + t
                rows.append((layer, pos, f"t{pos}", m, role, 10.0 * (layer + 1) + m + bump + (1000 if pos == 0 else 0)))
    return pd.DataFrame(rows, columns=["layer", "position", "token", "message_idx", "role", "norm"])


def test_layer_norms_draws_one_line_per_role_and_variant_from_the_data():
    fig = plots.layer_norms(_norms(), _norms(bump=5.0), by="role")
    assert [(t.meta["variant"], t.meta["group"]) for t in fig.data] == [
        ("baseline", "assistant"), ("baseline", "user"), ("steered", "assistant"), ("steered", "user")]
    user_base = next(t for t in fig.data if t.meta == {"variant": "baseline", "group": "user"})
    # position 0 (the outlier token) is left out: the median of layer L's user tokens is 10 (L + 1)
    assert list(user_base.x) == [0, 1, 2, 3] and list(user_base.y) == [10.0, 20.0, 30.0, 40.0]
    steered_user = next(t for t in fig.data if t.meta == {"variant": "steered", "group": "user"})
    assert list(steered_user.y) == [15.0, 25.0, 35.0, 45.0]
    assert fig.layout.xaxis.title.text == "layer" and "norm" in fig.layout.yaxis.title.text
    by_message = plots.layer_norms(_norms(), by="message", layers=[1, 2])
    assert {t.meta["group"] for t in by_message.data} == {"0: user", "1: assistant"}
    assert all(list(t.x) == [1, 2] for t in by_message.data)


def test_message_heatmap_and_difference():
    heat = plots.message_heatmap(_norms()).data[0]
    assert list(heat.y) == ["0: user", "1: assistant"] and list(heat.x) == [0, 1, 2, 3]
    assert heat.z[1][2] == 31.0
    diff = plots.message_heatmap(_norms(bump=5.0), baseline=_norms()).data[0]
    assert all(v == 5.0 for row in diff.z for v in row)


@pytest.mark.parametrize("bad, match", [
    (lambda: plots.layer_norms(_norms(), stat="mode"), "stat 'mode'"),
    (lambda: plots.layer_norms(_norms(), by="token"), "by='token'"),
    (lambda: plots.norms_frame(pd.DataFrame({"x": [1]})), "needs the columns"),
    (lambda: plots.export(plots.layer_norms(_norms()), "/tmp/x.bmp"), "format 'bmp'"),
])
def test_bad_plot_arguments_say_what_is_allowed(bad, match):
    with pytest.raises(wb.ValidationError, match=match):
        bad()


def test_exports_png_svg_html_show_the_data(tmp_path):
    fig = plots.layer_norms(_norms(), _norms(bump=5.0))
    png = plots.export(fig, tmp_path / "n.png")
    svg = plots.export(fig, tmp_path / "n.svg")
    html = plots.export(fig, tmp_path / "n.html")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = svg.read_text()
    assert text.count('class="trace scatter') == len(fig.data) == 4       # one drawn trace per line
    assert "baseline · user" in text and "layer" in text
    assert html.stat().st_size > 1_000_000 and "steered \\u00b7 assistant" in html.read_text()  # plotly.js inlined


async def test_strength_sweep_on_the_pirate_concept_rises_in_concept_and_kl(default_model):
    pirate = default_model.features["concept/pirate"]
    df = await wb.strength_sweep(default_model, pirate, layers=[4, pirate.layer], strengths=(0.0, 0.2, 0.4),
                                 max_tokens=32, score=lambda t: sum(t.lower().count(w) for w in PIRATE))
    assert len(df) == 6 and set(df.columns) >= {"layer", "strength", "text", "activation", "score", "kl"}
    # strength 0 is the baseline up to float rounding: its logits come from other batches (other padding)
    # and other prefix-cache hits than the baseline's, which moves logits by ~1e-5 on some CPUs (KL ~1e-11)
    assert (df[df.strength == 0].kl.abs() < 1e-8).all(), df[df.strength == 0].kl.tolist()
    assert df[df.strength == 0].text.nunique() == 1
    mean = df.groupby("strength")[["activation", "kl"]].mean()
    assert list(mean.activation) == sorted(mean.activation) and mean.activation.iloc[-1] > 2 * mean.activation.iloc[0]
    assert list(mean.kl) == sorted(mean.kl) and mean.kl.iloc[-1] > 0.2
    fig = plots.strength_sweep(df)
    concept, kl = fig.data
    assert concept.z[1][2] == pytest.approx(float(df[(df.layer == pirate.layer) & (df.strength == 0.4)].activation.iloc[0]))
    assert list(kl.x) == ["0", "0.2", "0.4"] and list(kl.y) == ["4", str(pirate.layer)]
    assert "strength 0.4" in concept.text[1][2] and not any(math.isnan(v) for row in kl.z for v in row)
    raw = await wb.strength_sweep(default_model, pirate.direction * 3, layers=[pirate.layer], strengths=(0.0, 0.3),
                                  max_tokens=8)
    assert raw.activation.isna().all() and raw.kl.iloc[1] > 0


def _projections(steered=None):
    """Two probes over a 6-token prompt (system at 0, user at 2) and a 4-token reply."""
    return {"names": ["concept/pirate", "dir"], "layers": [7, 3],
            "values": [[0.1 * p, -0.1 * p] for p in range(10)], "token_ids": list(range(10)),
            "tokens": [f"t{p}" for p in range(10)], "prompt_len": 6, "boundaries": [0, 2], "roles": ["system", "user"],
            "steered": steered}


def _shapes(fig, name):
    return [s for s in fig.layout.shapes if s.name == name]


def test_projections_plot_draws_a_line_per_probe_boundaries_threshold_and_steered_runs():
    steered = [False] * 7 + [True, True, False]
    fig = plots.projections(_projections(steered), threshold=0.5)
    assert [t.meta["probe"] for t in fig.data] == ["concept/pirate", "dir"]
    pirate = fig.data[0]
    assert list(pirate.x) == list(range(10)) and list(pirate.y) == [0.1 * p for p in range(10)]
    assert pirate.text[7] == "t7" and "layer 7" in pirate.name
    assert [s.x0 for s in _shapes(fig, "boundary")] == [-0.5, 1.5]         # before each message's first token
    assert [s.x0 for s in _shapes(fig, "reply")] == [5.5]                   # between prompt and reply
    [line] = _shapes(fig, "threshold")
    assert line.y0 == line.y1 == 0.5 and line.xref == "x domain"
    [run] = _shapes(fig, "steered")
    assert (run.x0, run.x1) == (6.5, 8.5)                                    # positions 7 and 8
    assert {a.text for a in fig.layout.annotations} == {"system", "user", "reply"}
    assert tuple(fig.layout.xaxis.range) == (-0.5, 9.5)
    # per-probe thresholds take the probe's colour; `probes=` picks lines; no condition -> no shading
    two = plots.projections(_projections(), threshold={"dir": -0.2, "concept/pirate": 0.3}, probes=["dir"])
    assert [t.meta["probe"] for t in two.data] == ["dir"] and not _shapes(two, "steered")
    assert sorted(s.y0 for s in _shapes(two, "threshold")) == [-0.2, 0.3]
    assert not _shapes(plots.projections(_projections()), "threshold")


def test_projections_plot_takes_the_api_body_and_the_kernel_object():
    import torch

    from workbench.api.schemas import ProjectionsBody
    from workbench.chat import MessageBoundary
    from workbench.monitor import Projections

    d = _projections([False] * 6 + [True] * 4)
    body = ProjectionsBody(**d)
    kernel = Projections(names=d["names"], layers=d["layers"], values=torch.tensor(d["values"]),
                         token_ids=d["token_ids"], prompt_len=6, tokens=d["tokens"],
                         boundaries=[MessageBoundary(0, "system", "s", 0, 2), MessageBoundary(1, "user", "u", 2, 6)],
                         steered=d["steered"])
    figs = [plots.projections(x) for x in (d, body, kernel)]
    for fig in figs:
        assert [list(t.y) for t in fig.data] == [pytest.approx(list(t.y)) for t in figs[0].data]
        assert [(s.name, s.x0) for s in fig.layout.shapes] == [(s.name, s.x0) for s in figs[0].layout.shapes]
    with pytest.raises(wb.ValidationError, match="prompt_len"):
        plots.projections({"names": ["x"], "values": []})


def test_logit_lens_heatmap_and_direction_bars_show_the_data():
    lens = {"layers": [0, 5], "tokens": ["a", "b", "c"], "token_ids": [1, 2, 3],
            "top_tokens": [[["x", "y"], ["y", "x"], ["z", "x"]], [["b", "x"], ["c", "x"], ["d", "x"]]],
            "top_probs": [[[0.1, 0.05], [0.2, 0.1], [0.3, 0.2]], [[0.7, 0.1], [0.8, 0.1], [0.9, 0.05]]]}
    [heat] = plots.logit_lens(lens).data
    assert list(heat.y) == [0, 5] and list(heat.x) == [0, 1, 2]
    assert heat.z[1][2] == 0.9 and heat.text[1][2] == "d" and heat.text[0][0] == "x"
    assert "'z': 0.30" in heat.customdata[0][2] and "'x': 0.20" in heat.customdata[0][2]   # the top-k on hover
    tokens = {"promoted": [{"token": " arr", "token_id": 5, "score": 3.0}, {"token": " ship", "token_id": 6, "score": 2.0}],
              "suppressed": [{"token": " the", "token_id": 7, "score": -1.5}]}
    promoted, suppressed = plots.direction_tokens(tokens).data
    assert (promoted.meta["side"], list(promoted.x), list(promoted.y)) == ("promoted", [2.0, 3.0], ["' ship'", "' arr'"])
    assert list(suppressed.x) == [-1.5] and list(suppressed.y) == ["' the'"]
    with pytest.raises(wb.ValidationError, match="LogitLens"):
        plots.logit_lens({"layers": []})
