"""``SteeringDials``: one row per feature (strength slider, add/clamp, layer, remove) and a global switch."""

from __future__ import annotations

import html

import ipywidgets as w
import traitlets

import workbench as wb

from ._tasks import Panel

# docs/DESIGN.md's strength units: 1.0 = a typical residual norm at the feature's layer; the default
# model steers visibly at 0.3-0.5 and turns to gibberish near 1.0.
STRENGTH_RANGE = (-1.0, 1.0)
DEFAULT_STRENGTH = 0.4


class _Row:
    def __init__(self, item, strength: float, mode: str, on_change, on_remove, on_auto=None):
        self.item = item
        self.slider = w.FloatSlider(value=strength, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.05,
                                    description="strength", continuous_update=False, readout_format=".2f",
                                    layout=w.Layout(flex="1 1 auto", min_width="280px"))
        self.slider.add_class("wb-strength")
        self.mode = w.Dropdown(options=["add", "clamp"], value=mode, layout=w.Layout(width="80px"))
        self.remove = w.Button(icon="times", tooltip="remove", layout=w.Layout(width="36px"))
        self.remove.add_class("wb-remove")
        self.auto = w.Button(icon="magic", tooltip="auto: pick the layer and strength that score best "
                             "(concept, instruction, fluency on tuning prompts; about a minute)", layout=w.Layout(width="36px"))
        self.auto.add_class("wb-auto")
        short = item.label.split(":")[0]
        label = w.HTML(f"<b title='{html.escape(item.label, quote=True)}'>{html.escape(short)}</b>"
                       f" <small>· layer {item.layer} · #{item.index_in_sae}</small>")
        self.box = w.VBox([label, w.HBox([self.slider, self.mode, self.auto, self.remove], layout=w.Layout(width="100%"))],
                          layout=w.Layout(border_bottom="1px solid #eee", padding="2px 0"))
        self.box.add_class("wb-dial")
        self.slider.observe(lambda _: on_change(), "value")
        self.mode.observe(lambda _: on_change(), "value")
        self.remove.on_click(lambda _: on_remove(self))
        if on_auto is not None:
            self.auto.on_click(lambda _: on_auto(self))

    @property
    def key(self):
        return self.item.id


class _SpecRow:
    """A raw SteeringSpec added in code: its slider scales the spec's add ops (0 switches it off)."""

    def __init__(self, label: str, spec, strength: float, on_change, on_remove):
        self.label, self.spec = label, spec
        self.slider = w.FloatSlider(value=strength, min=0.0, max=2.0, step=0.05, description="× spec",
                                    continuous_update=False, readout_format=".2f",
                                    layout=w.Layout(flex="1 1 auto", min_width="280px"))
        self.slider.add_class("wb-strength")
        self.remove = w.Button(icon="times", tooltip="remove", layout=w.Layout(width="36px"))
        layers = ", ".join(map(str, spec.layer_indices()))
        self.box = w.VBox([w.HTML(f"<b>{html.escape(label)}</b> <small>· spec on layers {layers}</small>"),
                           w.HBox([self.slider, self.remove], layout=w.Layout(width="100%"))],
                          layout=w.Layout(border_bottom="1px solid #eee", padding="2px 0"))
        self.box.add_class("wb-dial")
        self.slider.observe(lambda _: on_change(), "value")
        self.remove.on_click(lambda _: on_remove(self))

    @property
    def key(self):
        return "spec/" + self.label

    def scaled(self):
        """The spec with every AddSpec's scale multiplied by the slider (caps and ablations as given)."""
        m = self.slider.value
        layers = {}
        for layer in self.spec.layer_indices():
            ops = [wb.AddSpec(op.vector, scale=op.scale * m) if isinstance(op, wb.AddSpec) else op
                   for op in self.spec.layers[layer].operations]
            layers[layer] = wb.LayerSteeringSpec(operations=ops)
        return wb.SteeringSpec(layers=layers)


