"""The widget panels, driven headlessly through the widget API (values, set_state, clicks), on the
default model, in-process and through a real `workbench serve`-style HTTP server."""

import asyncio
import json

import pytest

import workbench as wb
from widgets import ChatPanel, FeaturePicker, InspectPanel, MonitorPanel, NormsPanel, SteeringDials, StreamText, Workbench

TOKYO = "Give me tourist information about Tokyo."
PIRATE_WORDS = ("arr", "ahoy", "matey", "ye ", "yer", "aye", "treasure", "ship", "sea", "captain", "sail")


@pytest.fixture(autouse=True)
def _close_widgets():
    yield
    import ipywidgets

    ipywidgets.Widget.close_all()


@pytest.fixture(params=["inprocess", "http"])
def source(request, default_model):
    if request.param == "inprocess":
        return default_model
    return wb.Client(base_url=request.getfixturevalue("http_server"))


def pirate_words(text: str) -> int:
    low = text.lower()
    return sum(low.count(w) for w in PIRATE_WORDS)


async def test_pirate_flow_fills_both_columns_plots_and_exports(source, tmp_path):
    """search 'pirate' -> pick -> strength 0.5 -> send -> both columns, pirate words, norms for every layer, export."""
    bench = Workbench(source)
    await bench.wait()
    bench.picker.query.set_state({"value": "pirate"})     # what typing in the browser does
    await bench.wait()
    assert bench.picker.items and bench.picker.items[0].id == "concept/pirate"
    bench.picker.pick_button.click()
    assert [r.key for r in bench.dials.rows] == ["concept/pirate"]
    bench.dials.slider("concept/pirate").set_state({"value": 0.5})
    # the feature id rides along (index_in_sae alone can be ambiguous across SAEs)
    assert bench.dials.variant.get_interventions() == [{"index_in_sae": bench.picker.items[0].index_in_sae,
                                                        "strength": 0.5, "mode": "add", "feature_id": "concept/pirate"}]
    bench.chat.message.set_state({"value": TOKYO})
    bench.chat.send_button.click()
    await bench.wait()
    assert bench.chat.error.value == "" and bench.norms.error.value == "" and bench.inspect.error.value == ""
    baseline, steered = bench.chat.baseline_view.text, bench.chat.steered_view.text
    assert baseline.startswith(f"You: {TOKYO}\n\nAssistant: ") and len(baseline) > 200
    assert len(steered) > 200 and steered != baseline
    reply_b = bench.chat.history["baseline"][-1]["content"]
    reply_s = bench.chat.history["steered"][-1]["content"]
    assert pirate_words(reply_s) >= 3 > pirate_words(reply_b), (reply_b, reply_s)
    # the baseline column is exactly the unsteered greedy reply
    direct = await wb.AsyncClient(source).chat.completions.create(
        model="default", messages=[{"role": "user", "content": TOKYO}], temperature=0.0, max_completion_tokens=128,
        seed=0) if isinstance(source, wb.SteerModel) else None
    if direct is not None:
        assert reply_b == direct.choices[0].message.content
    # norms: one line per role for both variants, every layer present
    layers_seen = {x for trace in bench.norms.layer_figure.data for x in trace.x}
    assert layers_seen == set(range(30))
    assert {t.meta["variant"] for t in bench.norms.layer_figure.data} == {"baseline", "steered"}
    heat = bench.norms.message_figure.data[0]
    assert list(heat.x) == list(range(30)) and len(heat.y) == 2
    # the synced state a page reload renders from holds the current data, not the first (empty) figure
    assert len(bench.norms.layer_figure._widget_data) == len(bench.norms.layer_figure.data) > 0
    assert bench.inspect.items and len(bench.inspect.token_figure.data[0].z) == len(bench.inspect.items)
    # panels keep ipywidgets' own model/view class names (a browser or Voila builds them from these)
    assert {(p._model_name, p._view_name) for p in [bench, *bench.panels]} == {("VBoxModel", "VBoxView")}
    written = bench.norms.export.save(tmp_path / "norms", "png") + bench.norms.export.save(tmp_path / "norms", "html")
    for path in written:
        assert path.stat().st_size > 5000, path
    assert written[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plotly" in written[2].read_text()[:200000].lower()


async def test_moving_a_dial_regenerates_only_the_steered_reply(default_model):
    bench = Workbench(default_model, plots=False)
    pirate = default_model.features["concept/pirate"]
    bench.dials.add_feature(pirate, strength=0.0)
    bench.chat.max_tokens.value = 24
    bench.chat.send(TOKYO)
    await bench.wait()
    first_baseline = bench.chat.baseline_view.text
    assert bench.chat.history["steered"][-1] == bench.chat.history["baseline"][-1]   # strength 0 == baseline
    bench.dials.slider("concept/pirate").value = 0.5
    await bench.wait()
    assert bench.chat.baseline_view.text == first_baseline
    assert len(bench.chat.history["steered"]) == 2                                   # replaced, not appended
    assert bench.chat.history["steered"][-1] != bench.chat.history["baseline"][-1]
    assert bench.chat.steered_view.text.count("Assistant:") == 1
    # global off -> the regenerated steered reply is the baseline again
    bench.dials.enabled.value = False
    await bench.wait()
    assert bench.chat.history["steered"][-1] == bench.chat.history["baseline"][-1]


async def test_stop_mid_stream_keeps_the_partial_reply_and_the_panel_usable(default_model):
    chat = ChatPanel(default_model, max_tokens=400)
    chat.send("Write a very long story about a dragon.")
    for _ in range(400):
        await asyncio.sleep(0.02)
        if len(chat.history["baseline"][-1:]) and chat.baseline_view.value.count(" ") > 25:
            break
    assert chat.streaming
    chat.stop_button.click()
    await chat.wait()
    assert not chat.streaming and chat.status.value == "stopped"
    assert 0 < chat.timing["baseline_tokens"] < 400
    assert chat.history["baseline"][-1]["role"] == "assistant"
    chat.max_tokens.value = 8
    chat.send("Hi!")
    await chat.wait()
    assert chat.error.value == "" and len(chat.history["baseline"]) == 4


async def test_errors_show_in_the_panel_not_as_a_traceback(default_model):
    chat = ChatPanel(default_model)
    chat.send_button.click()                                  # empty message
    assert "EmptyInputError" in chat.error.value
    down = ChatPanel(wb.Client(base_url="http://127.0.0.1:9"))  # nothing listens on port 9
    down.send("hello")
    await down.wait()
    assert "APIConnectionError" in down.error.value and down.stop_button.disabled
    picker = FeaturePicker(wb.AsyncClient(base_url="http://127.0.0.1:9"))
    picker.query.value = "pirate"
    await picker.wait()
    assert "APIConnectionError" in picker.error.value
    dials = SteeringDials(default_model)
    dials.add_feature(default_model.features["concept/pirate"], strength=0.5)
    panel = ChatPanel(default_model, variant=wb.Variant("default").add_intervention(999, 0.5))
    panel.send("hello")
    await panel.wait()
    assert "999" in panel.error.value                           # unknown feature, said in the panel
    await asyncio.gather(dials.wait(), chat.wait())


async def test_picker_debounces_typing(default_model, monkeypatch):
    picker = FeaturePicker(default_model)
    calls = []
    real = picker.client.features.search

    async def counting(*a, **kw):
        calls.append(a[0])
        return await real(*a, **kw)

    monkeypatch.setattr(picker.client.features, "search", counting)
    for prefix in ("p", "pi", "pir", "pira", "pirat", "pirate"):
        picker.query.value = prefix
        await asyncio.sleep(0.01)
    await picker.wait()
    assert calls == ["pirate"] and picker.items[0].id == "concept/pirate"


async def test_inspect_click_adds_a_feature_to_the_dials(default_model):
    bench = Workbench(default_model)
    bench.chat.max_tokens.value = 16
    bench.chat.send("Arr, tell me about pirate ships and treasure, matey!")
    await bench.wait()
    items = bench.inspect.items
    assert items and bench.dials.rows == []
    bar = bench.inspect.bar_figure.data[0]
    bench.inspect._on_bar_click(bar, type("P", (), {"point_inds": [len(items) - 1]})(), None)  # the top bar
    assert [r.key for r in bench.dials.rows] == [items[0].id]
    bench.inspect.feature.value = 1
    bench.inspect.add_button.click()
    assert [r.key for r in bench.dials.rows] == [items[0].id, items[1].id]
    assert bench.inspect.token_figure.data[0].y[0] == wb.plots.short_label(items[1].label)  # chosen feature on top
    await bench.wait()   # the new dials regenerate the steered reply and redraw


def test_norms_panel_controls_redraw_from_fetched_data(default_model):
    panel = NormsPanel(default_model)

    async def go():
        await panel.refresh([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}],
                            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Arr matey!"}],
                            [{"index_in_sae": default_model.features["concept/pirate"].index_in_sae, "strength": 0.4}])

    asyncio.run(go())
    assert {x for t in panel.layer_figure.data for x in t.x} == set(range(30))
    panel.layers.value = (5, 9)
    assert {x for t in panel.layer_figure.data for x in t.x} == set(range(5, 10))
    panel.by.value = "message"
    assert {t.meta["group"] for t in panel.layer_figure.data} == {"0: user", "1: assistant"}
    panel.heatmap.value = "difference"
    z = panel.message_figure.data[0].z
    assert abs(z[0][0]) < 1e-3 * 100       # the user message is the same on both sides at layer 5 (before layer 6)
    assert panel.message_figure._widget_data[0]["z"] == list(map(list, z))


