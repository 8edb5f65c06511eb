"""``NormsPanel``: activation norms of the conversation, per layer and per message, baseline vs steered."""

from __future__ import annotations

import asyncio

import ipywidgets as w

from workbench import plots

from ._tasks import Panel
from .figures import ExportRow, figure_widget, replace


class NormsPanel(Panel):
    """Two plotly FigureWidgets: norm vs layer (a line per role or message; baseline dashed, steered
    solid) and a messages x layers heatmap (steered, baseline or their difference).

    ``refresh(baseline_messages, steered_messages, interventions)`` fetches both norms tables
    through the client (``features.norms``) and redraws; the controls redraw from what was fetched.

    >>> norms = NormsPanel(model)                                                   # doctest: +SKIP
    >>> await norms.refresh(chat.messages("baseline"), chat.messages("steered"), variant.get_interventions())  # doctest: +SKIP
    """

    def __init__(self, source, **kwargs):
        self.by = w.ToggleButtons(options=[("per role", "role"), ("per message", "message")], value="role")
        self.heatmap = w.ToggleButtons(options=["steered", "baseline", "difference"], value="steered")
        self.stat = w.Dropdown(options=list(plots.STATS), value="median", description="stat",
                               layout=w.Layout(width="160px"))
        self.layers = w.IntRangeSlider(value=(0, 1), min=0, max=1, description="layers", continuous_update=False,
                                       layout=w.Layout(width="420px"))
        self.layer_figure = figure_widget()
        self.message_figure = figure_widget()
        self.status = w.HTML("<i>send a message to see norms</i>")
        self.frames: dict = {"baseline": None, "steered": None}
        self.export = ExportRow({"layers": self.layer_figure, "messages": self.message_figure}, "norms",
                                self.show_error)
        super().__init__(source, [w.HTML("<b>Activation norms</b>"),
                                  w.HBox([self.by, self.stat]), w.HBox([self.layers, self.heatmap]),
                                  self.layer_figure, self.message_figure, self.status, self.export], **kwargs)
        self.add_class("wb-norms")
        for control in (self.by, self.heatmap, self.stat, self.layers):
            control.observe(lambda _: self.redraw(), "value")

    async def refresh(self, baseline_messages, steered_messages, interventions=None, steering=None) -> None:
        """Fetch norms of both conversations (steered ones under ``interventions``) and redraw."""
        self.status.value = "computing norms…"
        name = await self.session.model_name()
        calls = [self.client.features.norms(baseline_messages, model=name)]
        if steered_messages:
            calls.append(self.client.features.norms(steered_messages, model=name, interventions=interventions or None,
                                                    steering=steering))
        results = await asyncio.gather(*calls)
        self.frames = {"baseline": results[0].to_dataframe(),
                       "steered": results[1].to_dataframe() if len(results) > 1 else None}
        top = int(self.frames["baseline"].layer.max())
        if self.layers.max != top:
            self.layers.max = top
            self.layers.value = (0, top)
        self.show_error(None)
        self.redraw()

    def redraw(self) -> None:
        if self.frames["baseline"] is None:
            return
        lo, hi = self.layers.value
        layers = range(lo, hi + 1)
        base, steered = self.frames["baseline"], self.frames["steered"]
        replace(self.layer_figure, plots.layer_norms(base, steered, by=self.by.value, stat=self.stat.value, layers=layers))
        mode = self.heatmap.value if steered is not None else "baseline"
        if mode == "difference":
            fig = plots.message_heatmap(steered, stat=self.stat.value, layers=layers, baseline=base)
        else:
            fig = plots.message_heatmap(steered if mode == "steered" else base, stat=self.stat.value, layers=layers,
                                        title=f"{mode}: per-message norm ({self.stat.value} over tokens)")
        replace(self.message_figure, fig)
        n = int(base.message_idx.max()) + 1
        self.status.value = f"{n} message{'s' * (n != 1)} · layers {lo}–{hi}"
