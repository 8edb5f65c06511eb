"""FigureWidgets that stay right after a page reload, and the export row every plot panel has."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import ipywidgets as w
import plotly.graph_objects as go

from workbench import plots


def figure_widget() -> go.FigureWidget:
    fig = go.FigureWidget()
    fig.update_layout(height=320, paper_bgcolor="white", plot_bgcolor="white")
    return fig


def replace(figw: go.FigureWidget, fig: go.Figure) -> None:
    """Show ``fig``'s traces and layout in ``figw``, and re-sync the state a reload renders from.

    plotly sends later edits as deltas and refreshes the synced ``_widget_data`` only when the
    figure itself is displayed; inside a VBox a reload (or Voila) would show the first data.
    """
    figw.data = ()
    figw.layout = fig.layout
    if fig.data:
        figw.add_traces(list(fig.data))
    figw._widget_layout = deepcopy(figw._layout_obj._props)
    figw._widget_data = deepcopy(figw._data)


class ExportRow(w.HBox):
    """A path box, a format picker and a Save button for the figures of a panel."""

    def __init__(self, figures: dict, stem: str, on_error):
        self._figures = figures
        self.path = w.Text(value=f"figures/{stem}", description="save as", layout=w.Layout(width="320px"))
        self.format = w.Dropdown(options=["png", "svg", "html"], value="png", layout=w.Layout(width="80px"))
        self.button = w.Button(description="Save", icon="download")
        self.button.add_class("wb-export")
        self.saved = w.HTML("")
        self._on_error = on_error
        super().__init__([self.path, self.format, self.button, self.saved])
        self.button.on_click(lambda _: self.save_clicked())

    def save_clicked(self) -> None:
        try:
            paths = self.save(self.path.value, self.format.value)
            self.saved.value = "saved " + ", ".join(str(p) for p in paths)
        except Exception as exc:  # PNG/SVG need Chromium: the error says so, in the panel
            self._on_error(exc)

    def save(self, stem, fmt: str = "png") -> list[Path]:
        """Write every figure of the panel as ``{stem}-{name}.{fmt}``; returns the paths."""
        stem = Path(stem)
        out = []
        for name, figw in self._figures.items():
            try:
                out.append(plots.export(go.Figure(figw), stem.parent / f"{stem.name}-{name}.{fmt}"))
            except (RuntimeError, ValueError, OSError) as exc:
                if fmt in ("png", "svg", "pdf"):
                    raise RuntimeError(f"{fmt.upper()} export needs kaleido and a Chromium browser "
                                       f"(apt-get install chromium); HTML export needs neither. ({exc})") from exc
                raise
        return out
