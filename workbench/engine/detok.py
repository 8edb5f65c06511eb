"""Incremental detokenization with stop strings, for streaming.

Decoding the whole output at every token is quadratic; this keeps a small window (the approach
of vLLM and TGI) and holds back text that might still become the start of a stop string, so a
streamed reply never shows a stop string.
"""

from __future__ import annotations


class TextStream:
    """Turn token ids into text deltas; ``text`` is the reply so far (stop string excluded)."""

    def __init__(self, tokenizer, stop: list[str] | None = None, min_tokens: int = 0):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self.text = ""
        self._emitted = 0
        self._stop = list(stop or [])
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.stopped = False
        self._min_tokens = int(min_tokens)  # vLLM looks for stop strings only after min_tokens tokens

    def _decode(self, ids) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that can be shown now (may be empty)."""
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new = self._decode(self._ids[self._prefix_offset:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what was held back (an incomplete character, a possible stop-string start)."""
        if not self.stopped and self._read_offset < len(self._ids):
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            new = self._decode(self._ids[self._prefix_offset:])
            self.text += new[len(prefix):]
            self._read_offset = len(self._ids)
            self._check_stop()
        return self._release(final=True)

    def _check_stop(self) -> None:
        if self._stop and not self.stopped and len(self._ids) > self._min_tokens:
            start = max(0, self._emitted - self._hold - 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True

    def _release(self, final: bool) -> str:
        self._check_stop()
        end = len(self.text) if (final or self.stopped) else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta


def token_step(stream: TextStream, token: int, params, eos_ids, generated: int, total: int,
               max_model_len: int) -> tuple[str, str | None]:
    """Push one generated token: its text delta and the finish reason it causes (None: go on).

    ``generated`` counts the reply's tokens including this one, ``total`` the prompt's too. Shared
    by both backends so "stop" and "length" mean the same on each.
    """
    is_eos = token in eos_ids and not (params.ignore_eos and token not in params.stop_token_ids)
    delta = "" if is_eos else stream.push(token)
    reason = None
    if is_eos or stream.stopped:
        reason = "stop"
    elif generated >= params.max_tokens or total >= max_model_len:
        reason = "length"
    if reason is not None:
        delta += stream.finish()
    return delta, reason
