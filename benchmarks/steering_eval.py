"""Does steering work, per vector method, at a fixed strength and at the automatically chosen setting?

    python benchmarks/steering_eval.py                  # 6 library concepts (~30 min on 2 idle CPU cores)
    python benchmarks/steering_eval.py --concepts pirate,french --quick
    python benchmarks/steering_eval.py --concepts all    # all 48 library concepts (hours here)

For each concept (its library examples as positives; the neutral sentences and the other
concepts' examples as negatives, pairs formed with the neutral sentences) and each method of
``workbench.features.concepts.METHODS``: ``best_steering`` picks layer and strength on the tuning
prompts, and the setting is scored on the held-out prompts (``wb.evaluate_steering``, offline
judge, greedy, 48 tokens); the auto setting includes the repetition penalty (1.0 or 1.3: steered
text loops). Beside them on the same held-out prompts: difference of means at the README's fixed
setting (its own layer, strength 0.4, no penalty), the best method's layer and strength without and
with ``repetition_penalty=1.3`` (what the penalty alone does), and prompting: the plain model asked
to answer in the concept's style. Prints one row per concept and the means; writes benchmarks/results/steering_eval.csv
and docs/steering_eval.png (the figure notebook 04 shows).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import pandas as pd

CONCEPTS = ["pirate", "french", "shakespeare", "cowboy", "sadness", "robots"]
ROOT = Path(__file__).resolve().parent.parent


def style_prompt(label: str) -> str:
    """The prompting anchor's instruction, from a library label ("Pirate speech: talking like ...")."""
    return f" Answer in this style: {label.split(':')[0].strip().lower()}."


async def main(args):
    import workbench as wb
    from workbench.evaluation import HELDOUT_PROMPTS, TUNING_PROMPTS, Concept, OfflineJudge, best_steering, evaluate_steering
    from workbench.features.concepts import METHODS, library_data

    model = wb.load("default", backend=args.backend)
    fs = await model.load_features()
    data = library_data()
    judge = OfflineJudge()
    tuning = TUNING_PROMPTS[:3] if args.quick else TUNING_PROMPTS
    heldout = HELDOUT_PROMPTS[:3] if args.quick else HELDOUT_PROMPTS
    rows, t0 = [], time.perf_counter()
    ids = [c["id"] for c in data["concepts"]] if args.concepts == "all" else args.concepts.split(",")
    for cid in ids:
        concept = next(c for c in data["concepts"] if c["id"] == cid)
        target = Concept(concept["label"], list(concept["positive"]))
        negative = list(data["neutral"]) + [t for c in data["concepts"] if c["id"] != cid for t in c["positive"]]
        row = {"concept": cid}
        library = fs[f"concept/{cid}"]
        fixed = await evaluate_steering(model, library, heldout, concept=target, layers=[library.layer], strengths=[0.4],
                                        judge=judge)
        row["fixed_mean_diff"] = fixed.hm.mean()
        best_hm, best = -1.0, None
        for method in METHODS:
            f = library if method == "mean_diff" else await fs.add_concept(concept["label"], concept["positive"], negative,
                                                                          method=method)
            layers = sorted({max(0, f.layer - 2), f.layer, min(model.layer_count - 1, f.layer + 2)})
            strengths = [0.3, 0.45, 0.6] if args.quick else [0.2, 0.35, 0.5, 0.65]
            choice = await best_steering(model, f, tuning, layers=layers, strengths=strengths, judge=judge, concept=target,
                                         repetition_penalties=(1.0, 1.3))
            held = await evaluate_steering(model, choice.spec, heldout, concept=target, judge=judge, sampling=choice.sampling)
            row[f"auto_{method}"] = held.hm.mean()
            row[f"auto_{method}_setting"] = f"L{choice.layer}@{choice.strength:g}" + (
                f"+rp{choice.repetition_penalty:g}" if choice.repetition_penalty != 1.0 else "")
            for s in ("concept", "instruction", "fluency"):
                row[f"auto_{method}_{s}"] = held[s].mean()
            if held.hm.mean() > best_hm:
                best_hm, best = held.hm.mean(), (method, choice)
        method, choice = best
        plain = await evaluate_steering(model, choice.spec, heldout, concept=target, judge=judge)
        penalised = await evaluate_steering(model, choice.spec, heldout, concept=target, judge=judge,
                                            sampling=wb.SamplingParams(temperature=0.0, max_tokens=48, repetition_penalty=1.3))
        row["best_method"] = method
        row["best_no_penalty"], row["best_rep_penalty_1.3"] = plain.hm.mean(), penalised.hm.mean()
        prompted = await evaluate_steering(model, None, heldout, concept=target, judge=judge,
                                           prompt_suffix=style_prompt(concept["label"]))
        row["prompting"] = prompted.hm.mean()
        rows.append(row)
        print(f"{cid:12s} fixed {row['fixed_mean_diff']:.3f} | " + " ".join(
            f"{m} {row[f'auto_{m}']:.3f} ({row[f'auto_{m}_setting']})" for m in METHODS) +
            f" | best setting without / with rep. penalty 1.3: {row['best_no_penalty']:.3f} / {row['best_rep_penalty_1.3']:.3f}"
            f" | prompting {row['prompting']:.3f}"
            f"  [{time.perf_counter() - t0:.0f} s]", flush=True)
    df = pd.DataFrame(rows)
    means = df[["fixed_mean_diff", *[f"auto_{m}" for m in METHODS], "best_no_penalty", "best_rep_penalty_1.3",
                "prompting"]].mean()
    best_method = max(METHODS, key=lambda m: means[f"auto_{m}"])
    print("\nmean harmonic score on held-out prompts (0-2):")
    print(means.round(3).to_string())
    print(f"\nbest method at its auto setting: {best_method} {means[f'auto_{best_method}']:.3f}; "
          f"/ difference of means at 0.4 = {means[f'auto_{best_method}'] / max(means['fixed_mean_diff'], 1e-9):.2f}x; "
          f"/ prompting = {means[f'auto_{best_method}'] / max(means['prompting'], 1e-9):.2f}x")
    if not args.quick:
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        df.to_csv(out / "steering_eval.csv", index=False)
        fig = wb.plots.steering_comparison(df)
        wb.plots.export(fig, ROOT / "docs" / "steering_eval.png")
        print(f"wrote {out / 'steering_eval.csv'} and docs/steering_eval.png")
    model.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and strengths; no files written")
    asyncio.run(main(parser.parse_args()))
