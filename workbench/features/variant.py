"""``Variant``: a model name plus feature interventions, compiled to a ``SteeringSpec``.

Names and semantics follow the vllm-sdk seed. A strength-``s`` intervention in mode ``add`` adds
``s * scale_f * u_f`` at the feature's layer; mode ``clamp`` sets the feature's value to
``s * scale_f`` (concepts: the projection on ``u_f``; SAE features: the SAE activation, to ``s`` times
its typical maximum, by encode / set / decode keeping the reconstruction error).

>>> variant = wb.Variant("default")
>>> variant.set(model.features.search("pirate", top_k=1), strength=0.5)  # doctest: +SKIP
>>> [reply] = await model.chat(messages, steering=variant)                # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..api.schemas import MODES, InterventionSpec  # noqa: F401  (the one intervention class; re-exported)
from ..errors import ValidationError
from ..models import canonical_name

if TYPE_CHECKING:  # torch-heavy: imported where a spec is built, so the client stays light
    from ..steering import SteeringSpec


class Variant:
    """A model name with feature interventions; pass it as ``steering=`` or as a client's ``model=``."""

    def __init__(self, model_name: str = "default"):
        self.model_name = canonical_name(str(getattr(model_name, "value", model_name)))  # a ModelName too
        self.interventions: list[InterventionSpec] = []
        self.spec: SteeringSpec | None = None   # workbench extension: raw ops applied after the interventions

    def _put(self, iv: InterventionSpec) -> None:
        key = iv.feature_id or iv.index_in_sae
        self.interventions = [x for x in self.interventions if (x.feature_id or x.index_in_sae) != key]
        self.interventions.append(iv)

    def set(self, features, strength: float, mode: str = "add") -> "Variant":
        """Intervene on ``features`` (Features, FeatureItems or dicts) with one strength and mode."""
        if not isinstance(features, (list, tuple)):
            features = [features]
        for f in features:
            get = f.get if isinstance(f, dict) else lambda k, d=None, f=f: getattr(f, k, d)
            self._put(InterventionSpec(get("index_in_sae"), strength, mode, feature_id=get("id")))
        return self

    def add_intervention(self, index_in_sae: int, strength: float, mode: str = "add") -> "Variant":
        self._put(InterventionSpec(index_in_sae, strength, mode))
        return self

    def add_interventions(self, interventions) -> "Variant":
        for iv in interventions:
            self._put(InterventionSpec.from_any(iv))
        return self

    def get_interventions(self) -> list[dict]:
        return [iv.to_dict() for iv in self.interventions]

    def add_spec(self, spec: SteeringSpec) -> "Variant":
        """Also apply a raw ``SteeringSpec`` (after the feature interventions, at each layer)."""
        from ..steering import SteeringSpec, merge_specs

        if not isinstance(spec, SteeringSpec):
            raise ValidationError(f"add_spec takes a SteeringSpec, got {type(spec).__name__}")
        self.spec = spec if self.spec is None else merge_specs(self.spec, spec)
        return self

    def reset(self) -> "Variant":
        self.interventions = []
        self.spec = None
        return self

    def to_steering_spec(self, model, features=None) -> SteeringSpec:
        """Compile against ``model``'s feature set (or ``features``) in docs/DESIGN.md's strength units."""
        if canonical_name(model.model_name) != self.model_name:
            raise ValidationError(f"this Variant is for {self.model_name!r}, the model is {model.model_name!r}")
        from ..steering import merge_specs

        if features is None and self.interventions:   # a Variant of raw specs only needs no feature set
            features = model.features
        spec = compile_interventions(self.interventions, features)
        if self.spec is not None:
            spec = merge_specs(spec, self.spec.validate(model.hidden_size, model.layer_count))
        return spec

    def __str__(self) -> str:
        return self.model_name

    def __repr__(self) -> str:
        inner = ", ".join(f"{iv.index_in_sae}:{iv.strength:g}/{iv.mode}" for iv in self.interventions)
        extra = f", spec on layers {self.spec.layer_indices()}" if self.spec is not None else ""
        return f"Variant({self.model_name!r}{', [' + inner + ']' if inner else ''}{extra})"

    def __eq__(self, other) -> bool:
        if isinstance(other, Variant):
            mine, theirs = (None if x.spec is None else x.spec.fingerprint() for x in (self, other))
            return self.model_name == other.model_name and self.interventions == other.interventions and mine == theirs
        return isinstance(other, str) and canonical_name(other) == self.model_name

    __hash__ = None


def compile_interventions(interventions, features) -> SteeringSpec:
    """Interventions -> one SteeringSpec; SAE clamps on one SAE are merged into one encode/set/decode."""
    from ..steering import LayerSteeringSpec, SteeringSpec

    layers: dict[int, list] = {}
    clamps: dict[str, tuple[int, list, list]] = {}
    for raw in interventions or []:
        iv = InterventionSpec.from_any(raw)
        feature = features.get(iv.feature_id if iv.feature_id and iv.feature_id in features._by_id else iv.index_in_sae)
        if iv.mode == "clamp" and feature.kind == "sae":
            layer, idx, vals = clamps.setdefault(feature.sae, (feature.layer, [], []))
            idx.append(feature.index_in_sae)
            vals.append(iv.strength * feature.max_activation)
            continue
        layers.setdefault(feature.layer, []).append(features.op_for(feature, iv.strength, iv.mode))
    for name, (layer, idx, vals) in clamps.items():
        layers.setdefault(layer, []).append(features.saes[name].clamp_op(idx, vals))
    return SteeringSpec(layers={l: LayerSteeringSpec(operations=ops) for l, ops in layers.items()})
