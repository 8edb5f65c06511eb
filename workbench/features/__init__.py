"""Labelled features: concept directions, SAEs, search, Variant interventions, inspection."""

from .concepts import RECOMMENDED_STRENGTH, concept_library, train_concept
from .featureset import Feature, FeatureSet
from .sae import SAE
from .variant import InterventionSpec, Variant, compile_interventions

__all__ = ["Feature", "FeatureSet", "InterventionSpec", "RECOMMENDED_STRENGTH", "SAE", "Variant",
           "compile_interventions", "concept_library", "train_concept"]
