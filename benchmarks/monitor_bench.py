"""Monitoring cost on the vLLM backend, as throughput ratios measured in one run.

1. monitored / unmonitored throughput: 32 concurrent requests x ``--tokens`` tokens, each watching
   4 library features at 2 layers (8 probe values per position), against the same requests
   unwatched on the same engine (goal: monitoring costs <= 3 % of throughput);
2. conditional / plain steering: the same requests under 4 additive specs, with a per-token
   condition (``mode="token"``) on each, against the same specs unconditioned (for information: a
   conditional spec steers fewer positions, and its requests are measured like monitored ones).

Configurations run ``--repeats`` times interleaved (A B C A B C ...); the median is used.

    python benchmarks/monitor_bench.py [--tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

import workbench as wb
from workbench.monitor import Condition, Probe

TOPICS = ["Tokyo", "the sea", "compilers", "bread", "the moon", "chess", "rain", "music"]


def prompts(n: int) -> list:
    return [[{"role": "user", "content": f"Write a long story about {TOPICS[i % 8]} and a friend number {i}."}]
            for i in range(n)]


def probes(model) -> list:
    """4 library features, each read at its own layer and 6 layers later: 8 probes on 2 layers per feature."""
    asyncio.run(model.load_features())
    feats = [f for f in model.features if getattr(f, "kind", "concept") != "sae"][:4]
    out = []
    for f in feats:
        p = Probe.of(f)
        out += [p, Probe(f"{f.id}@{min(f.layer + 6, model.layer_count - 1)}", min(f.layer + 6, model.layer_count - 1),
                         p.vector, p.bias, p.span)]
    return out


def specs(model, count: int) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        v = torch.randn(model.hidden_size, generator=g)
        out.append(wb.SteeringSpec({12: [wb.AddSpec(v / v.norm() * 4.0)]}))
    return out


async def timed(model, convs, tokens, steering=None, monitor=None) -> tuple[float, int]:
    params = wb.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    replies = await model.chat(convs, params, steering=steering, monitor=monitor)
    elapsed = time.perf_counter() - t0
    if monitor:
        assert all(r.projections is not None and len(r.projections) > 0 for r in replies)
    return elapsed, sum(len(r.token_ids) for r in replies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = wb.load("default", backend="vllm", kv_cache_gb=2)
    print(f"vLLM engine (compiled mode) started in {model.load_seconds:.0f} s")
    watch = probes(model)
    print(f"monitoring {len(watch)} probes: " + ", ".join(f"{p.name}@L{p.layer}" for p in watch))
    convs = prompts(32)
    plain = [specs(model, 4)[i % 4] for i in range(32)]
    cond_probe = watch[0]
    conditional = [wb.SteeringSpec(s.layers, condition=Condition(cond_probe, 0.0, mode="token")) for s in plain]
    asyncio.run(timed(model, convs[:4], 8))   # warm-up
    asyncio.run(timed(model, convs[:4], 8, monitor=watch))
    asyncio.run(timed(model, convs[:4], 8, steering=conditional[:4]))

    runs = {"plain": dict(), "monitored": dict(monitor=watch), "steered": dict(steering=plain),
            "conditional": dict(steering=conditional)}
    rates = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, kw in runs.items():
            elapsed, n = asyncio.run(timed(model, convs, args.tokens, **kw))
            rates[name].append(n / elapsed)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"32 requests x {args.tokens} tokens, tok/s (median of {args.repeats}): "
          + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
    print(f"monitoring cost (4 features x 2 layers): {1 - med['monitored'] / med['plain']:+.1%} of throughput  "
          f"(goal <= 3%)")
    print(f"conditional / plain steering throughput: {med['conditional'] / med['steered']:.3f}")
    model.close()


if __name__ == "__main__":
    main()
