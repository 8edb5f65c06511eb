"""Labelled features (concept directions and SAE features) and the set a model carries.

Every feature has a unit ``direction`` at its ``layer`` and a ``scale``, its natural size in
residual units: a strength-``s`` intervention in mode ``add`` adds ``s * scale * direction``
(docs/DESIGN.md "Strength units"). Activations, used by inspect / activations / contrast:

- concept directions: the calibrated projection ``(h . r - bias) / span`` per token on the
  feature's read direction ``r`` (its ``encoder``: Fisher's discriminant, see concepts.py;
  ``direction`` when it has none), where ``bias`` is the mean projection on neutral text and
  ``span`` the mean projection on the concept's own examples minus ``bias``. So a concept
  reads about 0 on neutral text (single tokens scatter around it, slightly negative too) and
  about 1 on text like its examples; it is "active" (for ``frequency``) above 0.5. It is not
  clipped at 0: clipping would turn per-token noise into a positive mean and favour the
  noisiest directions.
- SAE features: the SAE's own encoding (active above 0).

>>> fs = wb.FeatureSet.from_sae("my_sae/", labels="labels.json")  # doctest: +SKIP
>>> fs.search("pirates", top_k=3)                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UnknownFeatureError, ValidationError
from ..steering import AddSpec, ProjectionCapSpec
from .feature import Feature
from .sae import SAE, load_labels


class FeatureSet:
    """An ordered collection of features with lookup, search, activations and files."""

    def __init__(self, features=(), saes: dict | None = None, name: str = "features"):
        self.name = name
        self.saes: dict[str, SAE] = dict(saes or {})
        self._features: list[Feature] = []
        self._by_id: dict[str, int] = {}
        self._index = None      # search index, built on first search
        self.model = None       # the SteerModel this set is attached to, if any
        for f in features:
            self.add(f)

    # -- collection ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._features)

    def __iter__(self):
        return iter(self._features)

    def __repr__(self) -> str:
        layers = sorted({f.layer for f in self._features})
        return f"<FeatureSet {self.name!r}: {len(self)} features at layers {layers}>"

    def add(self, feature: Feature) -> Feature:
        if feature.id in self._by_id:
            raise ValidationError(f"duplicate feature id {feature.id!r} in feature set {self.name!r}")
        for name, v in (("direction", feature.direction), ("encoder", feature.encoder)):
            if v is not None and (v.dim() != 1 or not bool(torch.isfinite(v).all())):
                raise ValidationError(f"feature {feature.id!r}: {name} must be a finite 1-D vector")
        if feature.encoder is not None and feature.encoder.shape != feature.direction.shape:
            raise ValidationError(f"feature {feature.id!r}: encoder and direction differ in size "
                                  f"({feature.encoder.numel()} vs {feature.direction.numel()})")
        self._by_id[feature.id] = len(self._features)
        self._features.append(feature)
        self._index = None
        return feature

    def remove(self, key) -> Feature:
        """Take a feature out of the set (by id, index_in_sae or Feature)."""
        feature = self.get(key)
        self._features.remove(feature)
        self._by_id = {f.id: i for i, f in enumerate(self._features)}
        self._index = None
        return feature

    def get(self, key) -> Feature:
        """A feature by id (str), by ``index_in_sae`` (int), or from a ``FeatureItem``-like object/dict."""
        if isinstance(key, Feature):
            key = key.id
        elif isinstance(key, dict):
            key = key.get("id") or key.get("index_in_sae")
        elif hasattr(key, "id") and hasattr(key, "index_in_sae"):
            key = key.id if key.id in self._by_id else key.index_in_sae
        if isinstance(key, str):
            if key not in self._by_id:
                raise UnknownFeatureError(f"unknown feature id {key!r}; the set {self.name!r} has {len(self)} features")
            return self._features[self._by_id[key]]
        if isinstance(key, bool) or not isinstance(key, int):
            raise UnknownFeatureError(f"a feature is looked up by id (str) or index_in_sae (int), got {key!r}")
        hits = [f for f in self._features if f.index_in_sae == key]
        if not hits:
            known = sorted(f.index_in_sae for f in self._features)
            rng = f"{known[0]}..{known[-1]}" if known else "none"
            raise UnknownFeatureError(f"no feature with index_in_sae {key}; indices in this set: {rng}")
        if len(hits) > 1:
            raise UnknownFeatureError(f"index_in_sae {key} is ambiguous ({[f.id for f in hits]}); use the feature id")
        return hits[0]

    def __getitem__(self, key) -> Feature:
        return self.get(key)

    def position(self, feature: Feature) -> int:
        return self._by_id[feature.id]

    def layers(self) -> list[int]:
        return sorted({f.layer for f in self._features})

    def items(self) -> list[dict]:
        return [f.to_item() for f in self._features]

    # -- steering ------------------------------------------------------------------------------
    def op_for(self, feature: Feature, strength: float, mode: str):
        """The steering op of one intervention, in docs/DESIGN.md's strength units."""
        if mode == "add":
            return AddSpec(feature.direction * (strength * feature.scale))
        if feature.kind == "sae":
            return self.saes[feature.sae].clamp_op([feature.index_in_sae], [strength * feature.max_activation])
        value = strength * feature.scale
        return ProjectionCapSpec(feature.direction, min=value, max=value)

    # -- activations ---------------------------------------------------------------------------
    def activations_from_hidden(self, hidden: dict) -> torch.Tensor:
        """Per-token activations ``[tokens, len(self)]`` from ``{layer: [tokens, hidden]}`` residuals."""
        missing = [l for l in self.layers() if l not in hidden]
        if missing:
            raise ValidationError(f"activations need the residuals of layers {missing}")
        tokens = next(iter(hidden.values())).shape[0]
        out = torch.zeros(tokens, len(self))
        by_group: dict = {}
        for i, f in enumerate(self._features):
            by_group.setdefault((f.layer, f.kind, f.sae), []).append(i)
        for (layer, kind, sae_name), idx in by_group.items():
            h = hidden[layer].float()
            feats = [self._features[i] for i in idx]
            if kind == "sae":
                acts = self.saes[sae_name].encode(h)[:, [f.index_in_sae for f in feats]]
            else:
                u = torch.stack([f.read_direction() for f in feats]).float()
                bias = torch.tensor([f.bias for f in feats])
                span = torch.tensor([f.span for f in feats]).clamp(min=1e-6)
                acts = (h @ u.T - bias) / span
            out[:, idx] = acts
        return out

    def activations_of(self, feature: Feature, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token activations ``[tokens]`` of one feature from residuals ``[tokens, hidden]`` at its layer."""
        return FeatureSet([feature], saes=self.saes, name=feature.id).activations_from_hidden({feature.layer: hidden})[:, 0]

    def active_threshold(self) -> torch.Tensor:
        """Per feature, the activation above which it counts as active (``frequency``)."""
        return torch.tensor([0.5 if f.kind == "concept" else 0.0 for f in self._features])

    # -- search --------------------------------------------------------------------------------
    def search(self, query: str, top_k: int = 10) -> list[Feature]:
        """Features whose labels are closest in meaning to ``query`` (best first).

        >>> [f.label for f in model.features.search("roleplay as pirate", top_k=3)]  # doctest: +SKIP
        """
        from .search import LabelIndex

        if self._index is None:
            self._index = LabelIndex([f.label for f in self._features])
        return [self._features[i] for i, _ in self._index.search(query, top_k)]

    def rerank(self, query: str, features, top_k: int | None = None) -> list[Feature]:
        """Reorder ``features`` (Features, FeatureItems, dicts or ids) by similarity to ``query``."""
        from .search import LabelIndex

        feats = [self._resolve_loose(f) for f in features]
        if not feats:
            return []
        order = LabelIndex([f.label for f in feats], cache=self._index).search(query, top_k or len(feats))
        return [feats[i] for i, _ in order]

    def _resolve_loose(self, f) -> Feature:
        try:
            return self.get(f)
        except UnknownFeatureError:
            if isinstance(f, dict) and "label" in f:
                return Feature(id=f.get("id", ""), label=f["label"], layer=f.get("layer", 0),
                               index_in_sae=f.get("index_in_sae", -1), direction=torch.zeros(1), dimension=f.get("dimension"))
            if hasattr(f, "label"):
                return Feature(id=getattr(f, "id", ""), label=f.label, layer=getattr(f, "layer", 0),
                               index_in_sae=getattr(f, "index_in_sae", -1), direction=torch.zeros(1))
            raise

    # -- model-backed operations (need the set attached to a model) --------------------------------
    def _model(self):
        if self.model is None:
            raise ValidationError("this feature set is not attached to a model: set model.features = feature_set first")
        return self.model

    async def add_concept(self, label: str, positive, negative=None, layer: int | None = None, method: str = "mean_diff"):
        """Train a concept direction from contrastive examples and add it to the set.

        ``method``: ``"mean_diff"`` (default), ``"caa"``, ``"pca"`` or ``"probe"`` (see ``concepts.METHODS``).

        >>> f = await model.features.add_concept("volcanoes", positive=["Lava poured down the volcano."])  # doctest: +SKIP
        """
        from .concepts import train_concept

        feature = await train_concept(self._model(), label, positive, negative, layer, method=method,
                                      index_in_sae=max([f.index_in_sae for f in self._features], default=-1) + 1)
        if feature.id in self._by_id:
            feature.id = f"{feature.id}-{len(self)}"
        return self.add(feature)

    async def add_vector(self, label: str, vector, layer: int, scale: float | None = None,
                         feature_id: str | None = None) -> Feature:
        """Add a raw direction as a feature, so search, the dials and Variants steer it in strength units.

        ``scale`` (what strength 1 adds) defaults to the median per-token residual norm at ``layer``
        on the library's neutral sentences, as for concepts.

        >>> f = await model.features.add_vector("my direction", v, layer=6)   # doctest: +SKIP
        >>> wb.Variant("default").set(f, strength=0.4)                        # doctest: +SKIP
        """
        from .concepts import example_stats, library_data, slug

        model = self._model()
        layer = model.check_layer(layer)
        if not isinstance(label, str) or not label.strip():
            raise ValidationError(f"a vector feature needs a non-empty label, got {label!r}")
        v = torch.as_tensor(vector, dtype=torch.float32).detach().cpu().flatten()
        if v.numel() != model.hidden_size:
            raise ValidationError(f"vector has {v.numel()} entries; this model's hidden size is {model.hidden_size}")
        if not bool(torch.isfinite(v).all()) or float(v.norm()) == 0.0:
            raise ValidationError("vector must be finite and non-zero")
        if scale is None:
            _, _, norms = await example_stats(model, library_data()["neutral"], [layer])
            scale = float(norms[0].median())
        return self.add(Feature(id=feature_id or f"vector/{slug(label)}", label=label, layer=layer,
                                index_in_sae=max([f.index_in_sae for f in self._features], default=-1) + 1,
                                direction=v / v.norm(), scale=float(scale), kind="vector"))

    async def inspect(self, messages, top_k: int = 10, aggregation_method: str = "mean", interventions=None):
        """The most active features over a conversation: ``[(Feature, activation)]``."""
        from . import inspection

        return await inspection.inspect(self._model(), self, messages, top_k, aggregation_method, interventions)

    async def activations(self, messages, aggregation_method: str = "mean", interventions=None) -> list[float]:
        """One aggregated activation per feature of the set."""
        from . import inspection

        return await inspection.activations(self._model(), self, messages, aggregation_method, interventions)

    async def token_activations(self, messages, interventions=None) -> torch.Tensor:
        """``[tokens - 1, features]`` per-token activations (first token left out)."""
        from . import inspection

        [acts] = await inspection.token_activations(self._model(), self, [messages], interventions)
        return acts

    async def token_table(self, messages, features=None, interventions=None) -> dict:
        """Per content token: text, message index and the activations of ``features`` (ids, indices or Features)."""
        from . import inspection

        keys = None if features is None else [getattr(f, "id", f) for f in features]
        return await inspection.token_table(self._model(), self, messages, keys, interventions)

    async def logits(self, messages, top_k=None, start_idx=None, end_idx=None, interventions=None) -> dict:
        """Next-token logits (decoded token -> logit) at the end of the conversation (or of ``[start_idx, end_idx)``)."""
        from . import inspection

        return await inspection.logits(self._model(), self, messages, top_k, start_idx, end_idx, interventions)

    async def page(self, feature, corpus=None, **kwargs):
        """The feature's page: top contexts in the library and ``corpus``, activation histogram, promoted tokens.

        Keyword arguments go to ``pages.feature_page`` (``top_n``, ``window``, ``bins``, ``include_library``).

        >>> await model.features.page("concept/pirate", corpus=["Arr, hoist the sails!"])  # doctest: +SKIP
        """
        from .pages import feature_page

        return await feature_page(self._model(), self.get(feature), corpus, features=self, **kwargs)

    async def contrast(self, dataset_1, dataset_2, k_to_add: int = 10, k_to_remove: int = 10,
                       interventions_1=None, interventions_2=None):
        """``(top_to_add, top_to_remove)``: features more active in dataset_1, and in dataset_2."""
        from . import inspection

        return await inspection.contrast(self._model(), self, dataset_1, dataset_2, k_to_add, k_to_remove,
                                         interventions_1, interventions_2)

    # -- files ---------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write ``features.json`` + ``features.safetensors`` (directions, SAE weights) into folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, []
        for i, f in enumerate(self._features):
            tensors[f"direction.{i}"] = f.direction.contiguous()
            if f.encoder is not None:
                tensors[f"encoder.{i}"] = f.encoder.contiguous()
            meta.append({k: getattr(f, k) for k in ("id", "label", "layer", "index_in_sae", "scale", "dimension", "kind",
                                                   "bias", "span", "sae", "max_activation", "method")})
        saes = {}
        for name, sae in self.saes.items():
            for t in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                if getattr(sae, t) is not None:
                    tensors[f"sae.{name}.{t}"] = getattr(sae, t).contiguous()
            saes[name] = {"layer": sae.layer, "activation": sae.activation, "k": sae.k,
                          "apply_b_dec_to_input": sae.apply_b_dec_to_input}
        save_file(tensors, str(path / "features.safetensors"))
        (path / "features.json").write_text(json.dumps({"version": 1, "name": self.name, "features": meta, "saes": saes}))
        return path

    @classmethod
    def load(cls, path) -> "FeatureSet":
        from safetensors.torch import load_file

        path = Path(path)
        try:
            meta = json.loads((path / "features.json").read_text())
            tensors = load_file(str(path / "features.safetensors"))
        except Exception as exc:
            raise ValidationError(f"{str(path)!r} is not a saved feature set ({exc})") from exc
        saes = {}
        for name, info in meta.get("saes", {}).items():
            saes[name] = SAE(W_enc=tensors[f"sae.{name}.W_enc"], b_enc=tensors[f"sae.{name}.b_enc"],
                             W_dec=tensors[f"sae.{name}.W_dec"], b_dec=tensors[f"sae.{name}.b_dec"],
                             threshold=tensors.get(f"sae.{name}.threshold"), name=name, **info)
        feats = [Feature(direction=tensors[f"direction.{i}"], encoder=tensors.get(f"encoder.{i}"), **m)
                 for i, m in enumerate(meta["features"])]
        return cls(feats, saes=saes, name=meta.get("name", "features"))

    @classmethod
    def from_sae(cls, path, labels=None, layer: int | None = None, max_activations=None) -> "FeatureSet":
        """Features of an SAE in SAELens layout, labelled from a Neuronpedia-style labels file.

        Unlabelled features get the label ``"feature <i>"``. ``max_activations`` (or a
        ``max_activation``/``maxActApprox`` field in the labels) gives each feature's typical maximum
        activation; otherwise :meth:`calibrate` measures it on neutral text.
        """
        sae = SAE.load(path, layer=layer)
        recs = load_labels(labels, sae.d_sae) if labels is not None else {}
        norms = sae.W_dec.norm(dim=-1)
        fs = cls(saes={sae.name: sae}, name=sae.name)
        for i in range(sae.d_sae):
            rec = recs.get(i, {})
            mx = rec.get("max_activation", rec.get("maxActApprox"))
            if max_activations is not None:
                mx = float(max_activations[i])
            mx = float(mx) if mx else 1.0
            n = float(norms[i]) or 1.0
            fs.add(Feature(id=str(rec.get("id") or f"{sae.name}/{i}"), label=str(rec.get("description") or f"feature {i}"),
                           layer=sae.layer, index_in_sae=i, direction=sae.W_dec[i] / n, scale=mx * n, kind="sae",
                           sae=sae.name, max_activation=mx, dimension=sae.d_sae))
        return fs
