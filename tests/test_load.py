"""Isolation under load, short version (the full 2-minute run is `make bench`): 32 concurrent streaming
clients with random interventions on a live `workbench serve` for 30 s; every reply equals its solo
reference, none is lost, and the server's memory does not keep growing."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from load_test import run  # noqa: E402


async def test_32_streaming_clients_for_30_seconds_each_get_exactly_their_own_tokens():
    figures = await run(seconds=30, clients=32, max_tokens=16)
    print(figures)
    assert figures["lost"] == 0, figures["lost_examples"]
    assert figures["wrong"] == 0
    assert figures["correct"] >= 32
    assert figures["server_stats"]["streams_aborted"] == 0
    # A leak grows with the requests served, so it shows in the run's second half. The first half reaches the
    # allocator's high-water mark for full batches and the prefix cache (256 MB at most): 230-260 MB alone here,
    # 364 MB once inside a whole `make test`, which is why a bound on the total alone was flaky. Second half:
    # 0-36 MB measured, against ~180 MB for a leak that would double the total.
    assert figures["rss_growth_second_half_mb"] < 150, figures
    assert figures["rss_growth_mb"] < 600, figures
