"""Sampling parameters shared by both backends, and the per-request sampler of the HF backend.

>>> import workbench as wb
>>> wb.SamplingParams(temperature=0.0, max_tokens=32)
SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=32, min_tokens=0, seed=None, stop=[], stop_token_ids=[], repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, ignore_eos=False, logprobs=None)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import torch

from .errors import ValidationError

# vLLM SamplingParams fields that only shape how a result is delivered, never which tokens come out
# or what they mean: accepted at any value (the workbench always returns token ids, text decoded
# with special tokens skipped, and whole results or its own stream deltas).
_VLLM_FORMAT_ONLY = frozenset({
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens",  # text is always decoded the same way
    "output_kind", "stream_interval",  # how vLLM batches streamed outputs; results here are whole
    "flat_logprobs",  # the same logprobs in a flatter container
    "extra_args",  # for custom samplers and plugins; no in-tree vLLM sampler reads it
    "skip_clone",  # an internal copy optimisation
    "skip_reading_prefix_cache",  # a cache policy: the same tokens either way
    "routed_experts_prompt_start",  # only about MoE routing reports, which the workbench never returns
})
# set by vLLM itself from other fields (or by its engine): checked through the fields they come from
_VLLM_DERIVED = frozenset({"output_text_buffer_length"})


@dataclass
class SamplingParams:
    """How to pick tokens; the names, defaults and meanings of vLLM's ``SamplingParams``.

    ``temperature=0`` is greedy; ``top_k=0`` (or -1), ``top_p=1`` and ``min_p=0`` disable those
    filters; ``seed`` makes sampling reproducible per request, alone or batched. Penalties follow
    vLLM: ``repetition_penalty`` over prompt and generated tokens, ``presence_penalty`` and
    ``frequency_penalty`` (OpenAI's) over generated tokens only; they apply to greedy decoding too.
    ``min_tokens`` keeps EOS and ``stop_token_ids`` from being sampled before that many tokens.
    ``logprobs=k`` reports, per generated token, the log-probability of the sampled token and of the
    k most likely ones (``-1``: all), from the model's raw logits (before temperature and penalties).
    ``n`` samples per prompt (sample ``i`` uses ``seed + i`` when a seed is given).

    >>> SamplingParams(temperature=0.8, min_p=0.05, presence_penalty=0.5, logprobs=5, n=2, seed=1).n
    2
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16
    min_tokens: int = 0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stop_token_ids: list = field(default_factory=list)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "SamplingParams":
        def num(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValidationError(f"{name} must be a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise ValidationError(f"{name}={v!r} is out of range; allowed {'(' if lo_open else '['}{lo}, {hi}]")

        def integer(name, lo, what):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValidationError(f"{name}={v!r} is out of range; allowed {what}")

        num("temperature", 0.0, 1e4)
        num("top_p", 0.0, 1.0, lo_open=True)
        num("min_p", 0.0, 1.0)
        num("repetition_penalty", 0.0, 1e4, lo_open=True)
        num("presence_penalty", -2.0, 2.0)  # vLLM's and OpenAI's range
        num("frequency_penalty", -2.0, 2.0)
        integer("top_k", -1, "-1, 0 (off) or a positive integer")
        integer("max_tokens", 1, "an integer >= 1")
        integer("min_tokens", 0, "an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValidationError(f"min_tokens={self.min_tokens} is over max_tokens={self.max_tokens}; "
                                  f"allowed 0..max_tokens")
        integer("n", 1, "an integer >= 1")
        if self.logprobs is True:  # vLLM reads logprobs=True as 1
            self.logprobs = 1
        if self.logprobs is not None:
            integer("logprobs", -1, "None, -1 (the whole vocabulary) or an integer >= 0")
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

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (then greedy decoding needs the sampler too)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def for_sample(self, i: int) -> "SamplingParams":
        """The params of sample ``i`` of ``n``: one sample, seed ``seed + i`` (reproducible, distinct)."""
        return replace(self, n=1, seed=None if self.seed is None else self.seed + i)

    @classmethod
    def from_any(cls, params=None, **overrides) -> "SamplingParams":
        """Accept ours, vLLM's ``SamplingParams``, a dict or keyword arguments.

        A vLLM ``SamplingParams`` field the workbench cannot honour, set to anything but vLLM's
        default, raises ``ValidationError`` naming it (never silently dropped).

        >>> SamplingParams.from_any({"max_tokens": 5}, temperature=0).max_tokens
        5
        """
        if params is None:
            data = {}
        elif isinstance(params, cls):
            data = {f.name: getattr(params, f.name) for f in fields(cls)}
        elif isinstance(params, dict):
            data = dict(params)
        elif hasattr(type(params), "__struct_fields__"):  # vLLM's SamplingParams (a msgspec struct)
            data = _from_vllm(cls, params)
        else:  # anything with the same attribute names
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


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:  # arrays and other values without a plain truth value: treat as set
        return a is b


def _from_vllm(cls, params) -> dict:
    """Our fields from a vLLM ``SamplingParams``; any other field away from its default is refused."""
    default = type(params)()  # vLLM's defaults, normalised by its __post_init__ as ``params`` was
    ours = {f.name for f in fields(cls)}
    for name in type(params).__struct_fields__:
        if name in ours or name in _VLLM_FORMAT_ONLY or name in _VLLM_DERIVED or name.startswith("_"):
            continue  # private fields are vLLM's bookkeeping, derived from public ones
        value = getattr(params, name, None)
        if name == "watermarking" and value is False:
            continue  # "do not watermark": the workbench never does
        if not _same(value, getattr(default, name, None)):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            raise ValidationError(
                f"vLLM SamplingParams.{name}={shown} is not supported by the workbench (it changes what is generated "
                f"or returned); leave {name} at vLLM's default ({getattr(default, name, None)!r})")
    data = {name: getattr(params, name) for name in ours if hasattr(params, name)}
    if data.get("top_k") == -1:
        data["top_k"] = 0
    if data.get("max_tokens") is None:  # vLLM: "until the context is full"; ours needs a number
        data["max_tokens"] = cls.max_tokens
    return data


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


def sample_token(logits: torch.Tensor, params: SamplingParams, generator, seen_ids: torch.Tensor | None,
                 output_ids: torch.Tensor | None = None, stop_ids=()) -> int:
    """Pick one token from a ``[vocab]`` logits row (float32), in vLLM's order of processing.

    ``seen_ids`` are the prompt and generated tokens (repetition penalty), ``output_ids`` the
    generated ones (presence/frequency penalties, min_tokens), ``stop_ids`` the EOS and stop token
    ids that ``min_tokens`` holds back.
    """
    logits = logits.float().clone()
    generated = 0 if output_ids is None else int(output_ids.numel())
    if params.min_tokens and generated < params.min_tokens and len(stop_ids):
        logits[torch.as_tensor(list(stop_ids), device=logits.device)] = float("-inf")
    if params.repetition_penalty != 1.0 and seen_ids is not None and seen_ids.numel():
        picked = logits[seen_ids]
        logits[seen_ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids is not None and generated:
        counts = torch.bincount(output_ids, minlength=logits.numel())[: logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
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


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> list:
    """vLLM's sample logprobs of one step: ``[(token_id, logprob, rank)]``, the sampled token first, then the top ``k``.

    Log-probabilities are ``log_softmax`` of the raw logits; a rank counts the tokens at least as
    likely (1 = the most likely). ``k=-1`` lists the whole vocabulary.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    own = lp[token]
    out = [(int(token), float(own), int((lp >= own).sum()))]
    k = lp.numel() if k == -1 else min(int(k), lp.numel())
    if k > 0:
        values, ids = torch.topk(lp, k)
        out += [(int(t), float(v), r + 1) for r, (t, v) in enumerate(zip(ids.tolist(), values.tolist()))]
    return out