def _traffic(monkeypatch):
    """Record the JSON size of every comm message any widget sends."""
    import comm.base_comm

    sizes = []
    real = comm.base_comm.BaseComm.send

    def send(self, data=None, metadata=None, buffers=None):
        sizes.append(len(json.dumps(data, default=str)))
        return real(self, data, metadata, buffers)

    monkeypatch.setattr(comm.base_comm.BaseComm, "send", send)
    return sizes


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The tiny random model with room for a 400-token reply."""
    from conftest import build_tiny_model

    model = wb.load(str(build_tiny_model(tmp_path_factory.mktemp("tiny-long"), max_positions=1024)))
    yield model
    model.close()


async def test_stream_traffic_per_token_stays_constant(long_tiny, monkeypatch):
    """Over a 400-token reply the messages per token do not grow with the text (deltas, not the whole text)."""
    chat = ChatPanel(long_tiny, max_tokens=400)
    view = chat.steered_view
    sizes = []
    real_send = view.send
    monkeypatch.setattr(view, "send", lambda content, buffers=None: (sizes.append(len(json.dumps(content))),
                                                                    real_send(content, buffers))[1])
    all_sizes = _traffic(monkeypatch)
    chat.send("hello")
    await chat.wait()
    n = chat.timing["steered_tokens"]
    assert chat.timing["steered_finish"] == "length" and n >= 200, n   # 400 tokens; a few join into one character
    deltas = sizes[1:]                                # the first message is the "You: ..." header
    assert len(deltas) == n
    first, last = sum(deltas[:100]) / 100, sum(deltas[-100:]) / 100
    assert last <= 2 * first + 20, (first, last)
    # everything the panel sent while streaming: a constant per token, plus one full text per column at the end
    total = sum(all_sizes)
    text_len = len(chat.steered_view.text) + len(chat.baseline_view.text)
    assert total < 2 * text_len + 200 * 2 * n, (total, text_len, n)


def test_stream_text_state():
    view = StreamText(kind="steered")
    view.append("Ahoy")
    view.append(", matey")
    assert view.value == "Ahoy, matey" and view.text == ""
    view.flush()
    assert view.text == "Ahoy, matey"
    view.truncate(4)
    view.flush()
    assert view.text == "Ahoy"


async def test_a_raw_vector_added_in_code_gets_a_dial(default_model):
    """A direction registered in code is searchable and steers through the dials in strength units."""
    pirate = default_model.features["concept/pirate"]
    f = await default_model.features.add_vector("pirate copy", pirate.direction * 7.0, layer=pirate.layer)
    try:
        assert f.id.startswith("vector/") and abs(float(f.direction.norm()) - 1) < 1e-5 and f.scale > 10
        assert f.id in [x.id for x in default_model.features.search("pirate copy", top_k=5)]
        dials = SteeringDials(default_model)
        chat = ChatPanel(default_model, max_tokens=24)
        dials.add_feature(f, strength=0.4)
        chat.variant = dials.variant
        chat.send(TOKYO)
        await chat.wait()
        spec = wb.SteeringSpec(layers={f.layer: [wb.AddSpec(f.direction * (0.4 * f.scale))]})
        [ref] = await default_model.chat([{"role": "user", "content": TOKYO}],
                                         wb.SamplingParams(temperature=0.0, max_tokens=24, seed=0), steering=spec)
        assert chat.history["steered"][-1]["content"] == ref.generated != chat.history["baseline"][-1]["content"]
        with pytest.raises(wb.ValidationError, match="hidden size"):
            await default_model.features.add_vector("bad", [1.0, 2.0], layer=3)
    finally:
        default_model.features.remove(f.id)


async def test_a_spec_added_in_code_gets_a_dial_that_scales_its_add_ops(default_model, http_server):
    """A raw SteeringSpec row: its slider multiplies the adds; the same over HTTP as in-process."""
    pirate = default_model.features["concept/pirate"]
    u = pirate.direction
    spec = wb.SteeringSpec(layers={pirate.layer: [wb.AddSpec(u * pirate.scale, scale=0.5),
                                                  wb.ProjectionCapSpec(u, max=0.6 * pirate.scale)]})
    replies = []
    for source in (default_model, wb.Client(base_url=http_server)):
        dials = SteeringDials(source)
        chat = ChatPanel(source, max_tokens=20)
        dials.observe(lambda ch, chat=chat: setattr(chat, "variant", ch["new"]), "variant")
        dials.add_spec("pirate by hand", spec, strength=0.8)
        assert dials.variant.spec is not None and dials.variant.interventions == []
        chat.send(TOKYO)
        await chat.wait()
        assert chat.error.value == ""
        replies.append(chat.history["steered"][-1]["content"])
    expected = wb.SteeringSpec(layers={pirate.layer: [wb.AddSpec(u * pirate.scale, scale=0.4),
                                                      wb.ProjectionCapSpec(u, max=0.6 * pirate.scale)]})
    [ref] = await default_model.chat([{"role": "user", "content": TOKYO}],
                                     wb.SamplingParams(temperature=0.0, max_tokens=20, seed=0), steering=expected)
    assert replies == [ref.generated, ref.generated]
    dials.slider("spec/pirate by hand").value = 0.0          # off: no spec at all
    assert dials.variant.spec is None


async def test_the_repetition_penalty_the_auto_button_found_reaches_the_chat(default_model):
    """The Workbench hands the dials' chosen penalty to the chat, which sends it for both columns."""
    bench = Workbench(default_model, plots=False)
    bench.dials.repetition_penalty = 1.3               # what the auto button sets
    assert bench.chat.repetition_penalty.value == 1.3
    bench.chat.max_tokens.value = 24
    bench.chat.send(TOKYO)
    await bench.wait()
    want = await default_model.chat([{"role": "user", "content": TOKYO}], temperature=0.0, max_tokens=24, seed=0,
                                    repetition_penalty=1.3)
    plain = await default_model.chat([{"role": "user", "content": TOKYO}], temperature=0.0, max_tokens=24, seed=0)
    assert bench.chat.history["baseline"][-1]["content"] == want[0].generated != plain[0].generated


