"""Watching the model while it talks: probes, live projections, and conditional (CAST-style) steering.

A :class:`Probe` reads one number per token from the residual stream at one layer:
``value = (h . v - bias) / span`` (``cosine=True``: ``h . v / |h|``), where ``h`` is the stream at
the probe's layer after that layer's steering and ``v`` its unit read vector. A feature of the
library becomes a probe with its own read direction, bias and span, so a monitored value is the
feature's activation as ``inspect`` reports it; a raw vector becomes its plain projection.

Monitoring (``model.chat(..., monitor=[...])``, ``model.stream_chat(..., monitor=[...])``) reports
the probes' values for every position the model processes: prompt tokens, then each generated
token as it is fed back (the last generated token is never fed, as for captures). Streams carry
them as they are computed, one step behind the text.

A :class:`Condition` on a spec (``SteeringSpec(layers=..., condition=Condition(...))``) makes its
steering conditional. Exact semantics, the same on both backends (``P`` = prompt length, positions
``0..P-1`` are the prompt, position ``p >= P`` is the ``(p-P+1)``-th generated token fed back):

- prompt positions are never steered by a conditional spec;
- ``mode="prompt"``: the condition holds when the mean of the probe over the prompt positions
  crosses the threshold; then every position ``p >= P`` is steered, else none;
- ``mode="token"``: position ``p >= P`` is steered when the probe crossed at position ``p - 1``
  (the token before it, including the prompt's last token for ``p = P``); with ``latch=True`` when it
  crossed at any position ``P-1 .. p-1`` (once on, it stays on);
- "crossed" is ``value > threshold`` (``above=True``) or ``value < threshold``.

So the first generated token (sampled from position ``P-1``) is never steered: a decision always
uses only positions already computed, which is what makes it exact inside vLLM's continuous
batches (the per-token spec slot is chosen between steps) and identical to a plain-hook reference.

>>> pirate = model.features.search("pirate")[0]                                   # doctest: +SKIP
>>> reply = await model.chat(messages, monitor=[pirate], max_tokens=32)            # doctest: +SKIP
>>> reply.projections.table().head()                                               # doctest: +SKIP
>>> spec = wb.SteeringSpec({9: [wb.AddSpec(v, 8.0)]}, condition=wb.Condition(pirate, threshold=0.5, mode="prompt"))  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import ValidationError

MODES = ("prompt", "token")
MAX_PROBES = 16  # per request (the vLLM backend's board has a column per probe)


@dataclass
class Probe:
    """One number per token: ``(h . unit(vector) - bias) / span`` at ``layer`` (``cosine``: ``h . unit / |h|``).

    >>> p = Probe("pirate", 9, torch.randn(576))
    >>> p.layer, p.vector.norm().item() == 1.0 or abs(p.vector.norm().item() - 1) < 1e-5
    (9, True)
    """

    name: str
    layer: int
    vector: torch.Tensor = field(repr=False)
    bias: float = 0.0
    span: float = 1.0
    cosine: bool = False

    def __post_init__(self):
        from .steering import _as_vector, _finite_number

        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValidationError(f"probe {self.name!r}: layer must be an integer, got {self.layer!r}")
        v = _as_vector(self.vector, f"probe {self.name!r}")
        norm = float(v.norm())
        if norm == 0.0:
            raise ValidationError(f"probe {self.name!r}: the vector is all zeros")
        # already unit (e.g. read back from JSON): kept bit for bit, so fingerprints survive round trips
        self.vector = v if abs(norm - 1.0) < 1e-5 else v / norm
        self.bias = _finite_number(self.bias, f"probe {self.name!r} bias")
        self.span = _finite_number(self.span, f"probe {self.name!r} span")
        if self.span <= 0:
            raise ValidationError(f"probe {self.name!r}: span must be > 0, got {self.span}")
        self.name = str(self.name)
        self.cosine = bool(self.cosine)

    @classmethod
    def of(cls, item, layer: int | None = None, name: str | None = None) -> "Probe":
        """A probe from a ``Probe``, a library ``Feature`` (its read direction, bias and span), or a vector + layer."""
        if isinstance(item, Probe):
            return item
        if hasattr(item, "read_direction") and hasattr(item, "layer"):  # a Feature
            if getattr(item, "kind", "concept") == "sae":
                raise ValidationError(f"feature {item.id!r} is an SAE latent; monitor concept features or vectors "
                                      "(an SAE's activation is not one projection)")
            return cls(name or item.id, int(item.layer), item.read_direction(), float(item.bias), float(item.span))
        if isinstance(item, dict):
            return cls(**item)
        if layer is None:
            raise ValidationError("a probe from a raw vector needs its layer: Probe(name, layer, vector)")
        return cls(name or "vector", int(layer), item)

    def values(self, h: torch.Tensor) -> torch.Tensor:
        """Reference values of rows ``h [..., hidden]`` (what the engines compute in their own way)."""
        h = h.float()
        p = h @ self.vector
        if self.cosine:
            return p / h.norm(dim=-1).clamp(min=1e-12)
        return (p - self.bias) / self.span

    def to_dict(self) -> dict:
        return {"name": self.name, "layer": self.layer, "vector": self.vector.tolist(), "bias": self.bias,
                "span": self.span, "cosine": self.cosine}

    def key(self) -> tuple:
        return (self.name, self.layer, self.bias, self.span, self.cosine, self.vector.numpy().tobytes())

    def __eq__(self, other) -> bool:
        return isinstance(other, Probe) and self.key() == other.key()

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, not hashable


@dataclass
class Condition:
    """When a spec steers: its probe crosses ``threshold`` on the prompt (``mode="prompt"``) or per token.

    See the module docstring for the exact semantics.

    >>> cond = Condition(Probe("x", 3, torch.ones(8)), threshold=0.5, mode="token", latch=True)
    """

    probe: Probe
    threshold: float
    mode: str = "prompt"
    above: bool = True
    latch: bool = False

    def __post_init__(self):
        from .steering import _finite_number

        if not isinstance(self.probe, Probe):
            self.probe = Probe.of(self.probe)
        self.threshold = _finite_number(self.threshold, "condition threshold")
        if self.mode not in MODES:
            raise ValidationError(f"condition mode must be one of {MODES}, got {self.mode!r}")
        self.above, self.latch = bool(self.above), bool(self.latch)

    def crossed(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def to_dict(self) -> dict:
        return {"probe": self.probe.to_dict(), "threshold": self.threshold, "mode": self.mode, "above": self.above,
                "latch": self.latch}

    @classmethod
    def from_dict(cls, data: dict) -> "Condition":
        if not isinstance(data, dict) or "probe" not in data or "threshold" not in data:
            raise ValidationError("a condition dict needs 'probe' and 'threshold'")
        probe = data["probe"]
        return cls(Probe(**probe) if isinstance(probe, dict) else probe, data["threshold"], data.get("mode", "prompt"),
                   data.get("above", True), data.get("latch", False))

    def meta(self) -> dict:
        """JSON-able description without the vector (for fingerprints and file metadata)."""
        d = self.to_dict()
        d["probe"] = {k: v for k, v in d["probe"].items() if k != "vector"}
        return d


class ConditionState:
    """The decisions of one request's condition, fed the probe's values position by position.

    Shared by both backends (the vLLM workers run this very class), so they decide alike.
    """

    def __init__(self, condition: Condition, prompt_len: int):
        self.cond = condition
        self.prompt_len = int(prompt_len)
        self._sum = 0.0
        self._seen_prompt = 0
        self._crossed: dict = {}    # position >= P-1 -> bool
        self._first: int | None = None  # first position >= P-1 that crossed (latch)

    def update(self, start: int, values) -> None:
        """Record the probe's values at positions ``start .. start+len(values)-1``."""
        P = self.prompt_len
        for i, v in enumerate(values.tolist() if hasattr(values, "tolist") else values):
            p = start + i
            if p < P and p >= self._seen_prompt:  # a recomputed prompt position is not counted twice
                self._sum += v
                self._seen_prompt = p + 1
            if p >= P - 1:
                hit = self.cond.crossed(v)
                self._crossed[p] = hit
                if hit and (self._first is None or p < self._first):
                    self._first = p

    def steer_at(self, p: int) -> bool:
        """Whether position ``p`` is steered (False for prompt positions and undecided ones)."""
        P = self.prompt_len
        if p < P:
            return False
        if self.cond.mode == "prompt":
            return self._seen_prompt >= P and self.cond.crossed(self._sum / max(P, 1))
        if self.cond.latch:
            return self._first is not None and self._first <= p - 1
        return bool(self._crossed.get(p - 1, False))


