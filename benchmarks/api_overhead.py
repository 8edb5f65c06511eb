"""Thin-API overhead: the same 16-token greedy completion through Client(base_url) vs Client(model).

    python benchmarks/api_overhead.py

Prints the ratio of medians (HTTP / in-process; goal <= 1.10) and, for streams, how long after
the engine produced the first token the first chunk reached the HTTP client (report; goal <= 50 ms).
Both clients share one model; the server is a real uvicorn on a loopback port in this process.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time

import uvicorn

import workbench as wb
from workbench.server import create_app

MESSAGES = [{"role": "user", "content": "Name three colours."}]


async def timed(client, n=15):
    times = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Name three colours. ({i})"}]
        t0 = time.perf_counter()
        await client.chat.completions.create(model="default", messages=msgs, max_completion_tokens=16, temperature=0.0)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


async def first_chunk_gap(model, client, n=10):
    """Client-side arrival of the first content chunk minus the moment the server's handler got the first token."""
    from workbench.api.handlers import Service

    produced = []
    original = Service.chat_stream

    async def recording(self, req):
        first = True
        async for chunk in original(self, req):
            if first and chunk.choices[0].delta.content:
                produced.append(time.perf_counter())
                first = False
            yield chunk

    Service.chat_stream = recording
    gaps = []
    try:
        for i in range(n):
            msgs = [{"role": "user", "content": f"Say a word. ({i})"}]
            async for chunk in client.chat.completions.create_stream(model="default", messages=msgs,
                                                                     max_completion_tokens=8, temperature=0.0):
                if chunk.choices[0].delta.content:
                    gaps.append(time.perf_counter() - produced[-1])
                    break
            await asyncio.sleep(0.3)
    finally:
        Service.chat_stream = original
    return statistics.median(gaps)


async def main():
    model = wb.load("default")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    local = wb.AsyncClient(model)
    remote = wb.AsyncClient(base_url=f"http://127.0.0.1:{port}")
    await timed(local, 2), await timed(remote, 2)
    rounds = []
    for r in range(3):  # interleave to cancel drift
        a = await timed(local)
        b = await timed(remote)
        rounds.append(b / a)
        print(f"round {r + 1}: in-process {a * 1000:.0f} ms, HTTP {b * 1000:.0f} ms")
    gap = await first_chunk_gap(model, remote)
    print(f"HTTP / in-process latency, 16-token greedy completion: {statistics.median(rounds):.3f}  (goal <= 1.10)")
    print(f"first stream chunk at the HTTP client after the engine's first token: {gap * 1000:.1f} ms  (goal <= 50 ms)")
    server.should_exit = True
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
