"""Labelled features: concept directions, SAEs, search, Variant interventions, inspection.

Names load on first use (PEP 562), so ``from workbench.features.variant import Variant`` (what the
light client needs) does not import torch through the concept and SAE modules.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "RECOMMENDED_STRENGTH": "concepts", "concept_library": "library", "train_concept": "concepts",
    "Feature": "feature", "FeatureSet": "featureset", "SAE": "sae",
    "InterventionSpec": "variant", "Variant": "variant", "compile_interventions": "variant",
    "FeaturePage": "pages", "feature_page": "pages", "render_feature_page": "pages",
}

__all__ = ["Feature", "FeaturePage", "FeatureSet", "InterventionSpec", "RECOMMENDED_STRENGTH", "SAE", "Variant",
           "compile_interventions", "concept_library", "feature_page", "render_feature_page", "train_concept"]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
