"""Request and response bodies of the thin API, wire-compatible with the ``vllm-sdk`` 0.2.0 client.

Field names, defaults and bounds follow the vllm-sdk seed; where that client restricts ``model`` to
two Llama names, these schemas take any string (a server answers to its served-model-name aliases).
``/v1/chat/completions`` also takes the OpenAI fields (``max_tokens``, ``top_p``, ``stop``, ``n``,
``presence_penalty``, ``frequency_penalty``, ``logprobs``, ``top_logprobs``) and vLLM's server extras
(``top_k``, ``min_p``, ``min_tokens``, ``continue_final_message``).
The norms request/response is the workbench's own: what the widgets plot.

>>> ChatCompletionRequest(model="default", messages=[{"role": "user", "content": "Hi"}]).max_completion_tokens
256
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from ..errors import ValidationError as _WorkbenchValidationError

RoleLiteral = Literal["system", "user", "assistant"]


class _Body(BaseModel):
    # requests from other clients may carry fields we do not use (OpenAI's user, logprobs=False, ...)
    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Body):
    role: RoleLiteral
    content: str


MODES = ("add", "clamp")
_IV_FIELDS = ("index_in_sae", "strength", "mode", "feature_id")


class ModelName(str, Enum):
    """The model names vllm-sdk knows; a workbench server answers to any of its served names.

    >>> str(ModelName.META_LLAMA_3_1_8B_INSTRUCT)
    'meta-llama/Llama-3.1-8B-Instruct'
    """

    META_LLAMA_3_1_8B_INSTRUCT = "meta-llama/Llama-3.1-8B-Instruct"
    META_LLAMA_3_3_70B_INSTRUCT = "meta-llama/Llama-3.3-70B-Instruct"

    def __str__(self) -> str:  # Variant(ModelName.X) and f-strings want the name, not "ModelName.X"
        return self.value


class InterventionSpec(_Body):
    """One feature intervention: a feature (``index_in_sae``, or ``feature_id`` when given), a strength, a mode.

    The one class for request bodies and ``Variant``s. It takes arguments by position (as vllm-sdk's
    Variant helper does) or by name (as its schema does); bad values raise ``wb.ValidationError``.
    ``feature_id`` is a workbench extension, left out of the body when None so vllm-sdk servers see
    their own schema.

    >>> InterventionSpec(3, 0.5).model_dump()
    {'index_in_sae': 3, 'strength': 0.5, 'mode': 'add'}
    """

    index_in_sae: int
    strength: float
    mode: Optional[Literal["add", "clamp"]] = "add"
    feature_id: Optional[str] = None

    def __init__(self, *args, **data):
        if len(args) > len(_IV_FIELDS):
            raise TypeError(f"InterventionSpec takes at most {len(_IV_FIELDS)} positional arguments, got {len(args)}")
        for name, value in zip(_IV_FIELDS, args):
            if name in data:
                raise TypeError(f"InterventionSpec got two values for {name!r}")
            data[name] = value
        try:
            super().__init__(**data)
        except pydantic.ValidationError as exc:
            # built in Python (a Variant, a notebook): the workbench's error, as the rest of the API raises
            raise _WorkbenchValidationError(_error_text(exc)) from exc

    @field_validator("index_in_sae", mode="before")
    @classmethod
    def _integer(cls, v):
        # bools are ints to Python, and a float or a string would quietly pick some feature
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise ValueError(f"index_in_sae must be an integer, got {v!r}")
        return v.__index__()

    @field_validator("strength", mode="before")
    @classmethod
    def _finite(cls, v):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"strength must be a number, got {v!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"strength must be finite, got {v!r}")
        return f

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v):
        if v is None:  # vllm-sdk's schema allows None: the default
            return "add"
        if not isinstance(v, str) or v not in MODES:
            raise ValueError(f"mode {v!r} is not allowed; allowed: {list(MODES)}")
        return v

    @model_serializer(mode="wrap")
    def _wire(self, handler):
        data = handler(self)
        if data.get("feature_id") is None:
            data.pop("feature_id", None)
        return data

    def to_dict(self) -> dict:
        """The request-body form, e.g. ``{"index_in_sae": 3, "strength": 0.5, "mode": "add"}``."""
        return self.model_dump()

    @classmethod
    def from_any(cls, item) -> "InterventionSpec":
        """An InterventionSpec from itself, a dict, or an object with ``index_in_sae`` and ``strength`` (vllm-sdk's)."""
        if isinstance(item, cls):
            return item
        if isinstance(item, dict):
            return cls(**item)
        if hasattr(item, "index_in_sae") and hasattr(item, "strength"):
            return cls(item.index_in_sae, item.strength, getattr(item, "mode", "add"), getattr(item, "feature_id", None))
        raise _WorkbenchValidationError(f"an intervention is an InterventionSpec or a dict, got {item!r}")


def _error_text(exc: pydantic.ValidationError) -> str:
    """Our validators' own messages as they are; pydantic's with the field they are about."""
    parts = []
    for e in exc.errors():
        if e["type"] == "value_error" and "error" in e.get("ctx", {}):
            parts.append(str(e["ctx"]["error"]))
        else:
            parts.append(f"{'.'.join(map(str, e['loc']))}: {e['msg']}")
    return "; ".join(parts)


class MonitorProbe(_Body):
    """A direction to watch (workbench extension): a feature of the model's set, or a vector at a layer.

    A feature reads as its activation (its read direction, bias and span); a vector as its plain
    projection ``h . v / |v|`` (``cosine``: divided by ``|h|`` too).
    """

    name: Optional[str] = None
    feature: Optional[Union[str, int]] = None
    layer: Optional[int] = None
    vector: Optional[list[float]] = None
    bias: float = 0.0
    span: float = 1.0
    cosine: bool = False


class ConditionBody(_Body):
    """Steer only when ``probe`` crosses ``threshold``: on the prompt's mean (``mode="prompt"``) or per token."""

    probe: MonitorProbe
    threshold: float
    mode: Literal["prompt", "token"] = "prompt"
    above: bool = True
    latch: bool = False


class ProjectionsBody(_Body):
    """Probe values at every position (prompt, then generated tokens fed back): ``values[position][probe]``."""

    names: list[str]
    layers: list[int]
    values: list[list[float]]
    token_ids: list[int]
    tokens: list[str]
    prompt_len: int
    boundaries: list[int]              # the first token of each prompt message
    roles: list[str]
    steered: Optional[list[bool]] = None   # per position, for a conditional spec


class ProjectionDeltaBody(_Body):
    """Probe values of positions ``start .. start+len(values)-1`` (a stream chunk's part)."""

    start: int
    values: list[list[float]]
    steered: Optional[list[bool]] = None
    tokens: Optional[list[str]] = None    # per position: its token's text (a chunk's text can hold two tokens)


class MonitorHeader(_Body):
    """What a monitored stream's first chunk says about the prompt and the probes."""

    names: list[str]
    layers: list[int]
    prompt_len: int
    prompt_tokens: list[str]
    boundaries: list[int]
    roles: list[str]


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
    n: int = Field(1, ge=1, le=128)  # OpenAI's bound; the replies are choices 0..n-1
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logprobs: Optional[bool] = False  # per generated token: its log-probability (and top_logprobs alternatives)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    # vLLM's OpenAI server extras (sampling)
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0)
    # vLLM's OpenAI server extra: continue a final assistant message (a prefill) instead of opening a new one
    continue_final_message: bool = False
    # workbench extension: a whole SteeringSpec (SteeringSpec.to_dict()), applied after the interventions
    steering: Optional[dict] = None
    # workbench extensions: watch directions while the model talks; steer only while a probe crosses a threshold
    monitor: Optional[list[MonitorProbe]] = Field(None, max_length=16)
    condition: Optional[ConditionBody] = None


