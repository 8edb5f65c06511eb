"""Logit lens and direction unembedding speed on the default model (hf backend, this machine's CPU).

Goal: the logit lens of all 30 layers x 200 tokens in <= 1 s (one forward capturing every layer,
then one batched readout). Median of ``--repeats`` after a warm-up; the ratio to the goal is printed
for the default precision ("auto": "fast" on a CPU with bfloat16 hardware, else "exact") and each
precision's time is printed too, with how far "fast" is from "exact" (ids, probabilities).

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
    from workbench.lens import bf16_matmul_is_fast

    lenses, medians = {}, {}
    for precision in ("auto", "fast", "exact"):
        asyncio.run(wb.logit_lens(model, prompt, top_k=5, precision=precision))   # warm-up (and weights)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            lenses[precision] = asyncio.run(wb.logit_lens(model, prompt, top_k=5, precision=precision))
            times.append(time.perf_counter() - t0)
        medians[precision] = statistics.median(times)
    lens, med = lenses["auto"], medians["auto"]
    print(f"logit lens, {len(lens.layers)} layers x {n} tokens, top 5, precision auto "
          f"({'fast' if bf16_matmul_is_fast() else 'exact'} on this CPU): {med:.3f} s (median of {args.repeats}); "
          f"ratio to the 1 s goal: {med / 1.0:.2f}  (goal <= 1.00)")
    fast, exact = lenses["fast"], lenses["exact"]
    same = (fast.top_ids == exact.top_ids).all(-1).float().mean().item()
    diff = (fast.top_probs - exact.top_probs).abs()
    print(f"  fast {medians['fast']:.3f} s, exact {medians['exact']:.3f} s (exact / fast = "
          f"{medians['exact'] / medians['fast']:.2f}); fast vs exact: same top-5 ids and order at {same:.2%} of "
          f"{diff.shape[0] * diff.shape[1]} cells, probabilities differ by <= {diff.max():.1e} "
          f"(mean {diff.mean():.1e}), relative <= {(diff / exact.top_probs).max():.2%}")
    v = model.hidden_size
    f = asyncio.run(model.load_features())["concept/pirate"]
    t = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        wb.direction_tokens(model, f, top_k=20)
        t.append(time.perf_counter() - t0)
    print(f"direction unembedding (vocab x {v}), top 20: {statistics.median(t) * 1000:.1f} ms")
    parts(model, prompt, args.repeats)
    model.close()


def parts(model, prompt, repeats: int) -> None:
    """The readout's parts on the lens's own rows: the matmul alone; the normaliser two ways."""
    import torch

    from workbench.lens import Unembedding

    [acts] = asyncio.run(model.encode([prompt], layers=list(range(model.layer_count))))
    lens = Unembedding.of(model)
    normed = lens.normed(torch.cat([acts[layer].float() for layer in range(model.layer_count)]))
    head_t = lens.head.T

    def timed(fn) -> float:
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for a in range(0, normed.shape[0], 512):
                    fn(normed[a:a + 512] @ head_t)
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    matmul = timed(lambda logits: None)
    lse = timed(lambda logits: torch.logsumexp(logits, -1))
    inplace = timed(lambda logits: logits.sub_(logits.amax(-1, keepdim=True)).clamp_(min=-80.0).exp_().sum(-1))
    print(f"parts, {normed.shape[0]} rows: readout matmul alone {matmul:.3f} s; normaliser torch.logsumexp "
          f"{lse - matmul:.3f} s, in place and clamped (what logit_lens does) {inplace - matmul:.3f} s")


if __name__ == "__main__":
    main()
