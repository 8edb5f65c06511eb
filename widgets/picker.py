"""``FeaturePicker``: search the model's features as you type and pick some."""

from __future__ import annotations

import asyncio

import ipywidgets as w
import traitlets

from ._tasks import Panel
from .pages import PageView


def feature_label(item) -> str:
    return f"{item.label}  ·  layer {item.layer}  ·  #{item.index_in_sae}"


class FeaturePicker(Panel):
    """A search box (debounced, runs ``features.search``), a result list, a Pick button and a Page
    button (the selected feature's page, ``features.page``, shown below in ``page_view``).

    ``picked`` (a traitlet) holds the picked ``FeatureItem``s; ``on_pick(fn)`` calls ``fn(item)`` per pick.

    >>> picker = FeaturePicker(model)                   # doctest: +SKIP
    >>> picker.query.value = "pirate"; await picker.wait(); picker.pick(0)  # doctest: +SKIP
    """

    picked = traitlets.List()
    debounce = 0.25  # seconds of no typing before a search runs

    def __init__(self, source, top_k: int = 12, **kwargs):
        self.query = w.Text(placeholder="search features, e.g. 'pirate', 'French', 'sadness'",
                            continuous_update=True, layout=w.Layout(width="100%"))
        self.query.add_class("wb-search")
        self.results = w.Select(options=[], rows=8, layout=w.Layout(width="100%"))
        self.results.add_class("wb-results")
        self.pick_button = w.Button(description="Add to dials", icon="plus", button_style="primary",
                                    disabled=True)
        self.pick_button.add_class("wb-pick")
        self.page_button = w.Button(description="Page", icon="file-text-o", disabled=True,
                                    tooltip="the feature's page: top contexts, histogram, promoted tokens")
        self.page_button.add_class("wb-picker-page")
        self.status = w.HTML("")
        self.top_k = top_k
        self.items: list = []
        self._callbacks: list = []
        self._pending = None
        super().__init__(source, [], **kwargs)
        self.page_view = PageView(self.session)
        self.page_view.html.value = ""
        self.children = [w.HTML("<b>Features</b>"), self.query, self.results,
                         w.HBox([self.pick_button, self.page_button, self.status]), self.page_view, self.error]
        self.add_class("wb-picker")
        self.query.observe(self._on_query, "value")
        self.results.observe(self._on_select, "value")
        self.pick_button.on_click(lambda _: self.pick())
        self.page_button.on_click(lambda _: self.open_page())

    def _on_select(self, change) -> None:
        self.pick_button.disabled = self.page_button.disabled = change["new"] is None

    def _on_query(self, change) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()  # debounce: only the last keystroke's search runs
        self._pending = self._spawn(self._search_later(change["new"]))

    async def _search_later(self, text: str) -> None:
        await asyncio.sleep(self.debounce)
        await self.search(text)

    async def search(self, text: str) -> list:
        """Search now (what typing triggers after the debounce); returns the result items."""
        text = text.strip()
        if not text:
            self.items, self.results.options = [], []
            self.status.value = ""
            return []
        self.status.value = "searching…"
        name = await self.session.model_name()
        response = await self.client.features.search(text, model=name, top_k=self.top_k)
        self.items = list(response.data)
        self.results.options = [(feature_label(f), i) for i, f in enumerate(self.items)]
        self.results.value = 0 if self.items else None
        self.status.value = f"{len(self.items)} results"
        self.show_error(None)
        return self.items

    def pick(self, index: int | None = None):
        """Pick result ``index`` (default: the selected one); returns the picked item."""
        index = self.results.value if index is None else index
        if index is None or not (0 <= index < len(self.items)):
            return None
        item = self.items[index]
        self.picked = [*self.picked, item]
        for fn in self._callbacks:
            fn(item)
        return item

    def open_page(self, index: int | None = None):
        """Show result ``index``'s page (default: the selected one) in ``page_view``; returns the task."""
        index = self.results.value if index is None else index
        if index is None or not (0 <= index < len(self.items)):
            return None
        return self._spawn(self.page_view.show_page(self.items[index]))

    def on_pick(self, fn) -> None:
        """Call ``fn(item)`` whenever a feature is picked."""
        self._callbacks.append(fn)
