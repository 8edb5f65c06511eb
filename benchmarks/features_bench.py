"""Feature figures: concept-library training time, cached load, inspect latency, search latency.

    python benchmarks/features_bench.py

- library training from scratch (a fresh cache folder) on the default model; goal < 60 s
- loading the trained library from its cache; goal < 1 s
- inspect / activations on a ~200-token conversation: one forward pass, median latency
- search over 65,536 labels: median per-query latency after the labels are embedded; goal <= 20 ms
  (the 65,536 label embeddings are random unit vectors: embedding 65k real labels takes about a
  minute on 2 cores and does not change the per-query cost)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

import torch


async def main():
    import workbench as wb
    from workbench.features.library import concept_library
    from workbench.features.search import LabelIndex, embed, embedder

    model = wb.load("default")
    home = os.environ.get("WORKBENCH_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["WORKBENCH_HOME"] = tmp          # a fresh cache: train from scratch
        model.__dict__.pop("_neutral_stats", None)
        t0 = time.perf_counter()
        fs = await concept_library(model)
        train = time.perf_counter() - t0
        t0 = time.perf_counter()
        await concept_library(model)
        cached = time.perf_counter() - t0
    if home is None:
        os.environ.pop("WORKBENCH_HOME")
    else:
        os.environ["WORKBENCH_HOME"] = home
    fs.model = model
    model.features = fs
    text = ("Tokyo is a vast city with many neighbourhoods, each with its own character. " * 12).strip()
    conv = [{"role": "user", "content": "Tell me about Tokyo."}, {"role": "assistant", "content": text}]
    await fs.inspect(conv, top_k=5)
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        await fs.inspect(conv, top_k=5)
        times.append(time.perf_counter() - t0)
    inspect_ms = statistics.median(times) * 1000
    n_tokens = len(model.tokenizer(model.tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"])

    embedder()
    ix = LabelIndex(["placeholder"], semantic=True)
    ix.labels = [f"label {i}" for i in range(65536)]
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(65536, 384, generator=g)
    ix._emb = emb / emb.norm(dim=-1, keepdim=True)
    embed(["warm-up"])
    qt, et = [], []
    for i in range(20):  # distinct queries: nothing is cached between them
        q = f"{['roleplay as pirate', 'speak French', 'funny jokes', 'sadness', 'ocean waves'][i % 5]} {i}"
        t0 = time.perf_counter()
        ix.search(q, 10)
        qt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        embed([q])
        et.append(time.perf_counter() - t0)
    search_ms = statistics.median(qt) * 1000
    embed_ms = statistics.median(et) * 1000

    print(f"concept library: {len(fs)} concepts at layers {sorted({f.layer for f in fs})}")
    print(f"library training from scratch:        {train:6.1f} s   (goal < 60 s)")
    print(f"library load from cache:              {cached:6.3f} s   (goal < 1 s)")
    print(f"inspect on a {n_tokens}-token conversation: {inspect_ms:6.0f} ms  (median of 9, one forward pass)")
    print(f"search over 65,536 labels, per query: {search_ms:6.1f} ms  (goal <= 20 ms after embedding: "
          f"ranking {search_ms - embed_ms:.1f} ms + embedding the query {embed_ms:.1f} ms)")
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