class SteeringDials(Panel):
    """Strength dials for picked features; ``variant`` (a traitlet) is the resulting ``wb.Variant``.

    Observe ``variant`` (or ``on_change(fn)``) to react when a dial moves. With the global switch
    off, ``variant`` carries no interventions, so a steered reply equals the baseline.

    >>> dials = SteeringDials(model)                                    # doctest: +SKIP
    >>> dials.add_feature(item, strength=0.5); dials.variant            # doctest: +SKIP
    Variant('HuggingFaceTB/SmolLM2-135M-Instruct', [7:0.5/add])
    """

    variant = traitlets.Instance(wb.Variant, allow_none=True)
    repetition_penalty = traitlets.Float(1.0)  # the one the auto button found best (the Workbench's chat uses it)

    def __init__(self, source, model_name: str | None = None, **kwargs):
        self.enabled = w.Checkbox(value=True, description="steering on", indent=False)
        self.enabled.add_class("wb-steering-on")
        self.rows_box = w.VBox([])
        self.summary = w.HTML("<i>no features yet: pick some in the search panel</i>")
        self._rows: list[_Row] = []
        self._callbacks: list = []
        self.last_auto = None  # the BestSteeringResponse of the last auto button
        super().__init__(source, [w.HBox([w.HTML("<b>Steering</b>&nbsp;&nbsp;"), self.enabled]),
                                  self.rows_box, self.summary], **kwargs)
        self.add_class("wb-dials")
        self._served_name = model_name or getattr(self.session, "_name", None) or "default"
        self.enabled.observe(lambda _: self._changed(), "value")
        self.variant = wb.Variant(self._served_name)

    def set_model_name(self, name: str) -> None:
        self._served_name = name
        self._changed()

    def add_feature(self, item, strength: float = DEFAULT_STRENGTH, mode: str = "add") -> None:
        """Add a dial for ``item`` (a search result or a ``Feature``); an existing dial is updated."""
        for row in self._rows:
            if row.key == item.id:
                row.slider.value, row.mode.value = strength, mode
                return
        self._rows.append(_Row(item, strength, mode, self._changed, self.remove, self.auto))
        self.rows_box.children = [r.box for r in self._rows]
        self._changed()

    def auto(self, row_or_id):
        """Ask the server for the feature's best layer and strength and set the dial to them; returns the task.

        The choice maximises the harmonic mean of concept, instruction and fluency on tuning prompts
        (``wb.best_steering``, with and without a repetition penalty: the chosen one is in
        ``repetition_penalty``). A layer other than the feature's own comes back as a feature registered
        at that layer, which replaces the row. The scores of every tried setting are in ``last_auto``.

        >>> await dials.auto("concept/pirate")   # doctest: +SKIP
        """
        key = getattr(row_or_id, "key", row_or_id)
        row = next(r for r in self._rows if r.key == key)

        async def run():
            row.auto.disabled = True
            self.summary.value = f"<i>finding the best layer and strength for {html.escape(row.item.label.split(':')[0])}…</i>"
            try:
                got = await self.client.features.best_steering(row.item.id, model=self._served_name)
            finally:
                row.auto.disabled = False
            self.last_auto = got
            self.repetition_penalty = got.repetition_penalty
            if got.feature.id != row.key:
                position = self._rows.index(row)
                new = _Row(got.feature, got.strength, row.mode.value, self._changed, self.remove, self.auto)
                self._rows[position] = new
                self.rows_box.children = [r.box for r in self._rows]
                self._changed()
            else:
                row.slider.value = got.strength
                self._changed()
            self.summary.value += (f" · auto: layer {got.layer}, strength {got.strength:g}, repetition penalty "
                                   f"{got.repetition_penalty:g} (score {got.hm:.2f} of 2)")
            return got

        return self._spawn(run())

    def add_spec(self, label: str, spec, strength: float = 1.0) -> None:
        """Add a row for a raw ``SteeringSpec`` built in code; its slider multiplies the spec's add ops.

        >>> dials.add_spec("my vector", wb.SteeringSpec(layers={6: [wb.AddSpec(v)]}))   # doctest: +SKIP
        """
        if not isinstance(spec, wb.SteeringSpec):
            raise wb.ValidationError(f"add_spec takes a SteeringSpec, got {type(spec).__name__}")
        self.remove("spec/" + label)
        self._rows.append(_SpecRow(label, spec, strength, self._changed, self.remove))
        self.rows_box.children = [r.box for r in self._rows]
        self._changed()

    def remove(self, row_or_id) -> None:
        key = getattr(row_or_id, "key", row_or_id)
        self._rows = [r for r in self._rows if r.key != key]
        self.rows_box.children = [r.box for r in self._rows]
        self._changed()

    def clear(self) -> None:
        self._rows = []
        self.rows_box.children = []
        self._changed()

    @property
    def rows(self) -> list[_Row]:
        return list(self._rows)

    def slider(self, feature_id: str) -> w.FloatSlider:
        return next(r.slider for r in self._rows if r.key == feature_id)

    def on_change(self, fn) -> None:
        """Call ``fn(variant)`` after any dial, mode, row or the global switch changes."""
        self._callbacks.append(fn)

    def _build(self) -> wb.Variant:
        variant = wb.Variant(self._served_name)
        if self.enabled.value:
            for r in self._rows:
                if r.slider.value == 0.0:
                    continue
                if isinstance(r, _SpecRow):
                    variant.add_spec(r.scaled())
                else:
                    variant.set(r.item, strength=r.slider.value, mode=r.mode.value)
        return variant

    def _changed(self) -> None:
        variant = self._build()
        self.variant = variant
        n = len(variant.interventions) + sum(isinstance(r, _SpecRow) and r.slider.value != 0 for r in self._rows)
        self.summary.value = ("<i>steering off</i>" if not self.enabled.value else
                              f"{n} active intervention{'s' * (n != 1)}" if self._rows else
                              "<i>no features yet: pick some in the search panel</i>")
        for fn in self._callbacks:
            fn(variant)
