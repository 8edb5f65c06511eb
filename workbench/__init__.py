"""steering-workbench: steer, capture and plot language-model activations from a notebook.

>>> import workbench as wb
>>> model = wb.load("default")  # doctest: +SKIP

Names load on first use (PEP 562): ``from workbench import AsyncClient, ChatMessage, Variant`` is a
light client (httpx and pydantic, no torch), as vllm-sdk's is; ``wb.load`` and the rest import the
engine when first touched. A new public name goes in ``_LAZY`` (module it lives in) and ``__all__``.
"""

from __future__ import annotations

import importlib

from .errors import (
    APIConnectionError, APIError, APIValidationError, BackendUnavailableError, EmptyInputError, EngineError, LayerOutOfRangeError, ModelNotFoundError,
    NonFiniteActivationError, PromptTooLongError, RequestFailedError, SteeringStackEmptyError, UnknownFeatureError, ValidationError, VectorError, WorkbenchError,
)

# vllm-sdk's top-level schema names, so its users' imports work with the package name changed
_SDK_SCHEMAS = (
    "ChatCompletionChoice", "ChatCompletionChunk", "ChatCompletionChunkChoice", "ChatCompletionDelta", "ChatCompletionMessage",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatCompletionUsage", "ChatMessage", "FeatureItem", "FeatureSearchRequest",
    "FeatureSearchResponse", "InterventionSpec", "ModelName", "RoleLiteral",
)

# public name -> the module defining it, imported when the name is first used
_LAZY = {
    "plots": ".plots",   # a submodule: wb.plots
    "AsyncClient": ".api.client", "Client": ".api.client",
    **{name: ".api.schemas" for name in _SDK_SCHEMAS},
    "CaptureHandle": ".capture",
    "ChatResponse": ".chat", "MessageBoundary": ".chat", "StreamChunk": ".chat",
    "SteerModel": ".engine", "load": ".engine",
    "VLLMSteerModel": ".engine.vllm", "VLLMSteeringConfig": ".engine.vllm",
    "SAE": ".features.sae", "Feature": ".features.featureset", "FeatureSet": ".features.featureset",
    "Variant": ".features.variant",
    "resolve_model": ".models",
    "SamplingParams": ".sampling",
    "strength_sweep": ".sweep",
    **{name: ".monitor" for name in ("Probe", "Condition", "Projections", "ProjectionDelta")},
    **{name: ".lens" for name in ("logit_lens", "direction_tokens", "LogitLens", "DirectionTokens")},
    **{name: ".outputs" for name in ("RequestOutput", "CompletionOutput", "Logprob")},
    **{name: ".evaluation" for name in ("evaluate_steering", "best_steering", "OfflineJudge", "OpenAIJudge")},
    **{name: ".steering" for name in ("AblationSpec", "AddSpec", "LayerSteeringSpec", "ProjectionCapSpec", "SAEClampSpec",
                                       "SteeringSpec")},
}

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError", "APIError", "APIValidationError", "AsyncClient", "Client", "AblationSpec", "AddSpec", "Feature", "FeatureSet", "InterventionSpec", "SAE", "UnknownFeatureError", "Variant", "BackendUnavailableError", "CaptureHandle", "ChatResponse", "EmptyInputError",
    "EngineError", "LayerOutOfRangeError", "LayerSteeringSpec", "MessageBoundary", "ModelNotFoundError", "NonFiniteActivationError",
    "ProjectionCapSpec", "PromptTooLongError", "RequestFailedError", "SAEClampSpec", "SamplingParams", "SteerModel", "SteeringSpec",
    "SteeringStackEmptyError", "StreamChunk", "VLLMSteerModel", "VLLMSteeringConfig", "ValidationError", "VectorError", "WorkbenchError", "load",
    "resolve_model", "strength_sweep", "evaluate_steering", "best_steering", "OfflineJudge", "OpenAIJudge",
    "RequestOutput", "CompletionOutput", "Logprob", "Probe", "Condition", "Projections", "ProjectionDelta",
    "logit_lens", "direction_tokens", "LogitLens", "DirectionTokens",
    *sorted(set(_SDK_SCHEMAS) - {"InterventionSpec"}),
]


def __getattr__(name: str):
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(where, __name__)
    value = module if name == where.rsplit(".", 1)[-1] else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