class ChatCompletionMessage(_Body):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(_Body):
    """One candidate token at one step (OpenAI's): its text, log-probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatCompletionTokenLogprob(TopLogprob):
    """A generated token with the ``top_logprobs`` most likely tokens at its step."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(_Body):
    content: Optional[list[ChatCompletionTokenLogprob]] = None


class ChatCompletionChoice(_Body):
    index: int
    message: ChatCompletionMessage
    finish_reason: Optional[str] = "stop"
    # OpenAI's {"content": [...]} when the request set logprobs=true (vllm-sdk reads it as a plain dict)
    logprobs: Optional[ChoiceLogprobs] = None
    projections: Optional[ProjectionsBody] = None   # workbench extension: with monitor= or a condition


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
    # workbench extensions of monitored streams: the probes and prompt (first chunk), values computed since the last
    monitor: Optional[MonitorHeader] = None
    projections: Optional[ProjectionDeltaBody] = None


class FeatureItem(_Body):
    id: str
    label: str
    layer: int
    index_in_sae: int
    dimension: Optional[int] = None


class ConceptRequest(_Body):
    """Train a concept from contrastive examples and add it to the model's feature set (workbench extension)."""

    model: str
    label: str = Field(..., min_length=1)
    positive: list[str] = Field(..., min_length=1)
    negative: Optional[list[str]] = None
    layer: Optional[int] = None
    method: Literal["mean_diff", "caa", "pca", "probe"] = "mean_diff"


