"""``PageView``: a feature's page (``features.page``: top contexts, histogram, promoted tokens) as HTML."""

from __future__ import annotations

import html

import ipywidgets as w

from ._tasks import Panel


class PageView(Panel):
    """An HTML area that ``show_page(feature)`` fills with the feature's page.

    >>> view = PageView(model); await view.show_page("concept/pirate")     # doctest: +SKIP
    """

    def __init__(self, source, corpus=None, **kwargs):
        self.corpus = corpus
        self.html = w.HTML("<i>choose a feature and press Page</i>", layout=w.Layout(width="100%"))
        self.html.add_class("wb-page-html")
        self.page = None
        super().__init__(source, [self.html], **kwargs)
        self.add_class("wb-page")

    async def show_page(self, feature):
        """Fetch ``feature``'s page (an id or an item) and show it; returns the ``FeaturePageResponse``."""
        fid = getattr(feature, "id", feature)
        self.html.value = f"<i>computing the page of {html.escape(str(fid))}…</i>"
        name = await self.session.model_name()
        self.page = await self.client.features.page(fid, model=name, corpus=self.corpus)
        self.html.value = self.page.to_html()
        self.show_error(None)
        return self.page
