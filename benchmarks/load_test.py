"""Isolation under load: many concurrent streaming clients with random interventions on a live server.

    python benchmarks/load_test.py                 # 32 clients for 120 s (the full run; `make bench`)
    python benchmarks/load_test.py --seconds 30    # the short run CI does (tests/test_load.py)

Starts `workbench serve` on a free loopback port, computes each (prompt, variant) pair's solo
greedy reply first, then keeps ``--clients`` streams busy for ``--seconds`` with random pairs. Every
streamed reply must equal its solo reference; none may be lost; the server's resident memory after
the run (and a settle) must come back near its level after warm-up. Prints the figures as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

PROMPTS = ["Give me tourist information about Tokyo.", "Say hello in one sentence.",
           "Name three colours.", "What is a volcano?"]
# (feature index in the concept library, strength); None = unsteered
VARIANTS = [None, [(0, 0.4)], [(0, 0.2)], [(1, 0.4)], [(2, 0.3), (0, 0.2)], [(5, 0.5)]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(prompt: str, variant, max_tokens: int) -> dict:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
            "max_completion_tokens": max_tokens, "stream": True}
    if variant:
        body["interventions"] = [{"index_in_sae": i, "strength": s, "mode": "add"} for i, s in variant]
    return body


async def _stream(client: httpx.AsyncClient, body: dict) -> str:
    text = ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
    return text


async def run(seconds: float, clients: int, max_tokens: int, seed: int = 0) -> dict:
    port = _port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "workbench"), "serve", "--model", "default",
                               "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            for _ in range(600):
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    await asyncio.sleep(0.5)
            proc = psutil.Process(server.pid)
            pairs = [(p, v) for p in range(len(PROMPTS)) for v in range(len(VARIANTS))]
            reference = {}
            for p, v in pairs:                    # solo references, one request at a time
                reference[(p, v)] = await _stream(client, _body(PROMPTS[p], VARIANTS[v], max_tokens))
            rss_warm = proc.memory_info().rss
            rng = random.Random(seed)
            done, wrong, lost = [], [], []
            deadline = time.monotonic() + seconds

            async def worker(k: int):
                while time.monotonic() < deadline:
                    pair = rng.choice(pairs)
                    try:
                        text = await _stream(client, _body(PROMPTS[pair[0]], VARIANTS[pair[1]], max_tokens))
                    except (httpx.HTTPError, ValueError) as exc:
                        lost.append((pair, repr(exc)))
                        continue
                    (done if text == reference[pair] else wrong).append(pair)

            async def midpoint():
                await asyncio.sleep(seconds / 2)
                return proc.memory_info().rss

            t0 = time.monotonic()
            mid = asyncio.ensure_future(midpoint())
            await asyncio.gather(*(worker(k) for k in range(clients)))
            elapsed = time.monotonic() - t0
            rss_mid = await mid
            await asyncio.sleep(3.0)
            rss_after = proc.memory_info().rss
            stats = (await client.get("/v1/stats")).json()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": len(done) + len(wrong) + len(lost),
            "correct": len(done), "wrong": len(wrong), "lost": len(lost), "lost_examples": lost[:3],
            "requests_per_s": round((len(done) + len(wrong)) / elapsed, 2),
            "rss_after_warmup_mb": round(rss_warm / 2**20, 1), "rss_after_run_mb": round(rss_after / 2**20, 1),
            "rss_growth_mb": round((rss_after - rss_warm) / 2**20, 1),
            # a leak grows with the requests served; the allocator's high-water mark for full batches and the
            # prefix cache (256 MB at most) are reached in the first half and then stay
            "rss_growth_second_half_mb": round((rss_after - rss_mid) / 2**20, 1), "server_stats": stats.get("server")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args.seconds, args.clients, args.max_tokens)), indent=1))


if __name__ == "__main__":
    main()
