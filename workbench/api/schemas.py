"""Request and response bodies of the thin API, wire-compatible with the ``vllm-sdk`` 0.2.0 client.

Field names, defaults and bounds follow the vllm-sdk seed; where that client restricts ``model`` to
two Llama names, these schemas take any string (a server answers to its served-model-name aliases).
``/v1/chat/completions`` also takes the OpenAI fields (``max_tokens``, ``top_p``, ``stop``, ``n=1``).
The norms request/response is the workbench's own: what the widgets plot.

>>> ChatCompletionRequest(model="default", messages=[{"role": "user", "content": "Hi"}]).max_completion_tokens
256
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

RoleLiteral = Literal["system", "user", "assistant"]


class _Body(BaseModel):
    # requests from other clients may carry fields we do not use (OpenAI's user, logprobs=False, ...)
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: RoleLiteral
    content: str


class InterventionSpec(_Body):
    index_in_sae: int
    strength: float
    mode: Optional[Literal["add", "clamp"]] = "add"


class ChatCompletionRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    temperature: float = Field(0.6, ge=0.0, le=100.0)
    max_completion_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: Optional[int] = None
    interventions: Optional[list[InterventionSpec]] = None
    stream: bool = False
    # OpenAI-compatible extras
    max_tokens: Optional[int] = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=1)
    # vLLM's OpenAI server extra: continue a final assistant message (a prefill) instead of opening a new one
    continue_final_message: bool = False
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class ChatCompletionMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(_Body):
    index: int
    message: ChatCompletionMessage
    finish_reason: Optional[str] = "stop"
    logprobs: Optional[dict] = None


class ChatCompletionUsage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: ChatCompletionUsage


class ChatCompletionDelta(_Body):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatCompletionChunkChoice(_Body):
    index: int
    delta: ChatCompletionDelta
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Body):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[ChatCompletionUsage] = None


class FeatureItem(_Body):
    id: str
    label: str
    layer: int
    index_in_sae: int
    dimension: Optional[int] = None


class FeatureSearchRequest(_Body):
    query: str
    model_name: str
    top_k: int = Field(10, ge=1, le=100)


class FeatureSearchResponse(_Body):
    object: str = "feature.list"
    data: list[FeatureItem]


class FeatureRerankRequest(_Body):
    query: str
    model_name: str
    features: list[FeatureItem]
    top_k: int = Field(10, ge=1, le=100)


class FeatureRerankResponse(_Body):
    object: str = "feature.rerank"
    data: list[FeatureItem]


class Usage(_Body):
    total_tokens: int


class FeatureInspectionRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    interventions: Optional[list[InterventionSpec]] = None
    aggregation_method: Optional[Literal["mean", "max", "sum", "frequency"]] = "mean"
    top_k: Optional[int] = Field(10, ge=1, le=100)
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class FeatureInspection(_Body):
    feature: FeatureItem
    activation: Union[int, float]


class FeatureInspectionResponse(_Body):
    id: str
    object: Literal["feature.inspect"] = "feature.inspect"
    created: int
    model: str
    features: list[FeatureInspection]
    usage: Usage


class ActivationsRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    interventions: Optional[list[InterventionSpec]] = None
    aggregation_method: Optional[Literal["mean", "max"]] = "mean"
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class ActivationsResponse(_Body):
    id: str
    object: Literal["feature.activations"] = "feature.activations"
    created: int
    model: str
    activations: list[float]
    usage: Usage


class LogitsRequest(_Body):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    interventions: Optional[list[InterventionSpec]] = None
    top_k: Optional[int] = Field(None, ge=1)
    start_idx: Optional[int] = Field(None, ge=0)
    end_idx: Optional[int] = Field(None, ge=1)
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class LogitsResponse(_Body):
    id: str
    object: Literal["feature.logits"] = "feature.logits"
    created: int
    model: str
    logits: dict[str, float]
    usage: Usage


class ContrastRequest(_Body):
    model: str
    dataset_1: list[list[ChatMessage]]
    dataset_2: list[list[ChatMessage]]
    interventions_1: Optional[list[InterventionSpec]] = None
    interventions_2: Optional[list[InterventionSpec]] = None
    k_to_add: Optional[int] = Field(10, ge=1, le=100)
    k_to_remove: Optional[int] = Field(10, ge=1, le=100)


class ContrastResponse(_Body):
    id: str
    object: Literal["feature.contrast"] = "feature.contrast"
    created: int
    model: str
    top_to_add: list[FeatureItem]
    top_to_remove: list[FeatureItem]
    usage: Usage


class NormsRequest(_Body):
    """Per-layer, per-token residual norms of a conversation (the widgets' plots)."""

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    interventions: Optional[list[InterventionSpec]] = None
    layers: Optional[list[int]] = None   # default: every layer
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class TokenActivationsRequest(_Body):
    """Per-token activations of chosen features over a conversation (the token-by-feature heatmap)."""

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    interventions: Optional[list[InterventionSpec]] = None
    features: Optional[list[Union[str, int]]] = Field(None, max_length=256)   # ids or index_in_sae; default all
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None


class TokenActivationsResponse(_Body):
    id: str
    object: Literal["activation.tokens"] = "activation.tokens"
    created: int
    model: str
    tokens: list[str]
    message_idx: list[int]
    features: list[FeatureItem]
    activations: list[list[float]]     # [feature][token]
    usage: Usage

    def to_dataframe(self):
        """Long form: feature_id, label, position, token, message_idx, activation."""
        import pandas as pd

        rows = [(f.id, f.label, t, tok, self.message_idx[t], row[t])
                for f, row in zip(self.features, self.activations) for t, tok in enumerate(self.tokens)]
        return pd.DataFrame(rows, columns=["feature_id", "label", "position", "token", "message_idx", "activation"])


class NormsResponse(_Body):
    """Columns of a long-form table, one entry per (layer, token): compact on the wire, fast to parse."""

    id: str
    object: Literal["activation.norms"] = "activation.norms"
    created: int
    model: str
    layer: list[int]
    position: list[int]
    token: list[str]
    message_idx: list[int]
    role: list[str]
    norm: list[float]
    usage: Usage

    def to_dataframe(self):
        """The table as a pandas DataFrame (long form: layer, position, token, message_idx, role, norm)."""
        import pandas as pd

        return pd.DataFrame({c: getattr(self, c) for c in ("layer", "position", "token", "message_idx", "role", "norm")})


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "steering-workbench"


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]