SEA = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Tell me about the sea."}]


def _runs(flags):
    return wb.plots._runs(flags)


async def test_monitor_panel_draws_the_engines_values_live(source, default_model, monkeypatch):
    """One line per probe over prompt + reply, drawn while streaming; the values are the engine's own."""
    panel = MonitorPanel(source, probes=["concept/pirate", "concept/french"], threshold=0.4)
    panel.redraw_interval = 0.0
    live = []
    real = panel._draw
    monkeypatch.setattr(panel, "_draw", lambda data, final=True: (live.append((len(data["values"]), final)),
                                                                  real(data, final))[1])
    data = await panel.watch(SEA, max_tokens=16)
    assert data is panel.data
    [direct] = await default_model.chat(SEA, monitor=["concept/pirate", "concept/french"], temperature=0.0, max_tokens=16)
    pr = direct.projections
    assert panel.reply == direct.generated and panel.error.value == ""
    assert [t.meta["probe"] for t in panel.figure.data] == ["concept/pirate", "concept/french"]
    n = len(pr)
    assert n == pr.prompt_len + 15                        # the last generated token is never fed back
    for k, trace in enumerate(panel.figure.data):
        assert list(trace.x) == list(range(n))
        assert list(trace.y) == pytest.approx(pr.values[:, k].tolist(), abs=1e-4)
    assert tuple(panel.figure.layout.xaxis.range) == (-0.5, n - 0.5)
    shapes = panel.figure.layout.shapes
    assert [s.x0 + 0.5 for s in shapes if s.name == "boundary"] == [b.start_token for b in pr.boundaries]
    assert [s.x0 + 0.5 for s in shapes if s.name == "reply"] == [pr.prompt_len]
    assert [s.y0 for s in shapes if s.name == "threshold"] == [0.4]
    hover = list(panel.figure.data[0].text)
    assert hover == pr.tokens                  # hover: each position's own token, prompt then reply fed back
    # drawn while streaming (growing), then once more in full; the reload state holds the final data
    partial = [k for k, final in live if not final]
    assert len(partial) >= 5 and partial == sorted(partial) and live[-1] == (n, True)
    assert len(panel.figure._widget_data[0]["y"]) == n
    panel.threshold.value = 0.9                            # redraws from what was fetched
    assert [s.y0 for s in panel.figure.layout.shapes if s.name == "threshold"] == [0.9]


