"""The steering engine: ``SteerModel`` and its backends."""

from .base import SteerModel
from .loading import load

__all__ = ["SteerModel", "load"]
