"""Loading a model's feature set never stalls the event loop: ``await model.load_features()``, the API, the server.

The concept library is replaced by a stand-in whose "training" blocks its thread for a while (as
real training does: CPU work that never yields), so a blocked event loop shows as a gap in a ticker.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

import workbench as wb
from workbench.features import library
from workbench.features.featureset import Feature, FeatureSet

from conftest import serve_in_thread

BLOCK = 1.0   # seconds the stand-in library blocks its thread


@pytest.fixture
def fresh(tiny_dir, monkeypatch):
    """A tiny model of its own (features not loaded) whose library load blocks for ``BLOCK`` s; counts the loads."""
    calls = []

    async def slow_library(model, retrain: bool = False):
        calls.append(time.monotonic())
        time.sleep(BLOCK)
        fs = FeatureSet(name="stand-in")
        fs.add(Feature(id="concept/stand-in", label="stand-in concept", layer=1, index_in_sae=0,
                       direction=torch.nn.functional.normalize(torch.ones(model.hidden_size), dim=0)))
        return fs

    monkeypatch.setattr(library, "concept_library", slow_library)
    model = wb.load(str(tiny_dir))
    model.load_calls = calls
    yield model
    model.close()


async def longest_stall(coro) -> tuple[object, float]:
    """Run ``coro`` while a ticker runs on this loop; return its result and the longest gap between ticks."""
    ticks = [time.monotonic()]

    async def ticker():
        while True:
            await asyncio.sleep(0.01)
            ticks.append(time.monotonic())

    task = asyncio.create_task(ticker())
    try:
        result = await coro
    finally:
        task.cancel()
    ticks.append(time.monotonic())
    return result, max(b - a for a, b in zip(ticks, ticks[1:]))


async def test_property_inside_a_running_loop_raises_a_clear_error(fresh):
    with pytest.raises(wb.ValidationError, match=r"await model\.load_features\(\)"):
        _ = fresh.features
    assert fresh.load_calls == []   # nothing started behind the caller's back


def test_property_without_a_running_loop_loads_here(fresh):
    fs = fresh.features
    assert [f.id for f in fs] == ["concept/stand-in"] and fs.model is fresh
    assert fresh.features is fs and len(fresh.load_calls) == 1


async def test_load_features_runs_off_the_loop_and_is_shared(fresh):
    (a, b), stall = await longest_stall(asyncio.gather(fresh.load_features(), fresh.load_features()))
    assert a is b is fresh.features and len(fresh.load_calls) == 1
    assert stall < BLOCK / 2, f"the event loop stalled {stall:.2f} s"
    t0 = time.monotonic()
    assert await fresh.load_features() is a and time.monotonic() - t0 < 0.05   # loaded: returns at once


async def test_a_caller_that_gives_up_does_not_cancel_the_load(fresh):
    first = asyncio.create_task(fresh.load_features())
    while not fresh.load_calls:
        await asyncio.sleep(0.01)
    first.cancel()
    fs = await fresh.load_features()
    assert first.cancelled() and [f.id for f in fs] == ["concept/stand-in"] and len(fresh.load_calls) == 1


async def test_in_process_request_before_features_load_does_not_block_the_loop(fresh):
    client = wb.AsyncClient(fresh)
    name = (await client.models()).data[0].id
    found, stall = await longest_stall(client.features.search("stand-in", model=name, top_k=1))
    assert [f.id for f in found.data] == ["concept/stand-in"]
    assert stall < BLOCK / 2, f"the event loop stalled {stall:.2f} s"
    info = await client.features.load(model=name)
    assert (info.count, info.layers, info.name) == (1, [1], "stand-in") and len(fresh.load_calls) == 1


def test_http_request_before_features_load_does_not_block_the_server(fresh):
    """A server that does not warm up: while one request waits for the load, /health answers at once."""
    import threading

    from workbench.server import create_app

    for url in serve_in_thread(create_app(fresh, load_features=False)):
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        box = {}
        search = threading.Thread(target=lambda box=box, url=url, name=name: box.setdefault("r", httpx.post(
            f"{url}/v1/features/search", json={"query": "stand-in", "model_name": name, "top_k": 1}, timeout=30)))
        search.start()
        while not fresh.load_calls:
            time.sleep(0.01)
        t0 = time.monotonic()
        health = httpx.get(f"{url}/health", timeout=30)
        waited = time.monotonic() - t0
        search.join()
        assert health.status_code == 200 and waited < BLOCK / 2, f"/health waited {waited:.2f} s"
        assert box["r"].status_code == 200 and box["r"].json()["data"][0]["id"] == "concept/stand-in"
        assert httpx.post(f"{url}/v1/features/load", json={"model": name}).json()["count"] == 1


def test_server_loads_features_before_it_accepts_requests(fresh):
    from workbench.server import create_app

    for _url in serve_in_thread(create_app(fresh)):
        assert len(fresh.load_calls) == 1                 # during start-up, before the first request
        assert [f.id for f in fresh.features] == ["concept/stand-in"] and len(fresh.load_calls) == 1
