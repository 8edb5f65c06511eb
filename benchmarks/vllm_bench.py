"""vLLM backend figures, as ratios measured in one run (absolute times are noisy on shared machines).

1. steered / unsteered throughput: 32 concurrent requests under 4 distinct additive specs on all
   layers, compiled mode, against the same 32 requests unsteered on the same engine (goal >= 0.95);
2. capture overhead: the same unsteered run capturing 1 layer and all layers (goal <= 3% / <= 25%),
   the time to fetch the captures included;
3. vllm / hf backend throughput at batch 64 on the default model (goal >= 2).

Each configuration runs ``--repeats`` times, interleaved (A B C A B C ...), and the median is used.

    python benchmarks/vllm_bench.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

import workbench as wb

TOPICS = ["Tokyo", "the sea", "compilers", "bread", "the moon", "chess", "rain", "music"]


def prompts(n: int) -> list:
    return [[{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]} and a friend number {i}."}]
            for i in range(n)]


def all_layer_specs(model, count: int) -> list:
    g = torch.Generator().manual_seed(0)
    specs = []
    for _ in range(count):
        layers = {}
        for layer in range(model.layer_count):
            v = torch.randn(model.hidden_size, generator=g)
            layers[layer] = wb.LayerSteeringSpec(operations=[wb.AddSpec(v / v.norm(), scale=0.5)])
        specs.append(wb.SteeringSpec(layers=layers))
    return specs


async def timed(model, convs, tokens, steering=None, capture=None) -> tuple[float, int]:
    params = wb.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    if capture is None:
        replies = await model.chat(convs, params, steering=steering)
    else:
        replies, handles = await model.chat(convs, params, steering=steering, capture_layers=capture)
        await model.fetch_captures_batch(handles)
        assert all(h.hidden(capture[0]).shape[0] > 0 for h in handles)
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(r.token_ids) for r in replies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["steering", "capture", "backends"], action="append",
                    help="run only these parts (repeatable; default: all)")
    args = ap.parse_args()
    parts = set(args.only or ["steering", "capture", "backends"])

    model = wb.load("default", backend="vllm", kv_cache_gb=2)
    print(f"vLLM engine (compiled mode) started in {model.load_seconds:.0f} s")
    convs32 = prompts(32)
    specs = all_layer_specs(model, 4)
    steering32 = [specs[i % 4] for i in range(32)]
    asyncio.run(timed(model, convs32[:4], 8))  # warm-up
    asyncio.run(timed(model, convs32[:4], 8, steering=steering32[:4]))

    runs = {"unsteered": []}
    if "steering" in parts:
        runs["steered"] = []
    if "capture" in parts:
        runs.update(capture_1=[], capture_all=[])
    for _ in range(args.repeats):
        for name in runs:
            steering = steering32 if name == "steered" else None
            capture = {"capture_1": [15], "capture_all": list(range(model.layer_count))}.get(name)
            elapsed, n = asyncio.run(timed(model, convs32, args.tokens, steering=steering, capture=capture))
            runs[name].append(n / elapsed)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"32 requests x {args.tokens} tokens, tok/s (median of {args.repeats}): "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    if "steered" in med:
        print(f"steered (4 specs, additive on all {model.layer_count} layers) / unsteered throughput: "
              f"{med['steered'] / med['unsteered']:.3f}  (goal >= 0.95)")
    if "capture_1" in med:
        print(f"capture overhead, 1 layer:  {med['unsteered'] / med['capture_1'] - 1:+.1%}  (goal <= 3%)")
        print(f"capture overhead, all layers: {med['unsteered'] / med['capture_all'] - 1:+.1%}  (goal <= 25%)")
    if "backends" not in parts:
        model.close()
        return

    convs64 = prompts(64)
    hf = wb.load("default", backend="hf")
    asyncio.run(timed(hf, convs64[:4], 8))
    vl, hl = [], []
    for _ in range(args.repeats):
        e, n = asyncio.run(timed(model, convs64, args.tokens))
        vl.append(n / e)
        e, n = asyncio.run(timed(hf, convs64, args.tokens))
        hl.append(n / e)
    v, h = statistics.median(vl), statistics.median(hl)
    print(f"batch 64 x {args.tokens} tokens: vllm {v:.0f} tok/s, hf {h:.0f} tok/s, vllm / hf = {v / h:.2f}  (goal >= 2)")
    model.close()
    hf.close()


if __name__ == "__main__":
    main()