async def test_monitor_panel_condition_steers_where_the_engine_says(default_model):
    """The condition controls become the request's condition: steered positions match a direct call."""
    pirate = default_model.features["concept/pirate"]
    spec = wb.SteeringSpec({pirate.layer: [wb.AddSpec(pirate.direction * (0.5 * pirate.scale))]})
    panel = MonitorPanel(default_model, probes=["concept/pirate"], threshold=0.5)
    panel.conditional.value, panel.mode.value = True, "token"
    await panel.watch(SEA[1:], steering=spec, max_tokens=24)
    cond = wb.Condition(pirate, threshold=0.5, mode="token")
    [direct] = await default_model.chat(SEA[1:], steering=wb.SteeringSpec(spec.layers, condition=cond),
                                        monitor=[pirate], temperature=0.0, max_tokens=24)
    steered = direct.projections.steered
    assert panel.reply == direct.generated and panel.data["steered"] == steered and any(steered)
    assert not any(steered[:direct.projections.prompt_len])            # prompt positions are never steered
    rects = [(s.x0 + 0.5, s.x1 - 0.5) for s in panel.figure.layout.shapes if s.name == "steered"]
    assert rects == _runs(steered)
    assert f"{sum(steered)} steered" in panel.status.value
    panel.threshold.value = 1e6                                         # never crossed: no steering at all
    panel.rewatch()                                                      # the Watch button: the last watch() again
    await panel.wait()
    [plain] = await default_model.chat(SEA[1:], temperature=0.0, max_tokens=24)
    assert panel.reply == plain.generated and not any(panel.data["steered"])


