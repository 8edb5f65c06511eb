"""``workbench smoke``: chatspace's steering smoke check — does a vector at one layer change the reply?

It generates greedily without steering, with a random direction of length ``scale`` added at
``layer`` (global steering, as chatspace's script does), and without steering again, then reports
whether steering changed the text and whether clearing it restored the baseline exactly.

>>> # shell: workbench smoke --layer 6 --scale 60 --max-tokens 32
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._sync import run
from .sampling import SamplingParams

PROMPT = "Question: What is the capital of France? Answer:"


@dataclass
class SmokeResult:
    baseline: str
    steered: str
    restored: str

    @property
    def changed(self) -> bool:
        return self.steered != self.baseline

    @property
    def ok(self) -> bool:
        """Steering changed the reply and clearing it gave the baseline back."""
        return self.changed and self.restored == self.baseline

    def report(self) -> str:
        return "\n".join([
            f"baseline: {self.baseline!r}", f"steered:  {self.steered!r}", f"cleared:  {self.restored!r}",
            f"steering changed the reply: {'yes' if self.changed else 'NO'}; "
            f"clearing restored the baseline: {'yes' if self.restored == self.baseline else 'NO'}",
        ])


async def smoke(model, layer: int, scale: float, max_tokens: int = 32, prompt: str = PROMPT, seed: int = 0) -> SmokeResult:
    """Run the check on a loaded model; the global steering is left empty.

    >>> result = await smoke(wb.load("default"), layer=6, scale=60.0)  # doctest: +SKIP
    >>> result.ok  # doctest: +SKIP
    True
    """
    model.check_layer(layer, "--layer")
    sampling = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    direction = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(seed))
    [baseline] = await model.generate(prompt, sampling)
    await model.set_layer_vector(layer, direction / direction.norm() * float(scale))
    try:
        [steered] = await model.generate(prompt, sampling)
    finally:
        await model.clear_all_vectors()
    [restored] = await model.generate(prompt, sampling)
    return SmokeResult(baseline, steered, restored)


def main(args) -> int:
    """The CLI entry: load, check, print; exit status 0 only when ``SmokeResult.ok``."""
    from .engine import load

    options = {"enforce_eager": True} if args.backend == "vllm" and args.enforce_eager else {}
    model = load(args.model_name, backend=args.backend, **options)
    try:
        result = run(smoke(model, args.layer, args.scale, args.max_tokens, args.prompt, args.seed))
    finally:
        model.close()
    print(f"model: {model.model_name} ({model.backend}, {model.layer_count} layers, hidden {model.hidden_size}); "
          f"layer {args.layer}, |vector| = {args.scale:g}")
    print(result.report())
    return 0 if result.ok else 1
