"""``LensPanel`` (the logit lens of a conversation) and ``DirectionPanel`` (the tokens a feature writes)."""

from __future__ import annotations

import ipywidgets as w

import workbench as wb
from workbench import plots

from ._tasks import Panel
from .figures import ExportRow, figure_widget, replace


class LensPanel(Panel):
    """A layers x positions heatmap of the logit lens (``lens.logit``): the top-1 prediction and its probability.

    "Run lens" reads the conversation last given to ``set_conversation`` (the ``InspectPanel`` gives
    it the steered one, under its steering); ``run(messages, ...)`` does it directly. With "on each
    turn" ticked, every new conversation is read at once. It is off by default: the readout keeps
    both cores busy for ~0.5-1 s after each reply, which a dial moved right then would wait for.

    >>> lens = LensPanel(model); await lens.run([{"role": "user", "content": "The capital of France is"}])  # doctest: +SKIP
    """

    def __init__(self, source, top_k: int = 5, **kwargs):
        self.top_k = top_k
        self.run_button = w.Button(description="Run lens", icon="search", disabled=True,
                                   tooltip="the logit lens of the current steered conversation")
        self.run_button.add_class("wb-lens-run")
        self.last_tokens = w.IntText(value=48, description="last tokens", layout=w.Layout(width="180px"))
        self.auto = w.Checkbox(value=False, description="on each turn", indent=False,
                               tooltip="read every new conversation at once")
        self.auto.add_class("wb-lens-auto")
        self.figure = figure_widget()
        self.status = w.HTML("<i>run the lens on a conversation</i>")
        self.result = None
        self._conversation = None
        self.export = ExportRow({"lens": self.figure}, "logit-lens", self.show_error)
        super().__init__(source, [w.HBox([self.run_button, self.last_tokens, self.auto]), self.figure, self.status,
                                  self.export], **kwargs)
        self.add_class("wb-lens")
        self.run_button.on_click(lambda _: self._conversation and self._spawn(self.run(*self._conversation)))

    def set_conversation(self, messages, interventions=None, steering=None) -> None:
        """What "Run lens" reads next (read at once when "on each turn" is ticked)."""
        self._remember(messages, interventions, steering)
        if self.auto.value and messages:
            self._spawn(self.run(messages, interventions, steering))

    def _remember(self, messages, interventions, steering) -> None:
        self._conversation = (messages, interventions, steering)
        self.run_button.disabled = not messages

    async def run(self, messages, interventions=None, steering=None, layers=None):
        """Fetch the logit lens of ``messages`` (under ``interventions`` and a ``steering`` spec) and draw it."""
        self._remember(messages, interventions, steering)   # "Run lens" repeats it
        self.status.value = "running the lens…"
        name = await self.session.model_name()
        model = wb.Variant(name).add_interventions(interventions) if interventions else name
        result = await self.client.lens.logit(messages, model=model, layers=layers, top_k=self.top_k, steering=steering)
        keep = max(int(self.last_tokens.value), 1)
        if len(result.tokens) > keep:   # a long conversation: its last tokens stay readable
            cut = len(result.tokens) - keep
            result = result.model_copy(update={
                "tokens": result.tokens[cut:], "token_ids": result.token_ids[cut:],
                "top_tokens": [row[cut:] for row in result.top_tokens], "top_ids": [row[cut:] for row in result.top_ids],
                "top_probs": [row[cut:] for row in result.top_probs]})
        self.result = result
        replace(self.figure, plots.logit_lens(result))
        self.status.value = f"{len(result.layers)} layers · last {len(result.tokens)} tokens"
        self.show_error(None)
        return result


class DirectionPanel(Panel):
    """The tokens a feature promotes and suppresses through the unembedding (``lens.direction``), as two bar charts.

    >>> panel = DirectionPanel(model); await panel.show_feature("concept/pirate")       # doctest: +SKIP
    """

    def __init__(self, source, top_k: int = 15, **kwargs):
        self.top_k = top_k
        self.figure = figure_widget()
        self.status = w.HTML("<i>choose a feature</i>")
        self.result = None
        self.feature_id: str | None = None
        self.export = ExportRow({"direction": self.figure}, "direction", self.show_error)
        super().__init__(source, [self.figure, self.status, self.export], **kwargs)
        self.add_class("wb-direction")

    async def show_feature(self, feature):
        """Fetch and draw the promoted / suppressed tokens of ``feature`` (an id or an item)."""
        fid = getattr(feature, "id", feature)
        self.status.value = f"unembedding {fid}…"
        name = await self.session.model_name()
        self.result = await self.client.lens.direction(model=name, feature=fid, top_k=self.top_k)
        self.feature_id = fid
        replace(self.figure, plots.direction_tokens(self.result, title=f"Tokens {fid} writes toward"))
        self.status.value = f"{fid}: top {len(self.result.promoted)} promoted and suppressed tokens"
        self.show_error(None)
        return self.result
