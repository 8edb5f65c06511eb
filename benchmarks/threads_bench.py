"""How the kernel's own torch work slows the engine: two OpenMP thread teams on a 2-core machine.

    python benchmarks/threads_bench.py [--tokens 40] [--repeats 10]

The ``hf`` engine runs its forwards on its scheduler thread. torch's CPU build uses GNU OpenMP,
which keeps one thread team per calling thread; once the notebook's main thread has run one
parallel torch op (a plot's norms, the lens readout, a user's ``acts.norm()``), two teams exist,
more threads than cores, and libgomp shortens the spin-wait of every team (its "throttled" spin
count), so each of the forward's many small parallel regions wakes sleeping threads. This script
times an engine forward (``model.encode``, one layer) before and after a single main-thread matmul
and prints the ratio; nothing here can undo it within the process (see RESULTS.md "Threads").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

import workbench as wb


def encode_ms(model, ids, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        asyncio.run(model.encode([ids], layers=[model.layer_count - 1]))
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    model = wb.load("default")
    ids = list(range(100, 100 + args.tokens))
    encode_ms(model, ids, 2)                       # warm-up
    before = encode_ms(model, ids, args.repeats)
    a = torch.randn(1000, 1000)
    a @ a                                          # one parallel op on the main thread: its team starts
    after = encode_ms(model, ids, args.repeats)
    print(f"engine forward, {args.tokens} tokens: {before:.1f} ms before any main-thread torch op, {after:.1f} ms "
          f"after one; after / before = {after / before:.2f} (torch threads: {torch.get_num_threads()})")
    model.close()


if __name__ == "__main__":
    main()
