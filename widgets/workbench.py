"""``Workbench``: the panels composed and wired together: pick -> dials -> chat -> norms, monitor and inspect."""

from __future__ import annotations

import asyncio

import ipywidgets as w

from ._tasks import Panel, Session
from .chat import ChatPanel
from .dials import SteeringDials
from .inspection import InspectPanel
from .monitor import MonitorPanel
from .norms import NormsPanel
from .picker import FeaturePicker


class Workbench(Panel):
    """Search features, set strengths, chat with baseline and steered side by side, and watch the norms.

    Takes a ``SteerModel`` (in-process), a ``wb.Client`` or a ``wb.AsyncClient`` (e.g. pointed at a
    ``workbench serve``). Put it last in a cell to display it; its panels (``picker``, ``dials``,
    ``chat``, ``norms``, ``monitor``, ``inspect``) also work one by one. The steered reply streams with
    the monitor's probes (default: the features on the dials), drawn live in ``monitor``; its
    condition, when ticked, makes the steered column's steering conditional.

    >>> bench = Workbench(wb.load("default"))      # doctest: +SKIP
    >>> bench                                       # doctest: +SKIP
    """

    def __init__(self, source, plots: bool = True, **kwargs):
        session = Session.of(source)
        self.picker = FeaturePicker(session)
        self.dials = SteeringDials(session)
        self.chat = ChatPanel(session)
        self.norms = NormsPanel(session)
        self.monitor = MonitorPanel(session)
        self.inspect = InspectPanel(session)
        self._plots = plots
        self.status = w.HTML("")
        self.status.add_class("wb-status")
        self._refresh = None
        left = w.VBox([self.picker, self.dials], layout=w.Layout(width="38%", padding="0 12px 0 0"))
        right = w.VBox([self.chat], layout=w.Layout(width="62%"))
        children = [w.HBox([left, right], layout=w.Layout(width="100%")), self.status]
        if plots:
            children += [self.norms, self.monitor, self.inspect]
            self.chat.monitor = self.monitor
        super().__init__(session, children, **kwargs)
        self.add_class("wb-workbench")
        self.picker.on_pick(self.dials.add_feature)
        self.inspect.on_add(self.dials.add_feature)
        self.monitor.default_probes = self._dial_features
        self.monitor.on_watch(lambda: self.chat.regenerate(("steered",)))
        self.dials.observe(lambda ch: setattr(self.chat, "variant", ch["new"]), "variant")
        self.chat.variant = self.dials.variant
        self.dials.observe(lambda ch: setattr(self.chat.repetition_penalty, "value", ch["new"]), "repetition_penalty")
        self.chat.observe(self._on_turn, "turns")
        self.chat.observe(self._on_busy, "busy")
        self._spawn(self._name_dials())
        self._spawn(self._load_features())

    @property
    def panels(self) -> list[Panel]:
        return [self.picker, self.dials, self.chat, self.norms, self.monitor, self.inspect]

    def _dial_features(self) -> list[str]:
        """The ids of the features on the dials (raw spec rows have no probe)."""
        return [r.item.id for r in self.dials.rows if hasattr(r, "item")]

    async def _name_dials(self) -> None:
        self.dials.set_model_name(await self.session.model_name())

    async def _load_features(self) -> None:
        """Warm the feature set: the concept library trains once (a progress bar shows), then loads in ms."""
        loading = "<i>loading the features…</i>"
        self.status.value = loading
        try:
            await self.client.features.load(model=await self.session.model_name())
        finally:   # an error shows in the panel
            if self.status.value == loading:
                self.status.value = ""

    def _on_turn(self, change) -> None:
        if self._plots and self.chat.history["baseline"] and not self.chat.busy:
            self._cancel_refresh()
            self._refresh = self._spawn(self.refresh_plots())

    def _on_busy(self, change) -> None:
        if change["new"]:   # a new reply streams: stale plot work must not delay its tokens
            self._cancel_refresh()
            self.status.value = "<i>streaming…</i>"

    def _cancel_refresh(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
            self.status.value = ""

    async def refresh_plots(self) -> None:
        """Recompute norms and inspection for the current conversation and dials."""
        variant = self.dials.variant
        ivs, spec = variant.get_interventions(), variant.spec
        steered = self.chat.messages("steered")
        self.status.value = "<i>updating plots…</i>"
        await asyncio.gather(self.norms.refresh(self.chat.messages("baseline"), steered, ivs, spec),
                             self.inspect.refresh(steered, ivs, spec))
        # a conditional reply cannot be replayed in one forward (in token mode each position's decision
        # depends on the positions before it, steered or not), so the plots say what they show
        caveat = (" · <i>norms and inspect read the steered conversation under the dials' spec without the "
                  "monitor's condition</i>") if self._plots and self.monitor.condition() is not None else ""
        self.status.value = f"<span class='wb-plots-ready'>plots up to date</span>{caveat}"

    async def wait(self) -> None:
        """Wait until every panel is idle (replies streamed, plots drawn)."""
        for _ in range(3):  # a finished turn starts plot refreshes: settle twice
            for panel in [self, *self.panels]:
                await (Panel.wait(panel) if panel is self else panel.wait())
