"""The default concept library: the labelled concepts of ``data/concepts.json``, trained once per model, cached.

It sits above both ``concepts`` (training, which builds ``Feature``s) and ``featureset`` (whose
``add_concept`` trains through ``concepts``), so imports run one way: feature <- concepts <- featureset <- library.

>>> fs = await concept_library(model)   # doctest: +SKIP
"""

from __future__ import annotations

from .concepts import cache_dir, candidate_layers, concept_feature, library_data, library_stats
from .featureset import FeatureSet


async def concept_library(model, retrain: bool = False) -> FeatureSet:
    """The default concept library for ``model``: trained on first use (progress bar), then loaded from cache.

    Each concept is contrasted with the neutral sentences and every other concept's examples
    (one against the rest), so what all styled replies share does not end up in every direction.
    """
    path = cache_dir(model)
    if (path / "features.json").is_file() and not retrain:
        return FeatureSet.load(path)
    data = library_data()
    layers = candidate_layers(model)
    sums, counts, norms, owner = await library_stats(model, layers)
    neutral = owner == -1
    fs = FeatureSet(name="concepts")
    for ci, concept in enumerate(data["concepts"]):
        mine = owner == ci
        fs.add(concept_feature(model, concept["label"], f"concept/{concept['id']}", ci, layers, sums[mine], counts[mine],
                               sums[~mine], counts[~mine], sums[neutral], counts[neutral], norms))
    fs.save(path)
    return fs