class ConceptResponse(_Body):
    feature: FeatureItem
    method: str
    scale: float


class BestSteeringRequest(_Body):
    """Pick the layer and strength of a feature that score best on tuning prompts (workbench extension)."""

    model: str
    feature: str  # a feature id
    prompts: Optional[list[str]] = Field(None, min_length=1)
    layers: Optional[list[int]] = Field(None, min_length=1)
    strengths: Optional[list[float]] = Field(None, min_length=1)
    repetition_penalties: list[float] = Field([1.0, 1.3], min_length=1)  # tried too: steered text loops
    max_tokens: int = Field(48, ge=1, le=256)


class SteeringScoreRow(_Body):
    layer: int
    strength: float
    repetition_penalty: float = 1.0
    concept: float
    instruction: float
    fluency: float
    hm: float


class BestSteeringResponse(_Body):
    layer: int
    strength: float
    repetition_penalty: float
    hm: float
    feature: FeatureItem  # the feature to dial: the given one, or one registered at the chosen layer
    table: list[SteeringScoreRow]


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


# vllm-sdk names one identical usage class per route; code importing those names keeps working
FeatureInspectionUsage = ActivationsUsage = LogitsUsage = ContrastUsage = Usage


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
    # Python slice bounds over the rendered conversation's tokens: clamped, negative counts from the end
    start_idx: Optional[int] = None
    end_idx: Optional[int] = None
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


class FeatureSetRequest(_Body):
    """Load the model's feature set (the concept library: trained once, then read from cache) and describe it."""

    model: str


class FeatureSetResponse(_Body):
    object: Literal["feature_set"] = "feature_set"
    model: str
    name: str
    count: int
    layers: list[int]


class FeaturePageRequest(_Body):
    """A feature's page: where it fires in the concept library's texts and in ``corpus`` (workbench extension)."""

    model: str
    feature: Union[str, int]                                   # a feature id or index_in_sae
    corpus: Optional[list[str]] = Field(None, max_length=1024)
    top_n: int = Field(10, ge=1, le=200)
    window: int = Field(12, ge=0, le=256)
    bins: int = Field(30, ge=1, le=500)
    include_library: bool = True


class FeatureContext(_Body):
    """A text's most activating token and the tokens around it (``context_activations``: None = not scored)."""

    text_index: int
    source: Literal["library", "corpus"]
    group: Optional[str] = None                                # library texts: "neutral" or a concept's feature id
    position: int
    token: str
    activation: float
    context_start: int
    context_tokens: list[str]
    context_activations: list[Optional[float]]


class FeatureHistogram(_Body):
    counts: list[int]
    edges: list[float]


class TokenScore(_Body):
    token: str
    token_id: int
    score: float


class FeaturePageResponse(_Body):
    id: str
    object: Literal["feature.page"] = "feature.page"
    created: int
    model: str
    feature: FeatureItem
    contexts: list[FeatureContext]
    histogram: FeatureHistogram
    promoted: list[TokenScore]
    suppressed: list[TokenScore]
    text_count: int
    token_count: int

    def to_html(self) -> str:
        """The page as self-contained HTML (``workbench.features.pages.render_feature_page``)."""
        from ..features.pages import render_feature_page

        return render_feature_page(self)

    def _repr_html_(self) -> str:
        return self.to_html()


class LogitLensRequest(_Body):
    """The logit lens of a conversation (workbench extension): top-k predictions per layer and position."""

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    layers: Optional[list[int]] = None
    top_k: int = Field(5, ge=1, le=50)
    interventions: Optional[list[InterventionSpec]] = None
    steering: Optional[dict] = None
    precision: Literal["auto", "fast", "exact"] = "auto"


class LogitLensResponse(_Body):
    id: str
    object: Literal["lens.logit"] = "lens.logit"
    created: int
    model: str
    layers: list[int]
    tokens: list[str]
    token_ids: list[int]
    top_tokens: list[list[list[str]]]
    top_ids: list[list[list[int]]]
    top_probs: list[list[list[float]]]


class DirectionTokensRequest(_Body):
    """Tokens a feature or vector promotes and suppresses through the unembedding (give one of the two)."""

    model: str
    feature: Optional[Union[str, int]] = None
    vector: Optional[list[float]] = None
    top_k: int = Field(20, ge=1, le=200)


class DirectionTokensResponse(_Body):
    id: str
    object: Literal["lens.direction"] = "lens.direction"
    created: int
    model: str
    promoted: list[TokenScore]
    suppressed: list[TokenScore]
