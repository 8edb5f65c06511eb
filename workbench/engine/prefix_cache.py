"""A prefix cache for the HF backend: reuse the KV of token prefixes seen before.

Entries are keyed by the steering spec's fingerprint, because a prompt's KV computed under one
spec is not the KV under another (the same rule the vLLM backend keeps with ``cache_salt``).
A finished request stores the KV of everything it fed through the model (prompt and generated
tokens but the last), so the next turn of a chat only prefills what is new. Written by hand:
transformers has no prefix cache for its dynamic caches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _Entry:
    fingerprint: str
    tokens: tuple
    kv: list  # per layer (keys, values), each [1, kv_heads, len(tokens), head_dim]
    nbytes: int


class PrefixCache:
    """LRU of (spec fingerprint, token prefix) -> KV, bounded in bytes.

    >>> cache = PrefixCache(max_bytes=64 * 2**20)
    >>> cache.lookup("fp", [1, 2, 3])
    (0, None)
    """

    def __init__(self, max_bytes: int, min_hit: int = 4):
        self.max_bytes = int(max_bytes)
        self.min_hit = int(min_hit)
        self._entries: OrderedDict = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.hit_tokens = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0

    def lookup(self, fingerprint: str, tokens) -> tuple[int, list | None]:
        """Longest cached prefix of ``tokens`` under this fingerprint, leaving at least one token to run."""
        self.lookups += 1
        best, best_n = None, 0
        limit = len(tokens) - 1
        for key, entry in self._entries.items():
            if entry.fingerprint != fingerprint:
                continue
            n = _common_prefix(entry.tokens, tokens, limit)
            if n > best_n:
                best, best_n = key, n
        if best is None or best_n < self.min_hit:
            return 0, None
        self._entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += best_n
        entry = self._entries[best]
        return best_n, [(k[:, :, :best_n], v[:, :, :best_n]) for k, v in entry.kv]

    def store(self, fingerprint: str, tokens, kv: list) -> None:
        if self.max_bytes <= 0 or len(tokens) < self.min_hit:
            return
        tokens = tuple(tokens)
        for key, entry in list(self._entries.items()):
            if entry.fingerprint != fingerprint:
                continue
            n = _common_prefix(entry.tokens, tokens, len(tokens))
            if n == len(tokens):        # already covered by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if n == len(entry.tokens):  # the new entry extends this one
                self._drop(key)
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if nbytes > self.max_bytes:
            return
        key = (fingerprint, tokens)
        self._entries[key] = _Entry(fingerprint, tokens, kv, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes


def _common_prefix(a, b, limit: int) -> int:
    n = min(len(a), len(b), limit)
    if n <= 0:
        return 0
    if a[:n] == tuple(b[:n]):
        return n
    ta, tb = torch.tensor(a[:n]), torch.tensor(list(b[:n]))
    diff = (ta != tb).nonzero()
    return int(diff[0]) if diff.numel() else n
