"""vLLM-shaped results (``raw_output=True``): ``RequestOutput``, ``CompletionOutput`` and ``Logprob``.

They mirror ``vllm.outputs`` and ``vllm.logprobs`` field for field, so code written against vLLM's
``LLM.generate`` reads them unchanged, on either backend.

>>> out = RequestOutput("0", "Hi", [1, 2], [CompletionOutput(0, " there", [3], None, None, "length")])
>>> out.outputs[0].text, out.finished
(' there', True)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability at one step, its rank (1 = most likely) and its text (``vllm.logprobs.Logprob``)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request (``vllm.outputs.CompletionOutput``).

    ``logprobs`` is, per generated token, ``{token_id: Logprob}`` (the sampled token and the top k)
    when ``SamplingParams.logprobs`` was set, else None; ``cumulative_logprob`` is the sum of the
    sampled tokens' log-probabilities (None without logprobs, as in vLLM).
    """

    index: int
    text: str
    token_ids: list
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # not tracked by the workbench: always None
    projections: object = None  # workbench extension: monitor.Projections when the request was watched

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All samples of one prompt (``vllm.outputs.RequestOutput``); ``prompt`` is None for token-id prompts."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = True
    prompt_logprobs: list | None = None  # prompt logprobs are refused at SamplingParams: always None


class TokenText:
    """Token id -> its text alone (``tokenizer.decode([id])``, as vLLM's logprobs show it), cached."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tok.decode([token_id])
        return text


def logprob_dict(entries, token_text) -> dict:
    """``{token_id: Logprob}`` from ``[(token_id, logprob, rank)]`` (sampled first, then top k, as vLLM orders them)."""
    return {tid: Logprob(lp, rank, token_text(tid)) for tid, lp, rank in entries}
