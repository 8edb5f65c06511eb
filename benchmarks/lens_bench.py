"""Logit lens and direction unembedding speed on the default model (hf backend, this machine's CPU).

Goal: the logit lens of all 30 layers x 200 tokens in <= 1 s (one forward capturing every layer,
then one batched readout). Median of ``--repeats`` after a warm-up; the ratio to the goal is printed.

    python benchmarks/lens_bench.py [--tokens 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import workbench as wb

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening, counting the steps and listening to "
        "the sea below. ") * 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model = wb.load("default")
    ids = model.tokenizer(TEXT, add_special_tokens=True)["input_ids"][: args.tokens]
    prompt = model.tokenizer.decode(ids[1:]) if ids[0] == model.tokenizer.bos_token_id else model.tokenizer.decode(ids)
    n = len(model.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    asyncio.run(wb.logit_lens(model, prompt, top_k=5))   # warm-up (and the readout weights, read once)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        lens = asyncio.run(wb.logit_lens(model, prompt, top_k=5))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"logit lens, {len(lens.layers)} layers x {n} tokens, top 5: {med:.3f} s "
          f"(median of {args.repeats}); ratio to the 1 s goal: {med / 1.0:.2f}  (goal <= 1.00)")
    v = model.hidden_size
    f = asyncio.run(model.load_features())["concept/pirate"]
    t = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        wb.direction_tokens(model, f, top_k=20)
        t.append(time.perf_counter() - t0)
    print(f"direction unembedding (vocab x {v}), top 20: {statistics.median(t) * 1000:.1f} ms")
    model.close()


if __name__ == "__main__":
    main()
