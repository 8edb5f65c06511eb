"""``StreamText``: a text view that grows by deltas, so streaming costs the same per token at any length.

Setting a text widget's value re-sends the whole text on every token (quadratic traffic over a
reply). Here each token travels as a small custom message that the browser appends; the synced
``text`` trait, which a page reload or Voila renders from, is set once when a reply ends.
"""

from __future__ import annotations

import anywidget
import traitlets

_ESM = """
function render({ model, el }) {
  const box = document.createElement("div");
  box.className = "wb-stream wb-stream-" + model.get("kind");
  const sync = () => { box.textContent = model.get("text"); box.scrollTop = box.scrollHeight; };
  sync();
  model.on("change:text", sync);
  model.on("msg:custom", (msg) => {
    if (msg.truncate !== undefined) box.textContent = box.textContent.slice(0, msg.truncate);
    if (msg.append !== undefined) box.textContent += msg.append;
    box.scrollTop = box.scrollHeight;
  });
  el.appendChild(box);
}
export default { render };
"""

_CSS = """
.wb-stream { white-space: pre-wrap; font-family: var(--jp-content-font-family, sans-serif); font-size: 13px;
  min-height: 8em; max-height: 28em; overflow-y: auto; border: 1px solid #d0d7de; border-radius: 6px;
  padding: 8px; background: #fcfcfd; }
.wb-stream-steered { border-color: #cf6a00; }
"""


class StreamText(anywidget.AnyWidget):
    """A transcript that grows by ``append(delta)``; ``flush()`` syncs the full text (for reloads).

    >>> view = StreamText(kind="steered"); view.append("Ahoy"); view.flush(); view.text
    'Ahoy'
    """

    _esm = _ESM
    _css = _CSS
    text = traitlets.Unicode("").tag(sync=True)
    kind = traitlets.Unicode("baseline").tag(sync=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffer = self.text

    @property
    def value(self) -> str:
        """The full text, including deltas not yet synced."""
        return self._buffer

    def append(self, delta: str) -> None:
        if delta:
            self._buffer += delta
            self.send({"append": delta})

    def truncate(self, length: int) -> None:
        """Cut the text back to ``length`` characters (regenerating a reply)."""
        self._buffer = self._buffer[:length]
        self.send({"truncate": length})

    def flush(self) -> None:
        self.text = self._buffer

    def clear(self) -> None:
        self._buffer = ""
        self.text = ""