async def test_workbench_feeds_the_monitor_from_the_steered_stream(default_model):
    """The dial features are watched on the steered column's own stream; the condition applies to that column."""
    bench = Workbench(default_model)
    bench.dials.add_feature(default_model.features["concept/pirate"], strength=0.4)
    bench.chat.max_tokens.value = 20
    bench.chat.send(TOKYO)
    await bench.wait()
    assert bench.monitor.error.value == "" and bench.chat.error.value == ""
    data = bench.monitor.data
    assert data["names"] == ["concept/pirate"] and len(data["values"]) == data["prompt_len"] + 19
    assert len(bench.monitor.figure.data) == 1 and len(bench.monitor.figure.data[0].x) == len(data["values"])
    steered, baseline = bench.chat.history["steered"][-1]["content"], bench.chat.history["baseline"][-1]["content"]
    assert steered != baseline
    # a condition that never holds: the regenerated steered reply (Watch button) is the baseline
    bench.monitor.conditional.value = True
    bench.monitor.threshold.value = 1e6
    bench.monitor.watch_button.click()
    await bench.wait()
    assert bench.chat.history["steered"][-1]["content"] == baseline and not any(bench.monitor.data["steered"])
    assert len(bench.chat.history["steered"]) == 2                     # regenerated, not appended
    assert "without the monitor's condition" in bench.status.value      # the plots say what they show


async def test_the_monitor_never_holds_back_a_token_to_draw(default_model):
    """A live redraw comes after the chunk has gone on: the first token is not delayed by a plot."""
    panel = MonitorPanel(default_model, probes=["concept/pirate"])
    panel.redraw_interval = 0.0
    events = []
    real = panel._draw
    panel._draw = lambda data, final=True: (events.append("draw"), real(data, final))[1]
    stream = panel.client.chat.completions.create_stream(model=default_model.model_name, messages=SEA,
                                                         monitor=["concept/pirate"], max_completion_tokens=6,
                                                         temperature=0.0)
    async for chunk in panel.follow(stream):
        if chunk.choices and chunk.choices[0].delta.content:
            events.append("token")
    assert events[0] == "token" and events.count("draw") >= 3 and events[-1] == "draw"


