"""``MonitorPanel``: probe values drawn live while a reply streams, with an optional steering condition."""

from __future__ import annotations

import time

import ipywidgets as w

from workbench import plots

from ._tasks import Panel
from .figures import ExportRow, figure_widget, replace


class _Live:
    """A monitored reply as it streams: the stream's header, the values so far, the generated text per token."""

    def __init__(self):
        self.header = None
        self.values: list = []
        self.steered: list | None = None
        self.tokens: list = []         # per position: its token's text, as the server names it
        self.generated: list = []      # delta text of each content chunk (servers that do not name positions)

    def add(self, chunk) -> None:
        if chunk.monitor is not None:
            self.header = chunk.monitor
        if chunk.projections is not None:
            pr = chunk.projections
            del self.values[pr.start:]     # a recomputed position replaces the old value
            self.values += pr.values
            if pr.steered is not None:
                self.steered = (self.steered or [])[:pr.start] + list(pr.steered)
            if pr.tokens is not None:
                self.tokens = self.tokens[:pr.start] + list(pr.tokens)
        if chunk.choices and chunk.choices[0].delta.content:
            self.generated.append(chunk.choices[0].delta.content)

    def data(self) -> dict:
        h = self.header
        steered = None if self.steered is None else self.steered + [False] * (len(self.values) - len(self.steered))
        tokens = self.tokens if len(self.tokens) >= len(self.values) else list(h.prompt_tokens) + self.generated
        return {"names": list(h.names), "layers": list(h.layers), "values": list(self.values),
                "tokens": tokens, "prompt_len": h.prompt_len,
                "boundaries": list(h.boundaries), "roles": list(h.roles), "steered": steered}


