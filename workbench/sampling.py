"""Sampling parameters shared by both backends, and the per-request sampler of the HF backend.

>>> import workbench as wb
>>> wb.SamplingParams(temperature=0.0, max_tokens=32)
SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=32, seed=None, stop=[], stop_token_ids=[], repetition_penalty=1.0, ignore_eos=False)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from .errors import ValidationError


@dataclass
class SamplingParams:
    """How to pick tokens; the names and meanings of vLLM's ``SamplingParams``.

    ``temperature=0`` is greedy; ``top_k=0`` (or -1) and ``top_p=1`` disable those filters;
    ``seed`` makes sampling reproducible per request, alone or batched.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    seed: int | None = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    repetition_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        def num(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValidationError(f"{name} must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise ValidationError(f"{name}={v!r} is out of range; allowed {'(' if lo_open else '['}{lo}, {hi}]")

        num("temperature", 0.0, 1e4)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("repetition_penalty", 0.0, 1e4, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValidationError(f"top_k={self.top_k!r} is out of range; allowed -1, 0 (off) or a positive integer")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValidationError(f"max_tokens={self.max_tokens!r} is out of range; allowed an integer >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValidationError(f"seed must be an integer or None, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValidationError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_any(cls, params=None, **overrides) -> "SamplingParams":
        """Accept ours, vLLM's ``SamplingParams``, a dict or keyword arguments."""
        if params is None:
            data = {}
        elif isinstance(params, cls):
            data = {f.name: getattr(params, f.name) for f in fields(cls)}
        elif isinstance(params, dict):
            data = dict(params)
        else:  # vLLM's SamplingParams or anything with the same attribute names
            data = {f.name: getattr(params, f.name) for f in fields(cls) if hasattr(params, f.name)}
            if data.get("top_k") == -1:
                data["top_k"] = 0
            if data.get("max_tokens") is None:
                data["max_tokens"] = cls.max_tokens
        data.update(overrides)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValidationError(f"unknown sampling parameter(s) {sorted(unknown)}; allowed: {[f.name for f in fields(cls)]}")
        return cls(**data)


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    """A per-request generator: the request's draws never depend on its batch neighbours."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def sample_token(logits: torch.Tensor, params: SamplingParams, generator, seen_ids: torch.Tensor | None) -> int:
    """Pick one token from a ``[vocab]`` logits row (float32)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        picked = logits[seen_ids]
        logits = logits.clone()
        logits[seen_ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k and params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (cum - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
