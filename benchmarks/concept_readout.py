"""How well library concepts read held-out text: the difference of means against Fisher's discriminant.

    python benchmarks/concept_readout.py

Eight folds: fold k holds out the k-th example of every library concept (and every eighth neutral
sentence), trains all concepts on the rest exactly as the library does, and ranks the concepts
by their mean activation over each held-out example's tokens (what ``inspect`` does). Printed:
the share of held-out examples whose own concept comes first / in the top 5, for the difference
of means as read direction (``shrinkage=None``, the steering direction) and for the discriminant
at several shrinkages (the library uses ``READ_SHRINKAGE``). Uses the cached library statistics
(about 20 s to encode the library the first time).
"""

from __future__ import annotations

import asyncio

import torch


async def main():
    import workbench as wb
    from workbench.features import FeatureSet
    from workbench.features import concepts as C

    model = wb.load("default")
    layers = C.candidate_layers(model)
    sums, counts, norms, owner = await C.library_stats(model, layers)
    n_concepts = int(owner.max()) + 1
    means = sums / counts[:, None, None]
    folds = 8
    held_fold = torch.full_like(owner, -1)
    for c in range(-1, n_concepts):
        idx = (owner == c).nonzero().flatten()
        held_fold[idx] = torch.arange(len(idx)) % folds
    print(f"{n_concepts} concepts, {int((owner == -1).sum())} neutral sentences, layers {layers}, {folds} folds")
    for shrinkage in (None, 0.01, 0.1, C.READ_SHRINKAGE, 0.6, 0.9):
        top1 = top5 = total = 0
        for k in range(folds):
            train = held_fold != k
            neutral = (owner == -1) & train
            feats = []
            for c in range(n_concepts):
                mine, rest = (owner == c) & train, (owner != c) & train
                feats.append(C.concept_feature(model, "", f"c{c}", c, layers, sums[mine], counts[mine], sums[rest], counts[rest],
                                               sums[neutral], counts[neutral], norms, shrinkage=shrinkage))
            held = ((~train) & (owner >= 0)).nonzero().flatten()
            # activations are linear in h: the mean over a text's tokens is the activation of its mean residual
            acts = FeatureSet(feats).activations_from_hidden({l: means[held, j] for j, l in enumerate(layers)})
            ranked = torch.argsort(acts, dim=1, descending=True)
            truth = owner[held]
            total += len(held)
            top1 += int((ranked[:, 0] == truth).sum())
            top5 += int((ranked[:, :5] == truth[:, None]).any(1).sum())
        name = "difference of means" if shrinkage is None else f"discriminant, shrinkage {shrinkage:<4}"
        mark = "  <- the library" if shrinkage == C.READ_SHRINKAGE else ""
        print(f"{name:32s} held-out top-1 {top1 / total:5.1%}  top-5 {top5 / total:5.1%}  ({total} examples){mark}",
              flush=True)
    model.close()


if __name__ == "__main__":
    asyncio.run(main())