class MonitorPanel(Panel):
    """A line per probe over the conversation's tokens, drawn while the reply streams (at most every
    ``redraw_interval`` seconds), message starts and the reply marked, the threshold as a line and the
    positions a condition steered shaded.

    The probes are the feature ids in the ``watch`` box (default: ``default_probes()``, which the
    ``Workbench`` sets to the features on the dials). With "condition" ticked, the steering of the
    watched reply applies only while the first probe crosses the threshold (``wb.Condition``).

    >>> monitor = MonitorPanel(model)                                                       # doctest: +SKIP
    >>> await monitor.watch(chat, ["concept/pirate"], steering=variant.spec, max_tokens=48)  # doctest: +SKIP
    """

    redraw_interval = 0.1   # seconds between live redraws

    def __init__(self, source, probes=(), threshold: float = 0.5, max_tokens: int = 64, **kwargs):
        self.probes = w.Text(value=", ".join(probes), description="watch",
                             placeholder="feature ids, e.g. concept/pirate (default: the features on the dials)",
                             layout=w.Layout(width="520px"))
        self.probes.add_class("wb-monitor-probes")
        self.threshold = w.FloatText(value=threshold, step=0.1, description="threshold", layout=w.Layout(width="200px"))
        self.conditional = w.Checkbox(value=False, indent=False,
                                      description="condition: steer only while the first probe crosses the threshold")
        self.mode = w.ToggleButtons(options=[("on the prompt", "prompt"), ("per token", "token")], value="token")
        self.latch = w.Checkbox(value=False, description="latch (once on, stays on)", indent=False)
        self.watch_button = w.Button(description="Watch", icon="eye", tooltip="run the monitored reply again")
        self.watch_button.add_class("wb-monitor-watch")
        self.figure = figure_widget()
        self.status = w.HTML("<i>send a message to watch the probes</i>")
        self.export = ExportRow({"projections": self.figure}, "monitor", self.show_error)
        self.max_tokens = max_tokens
        self.data: dict | None = None      # what is drawn (``plots.projections_data`` form)
        self.reply: str = ""
        self.default_probes = lambda: []
        self._on_watch: list = []
        self._last: dict | None = None
        super().__init__(source, [w.HTML("<b>Monitor</b>"), w.HBox([self.probes, self.threshold, self.watch_button]),
                                  w.HBox([self.conditional, self.mode, self.latch]), self.figure, self.status,
                                  self.export], **kwargs)
        self.add_class("wb-monitor")
        self.threshold.observe(lambda _: self.data is not None and self._draw(self.data), "value")
        self.watch_button.on_click(lambda _: self.rewatch())

    # -- what a request carries ------------------------------------------------------------------
    def probe_ids(self) -> list[str]:
        """The watched feature ids: the box's, else ``default_probes()``."""
        typed = [p.strip() for p in self.probes.value.replace("\n", ",").split(",") if p.strip()]
        return typed or list(self.default_probes())

    def add_probe(self, item) -> None:
        """Watch one more feature (a ``FeatureItem``, a ``Feature`` or an id)."""
        fid = getattr(item, "id", item)
        ids = [p.strip() for p in self.probes.value.split(",") if p.strip()]
        if fid not in ids:
            self.probes.value = ", ".join([*ids, fid])

    def condition(self) -> dict | None:
        """The condition of the controls (on the first probe), or None when "condition" is off."""
        ids = self.probe_ids()
        if not self.conditional.value or not ids:
            return None
        return {"probe": {"feature": ids[0]}, "threshold": self.threshold.value, "mode": self.mode.value,
                "latch": self.latch.value}

    def request_options(self) -> dict:
        """``monitor=`` (and ``condition=``) for a chat request; empty when nothing is watched."""
        ids = self.probe_ids()
        if not ids:
            return {}
        cond = self.condition()
        return {"monitor": ids, **({"condition": cond} if cond else {})}

    # -- drawing -------------------------------------------------------------------------------
    async def follow(self, chunks):
        """Pass a monitored stream's chunks through, drawing the values as they come."""
        live, last = _Live(), 0.0
        self.status.value = "watching…"
        self.show_error(None)
        try:
            async for chunk in chunks:
                live.add(chunk)
                # the chunk goes on first: a redraw (a plotly figure built and sent) must not hold a
                # token back, above all the first one after a slider move (benchmarks/widgets_bench.py)
                yield chunk
                if live.generated and time.monotonic() - last >= self.redraw_interval:
                    self._draw(live.data(), final=False)
                    last = time.monotonic()
        finally:
            if live.header is not None:
                self._draw(live.data())

    async def watch(self, messages, monitor=None, steering=None, interventions=None, condition=None,
                    max_tokens: int | None = None, temperature: float = 0.0) -> dict:
        """Stream a reply to ``messages`` with ``monitor`` (default: ``probe_ids()``) and draw it live.

        ``condition`` (a ``wb.Condition`` or its dict) defaults to the panel's controls. Returns the
        drawn data; ``self.reply`` holds the reply's text.
        """
        self._last = {"messages": messages, "monitor": monitor, "steering": steering, "interventions": interventions,
                      "condition": condition, "max_tokens": max_tokens, "temperature": temperature}
        monitor = self.probe_ids() if monitor is None else monitor
        condition = self.condition() if condition is None else condition
        name = await self.session.model_name()
        stream = self.client.chat.completions.create_stream(
            model=name, messages=messages, monitor=monitor, steering=steering, interventions=interventions or None,
            condition=condition, max_completion_tokens=max_tokens or self.max_tokens, temperature=temperature)
        self.reply = ""
        async for chunk in self.follow(stream):
            if chunk.choices and chunk.choices[0].delta.content:
                self.reply += chunk.choices[0].delta.content
        self.show_error(None)
        return self.data

    def show(self, projections) -> None:
        """Draw finished projections (``reply.projections``, a ``ProjectionsBody`` or its dict)."""
        self._draw(plots.projections_data(projections))

    def on_watch(self, fn) -> None:
        """Call ``fn()`` on the Watch button instead of repeating the last ``watch`` (the Workbench regenerates)."""
        self._on_watch.append(fn)

    def rewatch(self):
        """What the Watch button does: the ``on_watch`` callbacks, else the last ``watch`` again."""
        if self._on_watch:
            for fn in self._on_watch:
                fn()
            return None
        if self._last is not None:
            return self._spawn(self.watch(**self._last))
        return None

    def _draw(self, data: dict, final: bool = True) -> None:
        self.data = data
        fig = plots.projections(data, threshold=self.threshold.value)
        figw = self.figure
        if not final and len(figw.data) == len(fig.data) and all(
                a.name == b.name for a, b in zip(figw.data, fig.data)):
            with figw.batch_update():   # live: small updates in one message, no rebuild
                for old, new in zip(figw.data, fig.data):
                    old.x, old.y, old.text = new.x, new.y, new.text
                figw.layout.shapes = fig.layout.shapes
                figw.layout.annotations = fig.layout.annotations
                figw.layout.xaxis.range = fig.layout.xaxis.range
                figw.layout.title = fig.layout.title
        else:
            replace(figw, fig)     # also re-syncs what a page reload renders
        n, P = len(data["values"]), data["prompt_len"]
        steered = data["steered"]
        self.status.value = (f"{len(data['names'])} probe{'s' * (len(data['names']) != 1)} · {P} prompt + "
                             f"{max(n - P, 0)} reply positions"
                             + (f" · {sum(map(bool, steered))} steered" if steered is not None else "")
                             + ("" if final else " · streaming…"))
