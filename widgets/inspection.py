"""``InspectPanel``: the features most active in the conversation, their activation per token, and tabs
for the logit lens, the chosen feature's promoted / suppressed tokens and its page."""

from __future__ import annotations

import asyncio

import ipywidgets as w

from workbench import plots

from ._tasks import Panel
from .figures import ExportRow, figure_widget, replace
from .lens import DirectionPanel, LensPanel
from .pages import PageView


class InspectPanel(Panel):
    """A bar chart of the top features (``features.inspect``) and a features x tokens heatmap
    (``features.token_activations``) with the chosen feature on top. Clicking a bar, or "Add to
    dials", calls the ``on_add`` callbacks with that feature. Tabs: "logit lens" (``LensPanel``, on the
    conversation last inspected), "direction" (``DirectionPanel``, the chosen feature) and "page"
    (``PageView``, filled by the Page button).

    >>> panel = InspectPanel(model); panel.on_add(dials.add_feature)              # doctest: +SKIP
    >>> await panel.refresh(chat.messages("steered"), variant.get_interventions())  # doctest: +SKIP
    """

    def __init__(self, source, top_k: int = 8, **kwargs):
        self.top_k = top_k
        self.aggregation = w.Dropdown(options=["mean", "max"], value="mean", description="aggregate",
                                      layout=w.Layout(width="200px"))
        self.feature = w.Dropdown(options=[], description="feature", layout=w.Layout(width="360px"))
        self.add_button = w.Button(description="Add to dials", icon="plus", disabled=True)
        self.add_button.add_class("wb-inspect-add")
        self.page_button = w.Button(description="Page", icon="file-text-o", disabled=True,
                                    tooltip="the chosen feature's page: top contexts, histogram, promoted tokens")
        self.page_button.add_class("wb-inspect-page")
        self.bar_figure = figure_widget()
        self.token_figure = figure_widget()
        self.status = w.HTML("<i>send a message to inspect it</i>")
        self.items: list = []
        self.table = None
        self._messages, self._interventions, self._steering = None, None, None
        self._callbacks: list = []
        self.export = ExportRow({"top": self.bar_figure, "tokens": self.token_figure}, "inspect", self.show_error)
        super().__init__(source, [], **kwargs)
        self.lens = LensPanel(self.session)
        self.direction = DirectionPanel(self.session)
        self.page_view = PageView(self.session)
        features = w.VBox([w.HBox([self.aggregation, self.feature, self.add_button, self.page_button]),
                           self.bar_figure, self.token_figure, self.status, self.export])
        self.tabs = w.Tab(children=[features, self.lens, self.direction, self.page_view],
                          titles=("features", "logit lens", "direction", "page"))
        self.children = [w.HTML("<b>Inspect</b>"), self.tabs, self.error]
        self.add_class("wb-inspect")
        self.feature.observe(self._on_feature, "value")
        self.add_button.on_click(lambda _: self.add(self.feature.value))
        self.page_button.on_click(lambda _: self.open_page())
        self.aggregation.observe(lambda _: self._messages and self._spawn(self.refresh(self._messages, self._interventions,
                                                                                       self._steering)),
                                 "value")

    def on_add(self, fn) -> None:
        """Call ``fn(item)`` when a feature is chosen for the dials (bar click or button)."""
        self._callbacks.append(fn)

    def add(self, index) -> None:
        if index is None or not (0 <= index < len(self.items)):
            return
        for fn in self._callbacks:
            fn(self.items[index])

    def chosen(self):
        """The chosen feature (an item of the top list), or None."""
        i = self.feature.value
        return self.items[i] if i is not None and 0 <= i < len(self.items) else None

    def open_page(self):
        """Show the chosen feature's page in the "page" tab (returns the task)."""
        item = self.chosen()
        if item is None:
            return None
        self.tabs.selected_index = 3
        return self._spawn(self.page_view.show_page(item))

    async def wait(self) -> None:
        for panel in (self.lens, self.direction, self.page_view):
            await Panel.wait(panel)
        await Panel.wait(self)

    def _on_bar_click(self, trace, points, state) -> None:
        # bars are drawn best-last (horizontal bars grow upward); map the point back to the item
        for i in points.point_inds:
            self.add(len(self.items) - 1 - i)

    async def refresh(self, messages, interventions=None, steering=None) -> None:
        """Inspect ``messages`` (under ``interventions`` and a raw ``steering`` spec) and redraw both figures."""
        self._messages, self._interventions, self._steering = messages, interventions, steering
        self.lens.set_conversation(messages, interventions, steering)
        self.status.value = "inspecting…"
        name = await self.session.model_name()
        top, table = await asyncio.gather(
            self.client.features.inspect(messages, model=name, interventions=interventions or None,
                                         aggregation_method=self.aggregation.value, top_k=self.top_k, steering=steering),
            self.client.features.token_activations(messages, model=name, interventions=interventions or None,
                                                   steering=steering))
        self.items = [x.feature for x in top.features]
        keep = {f.id for f in self.items}
        pos = [i for i, f in enumerate(table.features) if f.id in keep]
        table.features = [table.features[i] for i in pos]
        table.activations = [table.activations[i] for i in pos]
        self.table = table
        replace(self.bar_figure, plots.top_features(top))
        for trace in self.bar_figure.data:
            trace.on_click(self._on_bar_click)
        current = self.feature.value
        self.feature.options = [(plots.short_label(f.label), i) for i, f in enumerate(self.items)]
        self.feature.value = current if current is not None and current < len(self.items) else (0 if self.items else None)
        self.add_button.disabled = self.page_button.disabled = not self.items
        self._draw_tokens()
        if self.items and self.direction.feature_id != self.chosen().id:
            await self.direction.show_feature(self.chosen())
        self.status.value = f"{len(table.tokens)} tokens · top {len(self.items)} features"
        self.show_error(None)

    def _on_feature(self, change) -> None:
        self._draw_tokens()
        if self.chosen() is not None and self.direction.feature_id != self.chosen().id:
            self._spawn(self.direction.show_feature(self.chosen()))

    def _draw_tokens(self) -> None:
        if self.table is None or self.feature.value is None:
            return
        chosen = self.items[self.feature.value].id
        replace(self.token_figure, plots.token_heatmap(self.table, highlight=chosen))
