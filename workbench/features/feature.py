"""``Feature``: one labelled direction at a layer, with its scale (see featureset.py for activations)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Feature:
    """One labelled feature; ``to_item()`` is its vllm-sdk ``FeatureItem`` form."""

    id: str
    label: str
    layer: int
    index_in_sae: int
    direction: torch.Tensor = field(repr=False)
    scale: float = 1.0
    dimension: int | None = None
    kind: str = "concept"          # concept | sae
    bias: float = 0.0              # concept activation calibration
    span: float = 1.0
    sae: str | None = None         # name of the SAE of an SAE feature
    max_activation: float = 1.0    # SAE features: typical maximum activation
    # Concepts read with a direction of their own, as an SAE reads with W_enc and writes with W_dec:
    # steering adds ``direction`` (difference of means), activations project on ``encoder``.
    encoder: torch.Tensor | None = field(default=None, repr=False)
    method: str = "mean_diff"      # concepts: how the steering direction was fitted (concepts.METHODS)

    def read_direction(self) -> torch.Tensor:
        """The unit direction activations project on: ``encoder`` if the feature has one, else ``direction``."""
        return self.direction if self.encoder is None else self.encoder

    def to_item(self) -> dict:
        return {"id": self.id, "label": self.label, "layer": self.layer, "index_in_sae": self.index_in_sae,
                "dimension": self.dimension}