async def test_a_mistyped_probe_costs_the_plot_not_the_steered_reply(default_model):
    """An unknown feature id in the monitor's box: the steered reply still streams, the error shows in the monitor."""
    bench = Workbench(default_model)
    bench.dials.add_feature(default_model.features["concept/pirate"], strength=0.4)
    bench.chat.max_tokens.value = 12
    bench.monitor.probes.value = "concept/no-such-feature"
    bench.chat.send(TOKYO)
    await bench.wait()
    assert bench.chat.error.value == "" and "no-such-feature" in bench.monitor.error.value
    steered = bench.chat.history["steered"][-1]["content"]
    assert steered and steered != bench.chat.history["baseline"][-1]["content"]
    # with a condition on that probe the steered reply cannot be what was asked for: the refusal stands
    bench.monitor.conditional.value = True
    bench.chat.regenerate(("steered",))
    await bench.wait()
    assert "no-such-feature" in bench.chat.error.value
    # a valid probe again: the monitor's error clears
    bench.monitor.conditional.value = False
    bench.monitor.probes.value = "concept/pirate"
    bench.chat.regenerate(("steered",))
    await bench.wait()
    assert bench.monitor.error.value == "" and bench.chat.error.value == "" and bench.monitor.data["names"] == ["concept/pirate"]
    assert bench.chat.history["steered"][-1]["content"] == steered      # the same steered reply, now watched


async def test_inspect_tabs_fill_lens_direction_and_page(default_model):
    panel = InspectPanel(default_model)
    chat = [{"role": "user", "content": "Arr, where be the treasure?"}, {"role": "assistant", "content": "On the ship, matey!"}]
    await panel.refresh(chat)
    await panel.wait()
    chosen = panel.chosen()
    # direction tab: the chosen feature's tokens, as the kernel's direction_tokens reads them
    want = wb.direction_tokens(default_model, default_model.features[chosen.id], top_k=panel.direction.top_k)
    promoted, suppressed = panel.direction.figure.data
    assert list(promoted.y)[::-1] == [repr(t) for t in want.promoted.token]
    assert list(suppressed.x)[::-1] == pytest.approx(list(want.suppressed.score), abs=1e-4)
    panel.feature.value = 1                                              # another feature: the tab follows
    await panel.wait()
    assert panel.direction.feature_id == panel.items[1].id
    # logit lens tab: on the inspected conversation; the last layer's top-1 is the model's own prediction
    assert not panel.lens.run_button.disabled
    panel.lens.run_button.click()
    await panel.wait()
    [heat] = panel.lens.figure.data
    result = panel.lens.result
    assert list(heat.y) == list(range(30)) and len(heat.x) == len(result.tokens) == len(heat.z[0])
    import torch

    with torch.no_grad():
        logits = default_model.hf_model(torch.tensor([result.token_ids])).logits[0]
    assert [ids[0] for ids in result.top_ids[-1]] == logits.argmax(-1).tolist()
    assert heat.text[-1] == [toks[0] for toks in result.top_tokens[-1]]
    # page button: the chosen feature's page in the page tab
    panel.page_button.click()
    await panel.wait()
    assert panel.tabs.selected_index == 3 and "wb-feature-page" in panel.page_view.html.value
    assert panel.page_view.page.feature.id == panel.items[1].id and panel.error.value == ""
    # "on each turn": the next conversation is read without a click, and only once
    runs = []
    real_run = panel.lens.run
    panel.lens.run = lambda *a, **k: (runs.append(a[0]), real_run(*a, **k))[1]
    panel.lens.auto.value = True
    longer = chat + [{"role": "user", "content": "And the map?"}]
    await panel.refresh(longer)
    await panel.wait()
    assert runs == [longer] and panel.lens.result.tokens[-3:] != result.tokens[-3:]


async def test_picker_page_button_shows_the_feature_page(default_model):
    picker = FeaturePicker(default_model)
    await picker.search("pirate")
    assert not picker.page_button.disabled
    picker.page_button.click()
    await picker.wait()
    page = picker.page_view.page
    assert page.feature.id == "concept/pirate" and page.contexts
    assert "wb-feature-page" in picker.page_view.html.value and page.contexts[0].token in picker.page_view.html.value
