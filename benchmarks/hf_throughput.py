"""HF backend throughput and latency, printed as ratios measured in one run.

    python benchmarks/hf_throughput.py [--batch 16] [--tokens 128] [--reps 3]

- steered / unsteered: additive steering on every layer vs none, batch of concurrent requests
- engine / transformers.generate: same model, same prompts, greedy, same number of new tokens
- first streamed token of a new short chat: median over repetitions, warm and cold prefix cache
Runs are interleaved (A B C, B C A, ...) and ratios are medians of per-round ratios, because
absolute times on a shared 2-core machine drift.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

import workbench as wb

PROMPTS = [
    "Tell me about Tokyo.", "Write a short poem about the sea.", "Explain how rain forms.", "What is a prime number?",
    "Describe a cat to someone who has never seen one.", "Give me three tips for studying.", "Why is the sky blue?",
    "Summarize the plot of a detective story.", "How do airplanes fly?", "What makes bread rise?",
    "Tell me a fun fact about octopuses.", "How do I boil an egg?", "What is the capital of Italy?",
    "Explain photosynthesis simply.", "Write a haiku about autumn.", "What is machine learning?",
]


def chat_prompts(model, n):
    msgs = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(n)]
    return [model.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in msgs]


async def engine_run(model, prompts, tokens, spec):
    params = wb.SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    # concurrent independent requests, as side-by-side streams or many users would send them
    outs = await asyncio.gather(*(model.generate([p], params, steering=spec) for p in prompts))
    dt = time.perf_counter() - t0
    assert len(outs) == len(prompts)
    return len(prompts) * tokens / dt


def hf_generate_run(model, prompts, tokens):
    tok = model.tokenizer
    tok.padding_side = "left"
    enc = tok([p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.hf_model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id)
    dt = time.perf_counter() - t0
    assert out.shape[1] - enc["input_ids"].shape[1] == tokens
    return len(prompts) * tokens / dt


QUESTIONS = ["Tell me a joke.", "What is tea?", "Name a color.", "Say hello.", "Why do cats purr?", "What is rain?",
             "Give me a word.", "Who was Newton?", "What is two plus two?", "Name a fruit.", "Describe snow.",
             "What is a bird?", "Say something nice.", "What is music?", "Name a planet.", "What is sand?"]


async def first_token_latency(model, reps, cold):
    """Time to the first streamed text of a new short chat (a different question each time).

    cold: the prefix cache is emptied first; warm: only what every chat shares (the template's
    default system prompt) can come from it, as in a real session.
    """
    params = wb.SamplingParams(temperature=0.0, max_tokens=4)
    times = []
    saved = model.prefix_cache
    if cold:
        model.prefix_cache = None  # off for the whole measurement (clearing between chats races with storing)
    for i in range(reps):
        chat = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
        t0, first = time.perf_counter(), None
        async for chunk in model.stream_chat(chat, params):   # read to the end, as a chat panel does
            if chunk.text and first is None:
                first = time.perf_counter() - t0
        times.append(first)
    model.prefix_cache = saved
    return statistics.median(times) * 1000


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--latency-reps", type=int, default=15)
    ap.add_argument("--latency-only", action="store_true", help="skip the throughput rounds")
    args = ap.parse_args()
    model = wb.load("default")
    prompts = chat_prompts(model, args.batch)
    g = torch.Generator().manual_seed(0)
    # a modest additive vector on every layer: the cost being measured is the per-layer op
    spec = wb.SteeringSpec(layers={L: [wb.AddSpec(torch.randn(model.hidden_size, generator=g), 0.5)]
                                   for L in range(model.layer_count)})
    await engine_run(model, prompts[:2], 4, None)  # warm-up
    hf_generate_run(model, prompts[:2], 4)
    steer_ratios, hf_ratios = [], []
    for r in range(0 if args.latency_only else args.reps):
        # rotate the order each round so drift does not favour one variant
        order = ["plain", "steered", "reference"]
        order = order[r % 3:] + order[: r % 3]
        got = {}
        for name in order:
            if name == "reference":
                got[name] = hf_generate_run(model, prompts, args.tokens)
            else:
                got[name] = await engine_run(model, prompts, args.tokens, spec if name == "steered" else wb.SteeringSpec())
        steer_ratios.append(got["steered"] / got["plain"])
        hf_ratios.append(got["plain"] / got["reference"])
        print(f"round {r + 1}: engine {got['plain']:6.1f} tok/s | steered {got['steered']:6.1f} tok/s | "
              f"transformers.generate {got['reference']:6.1f} tok/s", flush=True)
    cold = await first_token_latency(model, args.latency_reps, cold=True)
    await first_token_latency(model, 1, cold=False)  # a first chat fills the cache with the shared prefix
    warm = await first_token_latency(model, args.latency_reps, cold=False)
    print()
    print(f"batch {args.batch}, {args.tokens} new tokens, float32, {torch.get_num_threads()} threads, {model.model_name}")
    if steer_ratios:
        print(f"steered (add on all {model.layer_count} layers) / unsteered throughput: {statistics.median(steer_ratios):.3f}  (target >= 0.95)")
        print(f"engine / transformers.generate throughput:            {statistics.median(hf_ratios):.3f}  (target >= 1.0)")
    print(f"first streamed token, new short chat, median of {args.latency_reps}: {warm:.0f} ms  (goal <= 300 ms; "
          f"shared system-prompt prefix from the prefix cache)")
    print(f"  same, prefix cache off:                              {cold:.0f} ms")
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
