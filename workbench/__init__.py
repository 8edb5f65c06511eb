"""steering-workbench: steer, capture and plot language-model activations from a notebook.

>>> import workbench as wb
>>> model = wb.load("default")  # doctest: +SKIP
"""

from . import plots  # noqa: F401  (wb.plots)
from .api import AsyncClient, Client
from .capture import CaptureHandle
from .chat import ChatResponse, MessageBoundary, StreamChunk
from .engine import SteerModel, load
from .errors import (
    APIConnectionError, APIError, APIValidationError, BackendUnavailableError, EmptyInputError, EngineError, LayerOutOfRangeError, ModelNotFoundError,
    NonFiniteActivationError, PromptTooLongError, RequestFailedError, SteeringStackEmptyError, UnknownFeatureError, ValidationError, VectorError, WorkbenchError,
)
from .features import SAE, Feature, FeatureSet, InterventionSpec, Variant
from .models import resolve_model
from .sampling import SamplingParams
from .sweep import strength_sweep
from .steering import AblationSpec, AddSpec, LayerSteeringSpec, ProjectionCapSpec, SAEClampSpec, SteeringSpec

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIError", "APIValidationError", "AsyncClient", "Client", "AblationSpec", "AddSpec", "Feature", "FeatureSet", "InterventionSpec", "SAE", "UnknownFeatureError", "Variant", "BackendUnavailableError", "CaptureHandle", "ChatResponse", "EmptyInputError",
    "EngineError", "LayerOutOfRangeError", "LayerSteeringSpec", "MessageBoundary", "ModelNotFoundError", "NonFiniteActivationError",
    "ProjectionCapSpec", "PromptTooLongError", "RequestFailedError", "SAEClampSpec", "SamplingParams", "SteerModel", "SteeringSpec",
    "SteeringStackEmptyError", "StreamChunk", "ValidationError", "VectorError", "WorkbenchError", "load",
    "resolve_model", "strength_sweep",
]
