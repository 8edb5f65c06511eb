"""Steering specs (add / projection cap / ablation), their math, and their files.

Layer ``L`` is the residual stream at the output of decoder block ``L``; ops of a layer are
applied in list order to every token of a request (see docs/DESIGN.md).

>>> import torch, workbench as wb
>>> spec = wb.SteeringSpec(layers={6: wb.LayerSteeringSpec(operations=[wb.AddSpec(torch.ones(576), scale=2.0)])})
>>> spec.layer_indices()
[6]
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Union

import torch

from . import opmath
from .errors import LayerOutOfRangeError, ValidationError, VectorError


def _as_vector(vector, what: str) -> torch.Tensor:
    """Turn user input into a finite 1-D float32 CPU tensor, or raise a VectorError naming it."""
    try:
        t = torch.as_tensor(vector, dtype=torch.float32).detach().to("cpu")
    except Exception as exc:  # lists of strings, ragged lists, ...
        raise VectorError(f"{what}: cannot convert {type(vector).__name__} to a float vector ({exc})") from exc
    if t.dim() != 1:
        raise VectorError(f"{what}: expected a 1-D vector, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise VectorError(f"{what}: the vector is empty")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        raise VectorError(f"{what}: vector has a non-finite value {float(t[idx])} at index {idx}; all entries must be finite")
    return t.contiguous()


def _finite_number(value, what: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(f):
        raise ValidationError(f"{what} must be finite, got {value!r}")
    return f


@dataclass
class AddSpec:
    """``h <- h + scale * vector`` (vector used as given)."""

    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self):
        self.vector = _as_vector(self.vector, "AddSpec.vector")
        self.scale = _finite_number(self.scale, "AddSpec.scale")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return opmath.add(h, self.scale * self.vector.to(h.device, h.dtype))

    def materialize(self) -> torch.Tensor:
        """The vector actually added, ``scale * vector`` (chatspace's name)."""
        return (self.scale * self.vector).contiguous()

    def clone(self) -> "AddSpec":
        return AddSpec(vector=self.vector.clone(), scale=self.scale)


@dataclass
class ProjectionCapSpec:
    """Clamp the component along ``vector``: ``h <- h + (clamp(h.u, min, max) - h.u) * u``."""

    vector: torch.Tensor
    min: float | None = None
    max: float | None = None

    def __post_init__(self):
        self.vector = _as_vector(self.vector, "ProjectionCapSpec.vector")
        if float(self.vector.norm()) == 0.0:
            raise VectorError("ProjectionCapSpec.vector has zero length; a direction needs a non-zero vector")
        self.min = _finite_number(self.min, "ProjectionCapSpec.min", allow_none=True)
        self.max = _finite_number(self.max, "ProjectionCapSpec.max", allow_none=True)
        if self.min is None and self.max is None:
            raise ValidationError("ProjectionCapSpec needs min or max (or both); got neither")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValidationError(f"ProjectionCapSpec.min ({self.min}) must be <= max ({self.max})")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return opmath.project(h, _unit(self.vector, h), lo=self.min, hi=self.max)

    def clone(self) -> "ProjectionCapSpec":
        return ProjectionCapSpec(vector=self.vector.clone(), min=self.min, max=self.max)


@dataclass
class AblationSpec:
    """Scale the component along ``vector``: ``h <- h + (scale - 1) * (h.u) * u``."""

    vector: torch.Tensor
    scale: float = 1.0

    def __post_init__(self):
        self.vector = _as_vector(self.vector, "AblationSpec.vector")
        if float(self.vector.norm()) == 0.0:
            raise VectorError("AblationSpec.vector has zero length; a direction needs a non-zero vector")
        self.scale = _finite_number(self.scale, "AblationSpec.scale")

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        return opmath.project(h, _unit(self.vector, h), c=self.scale - 1.0)

    def clone(self) -> "AblationSpec":
        return AblationSpec(vector=self.vector.clone(), scale=self.scale)


def _as_matrix(value, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(value, dtype=torch.float32).detach().to("cpu")
    except Exception as exc:
        raise VectorError(f"{what}: cannot convert to a float tensor ({exc})") from exc
    if not bool(torch.isfinite(t).all()):
        raise VectorError(f"{what} has non-finite values")
    return t.contiguous()


@dataclass
class SAEClampSpec:
    """Set SAE features to ``values``: encode, set, decode, keep the reconstruction error.

    ``h <- h + sum_f (value_f - a_f(h)) * decoder[f]`` with
    ``a_f(h) = act((h - decoder_bias) . encoder[:, f] + encoder_bias[f])`` (``act``: ReLU, or JumpReLU
    with ``threshold``; TopK SAEs are treated as ReLU for the clamped features).
    """

    encoder: torch.Tensor        # [hidden, k]
    encoder_bias: torch.Tensor   # [k]
    decoder: torch.Tensor        # [k, hidden]
    decoder_bias: torch.Tensor   # [hidden]
    values: torch.Tensor         # [k]
    threshold: torch.Tensor | None = None  # [k], JumpReLU
    apply_b_dec_to_input: bool = True

    def __post_init__(self):
        self.encoder = _as_matrix(self.encoder, "SAEClampSpec.encoder")
        k = self.encoder.shape[1] if self.encoder.dim() == 2 else -1
        self.encoder_bias = _as_matrix(self.encoder_bias, "SAEClampSpec.encoder_bias").reshape(-1)
        self.decoder = _as_matrix(self.decoder, "SAEClampSpec.decoder")
        self.decoder_bias = _as_matrix(self.decoder_bias, "SAEClampSpec.decoder_bias").reshape(-1)
        self.values = _as_matrix(self.values, "SAEClampSpec.values").reshape(-1)
        if self.threshold is not None:
            self.threshold = _as_matrix(self.threshold, "SAEClampSpec.threshold").reshape(-1)
        hidden = self.decoder_bias.numel()
        ok = (self.encoder.dim() == 2 and self.encoder.shape[0] == hidden and self.encoder_bias.numel() == k
              and tuple(self.decoder.shape) == (k, hidden) and self.values.numel() == k
              and (self.threshold is None or self.threshold.numel() == k))
        if not ok:
            raise VectorError(
                f"SAEClampSpec shapes do not fit: encoder {tuple(self.encoder.shape)}, decoder {tuple(self.decoder.shape)}, "
                f"decoder_bias {hidden}, values {self.values.numel()}; expected [hidden, k], [k, hidden], [hidden], [k]"
            )

    @property
    def vector(self) -> torch.Tensor:
        return self.decoder_bias  # for size checks: the op lives in a [hidden] space

    def activations(self, h: torch.Tensor) -> torch.Tensor:
        x = h - self.decoder_bias.to(h) if self.apply_b_dec_to_input else h
        pre = x @ self.encoder.to(h) + self.encoder_bias.to(h)
        if self.threshold is not None:
            return pre * (pre > self.threshold.to(h))
        return torch.relu(pre)

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.values.to(h) - self.activations(h)
        return h + delta @ self.decoder.to(h)


SteeringOp = Union[AddSpec, ProjectionCapSpec, AblationSpec, SAEClampSpec]
_OP_KINDS = {"add": AddSpec, "projection_cap": ProjectionCapSpec, "ablation": AblationSpec, "sae_clamp": SAEClampSpec}


def op_kind(op) -> str:
    """The wire name of an op: ``"add"``, ``"projection_cap"``, ``"ablation"`` or ``"sae_clamp"``."""
    for kind, cls in _OP_KINDS.items():
        if isinstance(op, cls):
            return kind
    raise ValidationError(f"unknown steering op {type(op).__name__}")
_KIND_OF = {v: k for k, v in _OP_KINDS.items()}


def _unit(vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    v = vector.to(like.device, torch.float32)
    return (v / v.norm()).to(like.dtype)


class LayerSteeringSpec:
    """The ops of one layer, applied in list order.

    The chatspace form ``LayerSteeringSpec(add=..., projection_cap=..., ablation=...)`` is accepted
    too and becomes ``operations=[add, projection_cap, ablation]``. The other way round, ``.add``,
    ``.projection_cap`` and ``.ablation`` show the layer in chatspace's form whenever it has one
    (at most one op of each kind, in that order, no SAE clamp), else ``None``; assigning to them
    replaces (or, with ``None``, removes) the op of that kind.

    >>> import torch
    >>> ls = LayerSteeringSpec(add=AddSpec(torch.ones(4), scale=2.0))
    >>> ls.add.scale, len(ls.operations)
    (2.0, 1)
    """

    def __init__(self, operations=None, add: AddSpec | None = None, projection_cap: ProjectionCapSpec | None = None,
                 ablation: AblationSpec | None = None):
        ops = list(operations or [])
        for kind, extra in ((AddSpec, add), (ProjectionCapSpec, projection_cap), (AblationSpec, ablation)):
            if extra is not None and not isinstance(extra, kind):
                raise ValidationError(f"LayerSteeringSpec: expected a {kind.__name__}, got {type(extra).__name__}")
            if extra is not None:
                ops.append(extra)
        for i, op in enumerate(ops):
            if not isinstance(op, tuple(_OP_KINDS.values())):
                raise ValidationError(
                    f"operations[{i}] is a {type(op).__name__}; expected AddSpec, ProjectionCapSpec, AblationSpec or SAEClampSpec"
                )
        self.operations = ops

    def __repr__(self) -> str:
        return f"LayerSteeringSpec(operations={self.operations!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerSteeringSpec) and self.operations == other.operations

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def _chatspace_form(self) -> dict | None:
        """``{kind: op}`` when the ops fit chatspace's one-slot-per-kind layer, else None."""
        ranks = [_CANONICAL.index(type(op)) if type(op) in _CANONICAL else -1 for op in self.operations]
        if -1 in ranks or ranks != sorted(set(ranks)):
            return None
        return {type(op): op for op in self.operations}

    def _view(self, kind):
        form = self._chatspace_form()
        return None if form is None else form.get(kind)

    def _set(self, kind, op) -> None:
        if op is not None and not isinstance(op, kind):
            raise ValidationError(f"expected a {kind.__name__} or None, got {type(op).__name__}")
        self.operations = _replace_kind(self.operations, kind, op)

    add = property(lambda self: self._view(AddSpec), lambda self, op: self._set(AddSpec, op),
                   doc="The layer's additive op in chatspace's form (None if absent or not expressible).")
    projection_cap = property(lambda self: self._view(ProjectionCapSpec), lambda self, op: self._set(ProjectionCapSpec, op),
                              doc="The layer's projection cap in chatspace's form (None if absent or not expressible).")
    ablation = property(lambda self: self._view(AblationSpec), lambda self, op: self._set(AblationSpec, op),
                        doc="The layer's ablation in chatspace's form (None if absent or not expressible).")

    def clone(self) -> "LayerSteeringSpec":
        """A copy with its own op list (chatspace's name; vectors are shared, they are never mutated)."""
        return LayerSteeringSpec(operations=list(self.operations))

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        for op in self.operations:
            h = op.apply(h)
        return h

    def is_empty(self) -> bool:
        return not self.operations


@dataclass
class SteeringSpec:
    """Steering for a whole model: ``{layer: LayerSteeringSpec}``; an empty spec means no steering."""

    layers: dict = field(default_factory=dict)
    # steer only when a probe crosses a threshold (``workbench.monitor.Condition``); None: always
    condition: Any = None

    def __post_init__(self):
        if self.condition is not None:
            from .monitor import Condition

            if isinstance(self.condition, dict):
                self.condition = Condition.from_dict(self.condition)
            if not isinstance(self.condition, Condition):
                raise ValidationError(f"condition must be a wb.Condition, got {type(self.condition).__name__}")
        layers = {}
        for key, value in dict(self.layers or {}).items():
            if isinstance(key, bool) or not isinstance(key, (int,)) and not (isinstance(key, str) and key.lstrip("-").isdigit()):
                raise ValidationError(f"steering layer keys must be integers, got {key!r}")
            if isinstance(value, (list, tuple)):
                value = LayerSteeringSpec(operations=list(value))
            if not isinstance(value, LayerSteeringSpec):
                raise ValidationError(f"steering layer {key}: expected a LayerSteeringSpec, got {type(value).__name__}")
            layers[int(key)] = value
        self.layers = layers

    # -- queries --------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        return all(ls.is_empty() for ls in self.layers.values())

    def layer_indices(self) -> list[int]:
        return sorted(k for k, v in self.layers.items() if not v.is_empty())

    def copy(self) -> "SteeringSpec":
        """A copy whose layer and op lists can be changed without touching this one (vectors shared)."""
        return SteeringSpec(layers={k: LayerSteeringSpec(operations=list(v.operations)) for k, v in self.layers.items()},
                            condition=self.condition)

    clone = copy  # chatspace's name

    def validate(self, hidden_size: int, layer_count: int) -> "SteeringSpec":
        """Check layers and vector sizes against a model; return self."""
        for layer, ls in self.layers.items():
            if not 0 <= layer < layer_count:
                raise LayerOutOfRangeError(f"steering layer {layer} is out of range; allowed 0..{layer_count - 1}")
            for i, op in enumerate(ls.operations):
                if op.vector.numel() != hidden_size:
                    raise VectorError(
                        f"layer {layer} operations[{i}] ({type(op).__name__}): vector has size "
                        f"{op.vector.numel()}, the model's hidden size is {hidden_size}"
                    )
        if self.condition is not None:
            probe = self.condition.probe
            if not 0 <= probe.layer < layer_count:
                raise LayerOutOfRangeError(f"condition probe layer {probe.layer} is out of range; allowed 0..{layer_count - 1}")
            if probe.vector.numel() != hidden_size:
                raise VectorError(f"condition probe {probe.name!r}: vector has size {probe.vector.numel()}, "
                                  f"the model's hidden size is {hidden_size}")
        return self

    def fingerprint(self) -> str:
        """A stable hash of the spec's content (equal specs -> equal fingerprints)."""
        h = hashlib.sha256()
        for layer in self.layer_indices():
            h.update(f"L{layer};".encode())
            for op in self.layers[layer].operations:
                h.update(json.dumps(_op_meta(op), sort_keys=True).encode())
                for name, tensor in sorted(_op_tensors(op).items()):
                    h.update(name.encode())
                    h.update(tensor.numpy().tobytes())
        if self.condition is not None and not self.is_empty():
            h.update(json.dumps(self.condition.meta(), sort_keys=True).encode())
            h.update(self.condition.probe.vector.numpy().tobytes())
        return h.hexdigest()[:32]

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-able dict (vectors as lists)."""
        return {
            "layers": {
                str(layer): [dict(_op_meta(op), **{k: t.tolist() for k, t in _op_tensors(op).items()})
                             for op in self.layers[layer].operations]
                for layer in sorted(self.layers)
            },
            **({"condition": self.condition.to_dict()} if self.condition is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SteeringSpec":
        if not isinstance(data, dict) or not isinstance(data.get("layers", {}), dict):
            raise ValidationError("a steering spec dict needs a 'layers' mapping of layer -> list of ops")
        layers = {}
        for layer, ops in data.get("layers", {}).items():
            layers[int(layer)] = LayerSteeringSpec(operations=[_op_from_meta(op, op) for op in ops])
        return cls(layers=layers, condition=data.get("condition"))

    def save(self, path) -> Path:
        """Write the spec to one ``.safetensors`` file (vectors as tensors, ops as JSON metadata).

        >>> spec.save("pirate.safetensors")  # doctest: +SKIP
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors, ops_meta = {}, {}
        for layer in sorted(self.layers):
            metas = []
            for i, op in enumerate(self.layers[layer].operations):
                for name, tensor in _op_tensors(op).items():
                    tensors[f"layer{layer}.op{i}.{name}"] = tensor.contiguous()
                metas.append(_op_meta(op))
            ops_meta[str(layer)] = metas
        meta = {"version": 1, "layers": ops_meta}
        if self.condition is not None:
            meta["condition"] = self.condition.meta()
            tensors["condition.vector"] = self.condition.probe.vector.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"workbench_steering_spec": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path) -> "SteeringSpec":
        """Read a spec written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ValidationError(f"steering spec file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["workbench_steering_spec"])
                layers = {}
                for layer, metas in meta["layers"].items():
                    layers[int(layer)] = LayerSteeringSpec(
                        operations=[_op_from_meta(m, _TensorGetter(f, f"layer{layer}.op{i}.")) for i, m in enumerate(metas)]
                    )
                condition = meta.get("condition")
                if condition is not None:
                    condition["probe"]["vector"] = f.get_tensor("condition.vector")
        except (KeyError, json.JSONDecodeError, OSError) as exc:
            raise ValidationError(f"{str(path)!r} is not a workbench steering spec file ({exc})") from exc
        return cls(layers=layers, condition=condition)


def _op_meta(op) -> dict:
    kind = _KIND_OF[type(op)]
    if kind == "projection_cap":
        return {"type": kind, "min": op.min, "max": op.max}
    if kind == "sae_clamp":
        return {"type": kind, "apply_b_dec_to_input": op.apply_b_dec_to_input}
    return {"type": kind, "scale": op.scale}


_SAE_TENSORS = ("encoder", "encoder_bias", "decoder", "decoder_bias", "values", "threshold")


def _op_tensors(op) -> dict:
    if isinstance(op, SAEClampSpec):
        return {name: getattr(op, name) for name in _SAE_TENSORS if getattr(op, name) is not None}
    return {"vector": op.vector}


class _TensorGetter:
    """``getter.get(name)`` for one op's tensors in a safetensors file."""

    def __init__(self, handle, prefix: str):
        self._handle, self._prefix = handle, prefix
        self._keys = set(handle.keys())

    def get(self, name, default=None):
        key = self._prefix + name
        return self._handle.get_tensor(key) if key in self._keys else default


def _op_from_meta(meta: dict, tensors) -> SteeringOp:
    """Rebuild an op from its metadata and ``tensors.get(name)`` (a dict or a file getter)."""
    kind = meta.get("type")
    if kind not in _OP_KINDS:
        raise ValidationError(f"unknown steering op type {kind!r}; allowed: {sorted(_OP_KINDS)}")
    if kind == "sae_clamp":
        parts = {name: tensors.get(name) for name in _SAE_TENSORS}
        return SAEClampSpec(**parts, apply_b_dec_to_input=bool(meta.get("apply_b_dec_to_input", True)))
    vector = tensors.get("vector")
    if kind == "projection_cap":
        return ProjectionCapSpec(vector=vector, min=meta.get("min"), max=meta.get("max"))
    return _OP_KINDS[kind](vector=vector, scale=meta.get("scale", 1.0))


def apply_ops(h: torch.Tensor, ops: Iterable[SteeringOp]) -> torch.Tensor:
    """Apply ops in order to ``h`` ([..., hidden]); the reference math of docs/DESIGN.md."""
    for op in ops:
        h = op.apply(h)
    return h


# The canonical order the global setters keep: add first, then cap, then ablation (as chatspace).
_CANONICAL = (AddSpec, ProjectionCapSpec, AblationSpec)


def merge_specs(*specs: "SteeringSpec") -> "SteeringSpec":
    """One spec applying each given spec's ops in turn at every layer (in argument order)."""
    layers: dict[int, list] = {}
    conditions: list = []
    for spec in specs:
        if spec is None:
            continue
        for layer in sorted(spec.layers):
            layers.setdefault(layer, []).extend(spec.layers[layer].operations)
        if spec.condition is not None and all(spec.condition != c for c in conditions):
            conditions.append(spec.condition)
    if len(conditions) > 1:  # one request has one decision per token: the specs cannot both hold
        raise ValidationError("cannot merge steering specs with different conditions")
    return SteeringSpec(layers={layer: LayerSteeringSpec(operations=ops) for layer, ops in layers.items()},
                        condition=conditions[0] if conditions else None)


def _replace_kind(operations: list, kind: type, op: SteeringOp | None) -> list:
    """``operations`` without the ops of ``kind``, plus ``op`` at its canonical place (add, cap, ablation)."""
    ops = [o for o in operations if not isinstance(o, kind)]
    if op is not None:
        rank = _CANONICAL.index(kind)
        pos = next((i for i, o in enumerate(ops) if type(o) in _CANONICAL and _CANONICAL.index(type(o)) > rank), len(ops))
        ops.insert(pos, op)
    return ops


def replace_op(spec: SteeringSpec, layer: int, op: SteeringOp | None, kind: type) -> SteeringSpec:
    """A copy of ``spec`` with the ops of ``kind`` at ``layer`` replaced by ``op`` (or removed)."""
    new = spec.copy()
    ops = _replace_kind(new.layers.get(layer, LayerSteeringSpec()).operations, kind, op)
    if ops:
        new.layers[layer] = LayerSteeringSpec(operations=ops)
    else:
        new.layers.pop(layer, None)
    return new