# ------------------------------------------------------------------------------------ results
@dataclass
class ProjectionDelta:
    """Probe values of positions ``start .. start+len(values)-1`` (one piece of a stream)."""

    start: int
    values: torch.Tensor            # [n, probes]
    steered: list | None = None     # per position: was its stream steered (conditional specs)
    tokens: list | None = None      # per position: its token's text (the prompt's, then the reply's fed back)


@dataclass
class Projections:
    """The probes' values over one conversation: prompt positions, then generated tokens fed back.

    >>> reply.projections.table()            # long form: position, token, message, role, probe, value  # doctest: +SKIP
    >>> reply.projections.per_message()      # mean per message and probe                               # doctest: +SKIP
    """

    names: list
    layers: list
    values: torch.Tensor            # [positions, probes]
    token_ids: list                 # the token at each position
    prompt_len: int
    tokens: list = field(default_factory=list)        # token texts
    boundaries: list = field(default_factory=list)    # MessageBoundary list of the prompt (chat)
    steered: list | None = None     # per position, for conditional specs

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __getitem__(self, name: str) -> torch.Tensor:
        """The values of one probe over positions."""
        try:
            return self.values[:, self.names.index(name)]
        except ValueError:
            raise ValidationError(f"no probe named {name!r}; probes: {self.names}") from None

    def message_of(self) -> list:
        """Per position: the index of its message (the reply = one past the last prompt message)."""
        out = []
        bounds = list(self.boundaries)
        for p in range(len(self)):
            if p >= self.prompt_len:
                out.append(len(bounds))
                continue
            idx = 0
            for i, b in enumerate(bounds):
                if b.start_token <= p:
                    idx = i
            out.append(idx)
        return out

    def table(self):
        """Long pandas DataFrame: position, token, message, role, probe, layer, value, steered."""
        import pandas as pd

        messages = self.message_of()
        roles = [b.role for b in self.boundaries] + ["assistant"]
        rows = []
        vals = self.values.tolist()
        for p in range(len(self)):
            for k, name in enumerate(self.names):
                rows.append({"position": p, "token": self.tokens[p] if p < len(self.tokens) else "",
                             "message": messages[p], "role": roles[messages[p]] if messages[p] < len(roles) else "",
                             "generated": p >= self.prompt_len, "probe": name, "layer": self.layers[k],
                             "value": vals[p][k], "steered": bool(self.steered[p]) if self.steered else False})
        return pd.DataFrame(rows)

    def per_message(self):
        """Mean value per message and probe (the reply is the last message)."""
        t = self.table()
        return t.groupby(["message", "role", "probe"], sort=True)["value"].mean().unstack("probe")

    def to_dict(self) -> dict:
        return {"names": list(self.names), "layers": list(self.layers), "values": self.values.tolist(),
                "token_ids": list(self.token_ids), "tokens": list(self.tokens), "prompt_len": self.prompt_len,
                "boundaries": [b.start_token for b in self.boundaries],
                "roles": [b.role for b in self.boundaries], "steered": self.steered}


