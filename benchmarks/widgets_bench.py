"""Widget responsiveness and traffic on the default model (2 cores here).

    python benchmarks/widgets_bench.py

1. Slider change -> first steered token: a chat turn is on screen, the strength slider moves, the
   ChatPanel cancels and regenerates the steered reply; time from the slider's new value to the first
   token appended to the steered view (kernel side; goal: median <= 300 ms), for the ChatPanel alone
   and inside the Workbench (whose steered reply streams with the Monitor's probes). The browser test
   (tests/test_browser.py) measures the same thing on screen into test-artifacts/slider-latency.json,
   which this script prints too when present.
2. Traffic per streamed token: bytes of comm messages the steered view sends per token over a
   400-token reply, first 100 vs last 100 tokens (constant = deltas), against what re-sending the
   whole text on each token (setting a text widget's value) would have cost.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import workbench as wb
from widgets import ChatPanel, SteeringDials, Workbench

ARTIFACT = Path(__file__).resolve().parent.parent / "test-artifacts" / "slider-latency.json"


def _chat_alone(model):
    """The ChatPanel and SteeringDials wired by hand: no monitor on the steered stream."""
    dials = SteeringDials(model)
    chat = ChatPanel(model, max_tokens=48)
    dials.observe(lambda ch: setattr(chat, "variant", ch["new"]), "variant")
    return dials, chat, chat.wait


def _workbench(model):
    """The whole Workbench: the steered reply streams with the monitor's probes, drawn live."""
    bench = Workbench(model)
    bench.chat.max_tokens.value = 48
    return bench.dials, bench.chat, bench.wait


async def slider_latency(model, setup, rounds: int = 10) -> list[float]:
    dials, chat, wait = setup(model)
    dials.add_feature(model.features["concept/pirate"], strength=0.3)
    chat.variant = dials.variant
    chat.send("Give me tourist information about Tokyo.")
    await wait()
    view = chat.steered_view
    marks: list = []
    real_append = view.append

    def append(delta):
        marks.append(time.perf_counter())
        real_append(delta)

    view.append = append
    out = []
    for i in range(rounds):
        marks.clear()
        t0 = time.perf_counter()
        dials.slider("concept/pirate").value = 0.3 + 0.02 * ((i % 5) + 1)
        await wait()
        out.append(marks[0] - t0)
    return out


async def traffic(model) -> dict:
    chat = ChatPanel(model, max_tokens=400)
    sizes, shown = [], []
    real_send = chat.steered_view.send

    def send(content, buffers=None):
        sizes.append(len(json.dumps(content)))
        shown.append(chat.steered_view.value)   # what a whole-text update would have carried
        real_send(content, buffers)

    chat.steered_view.send = send
    chat.send("Write a very long, detailed story about a dragon who learns to cook. Use many chapters.")
    await chat.wait()
    deltas = sizes[1:]
    prefix_cost = sum(len(json.dumps({"value": text})) for text in shown[1:])
    return {"chunks": len(deltas), "finish": chat.timing.get("steered_finish"),
            "first100_bytes_per_chunk": statistics.mean(deltas[:100]), "last100_bytes_per_chunk": statistics.mean(deltas[-100:]),
            "delta_bytes_total": sum(deltas), "whole_text_bytes_total": prefix_cost}


async def main() -> None:
    model = wb.load("default")
    await model.load_features()  # trained once and cached
    for name, setup in (("ChatPanel alone", _chat_alone), ("Workbench, monitor on the steered stream", _workbench)):
        lat = await slider_latency(model, setup)
        print(f"slider -> first steered token (kernel), {name}: median {1000 * statistics.median(lat):.0f} ms "
              f"(min {1000 * min(lat):.0f}, max {1000 * max(lat):.0f}, n={len(lat)}; goal <= 300 ms)")
    if ARTIFACT.exists():
        data = json.loads(ARTIFACT.read_text())
        print(f"slider -> first steered token on screen (browser test): median {data['median_ms']:.0f} ms "
              f"{[round(x) for x in data['slider_to_first_steered_token_ms']]}")
    t = await traffic(model)
    print(f"traffic over a {t['chunks']}-chunk reply (finish: {t['finish']}): {t['first100_bytes_per_chunk']:.1f} B/chunk "
          f"in the first 100, {t['last100_bytes_per_chunk']:.1f} B/chunk in the last 100 "
          f"(ratio {t['last100_bytes_per_chunk'] / t['first100_bytes_per_chunk']:.2f}); total {t['delta_bytes_total']} B "
          f"vs {t['whole_text_bytes_total']} B re-sending the whole text per chunk")
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