def probe_list(monitor) -> list:
    """Normalize ``monitor=`` (probes, features, ``(name, layer, vector)`` tuples or dicts) to unique-named probes."""
    if monitor is None:
        return []
    items = [monitor] if isinstance(monitor, (Probe, dict)) or hasattr(monitor, "read_direction") else list(monitor)
    probes = []
    for item in items:
        if isinstance(item, tuple) and len(item) == 3:
            item = Probe(item[0], item[1], item[2])
        probes.append(Probe.of(item))
    if len(probes) > MAX_PROBES:
        raise ValidationError(f"at most {MAX_PROBES} probes per request; got {len(probes)}")
    names = [p.name for p in probes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValidationError(f"monitor probes need distinct names; repeated: {dup}")
    return probes


def probe_tables(probes: list) -> dict:
    """``{layer: (columns, U [k, H], bias [k], span [k], cosine [k])}`` grouped for computing per layer."""
    out: dict = {}
    for col, p in enumerate(probes):
        out.setdefault(p.layer, []).append((col, p))
    tables = {}
    for layer, items in out.items():
        cols = [c for c, _ in items]
        ps = [p for _, p in items]
        tables[layer] = (cols, torch.stack([p.vector for p in ps]), torch.tensor([p.bias for p in ps]),
                         torch.tensor([p.span for p in ps]), torch.tensor([p.cosine for p in ps]))
    return tables


def probe_values(rows: torch.Tensor, table) -> torch.Tensor:
    """Values ``[n, k]`` of one layer's probes on stream rows ``[n, H]`` (float32)."""
    _, U, bias, span, cosine = table
    rows = rows.float()
    p = rows @ U.T.to(rows.device)
    lin = (p - bias.to(rows.device)) / span.to(rows.device)
    if bool(cosine.any()):
        cos = p / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        lin = torch.where(cosine.to(rows.device), cos, lin)
    return lin
