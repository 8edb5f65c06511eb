"""The one exception tree of the workbench.

Every error the workbench raises on purpose is a ``WorkbenchError``::

    WorkbenchError
    ├── ValidationError            bad input; also a ValueError. Names the value and the allowed range.
    │   ├── LayerOutOfRangeError   layer index outside [0, layer_count)
    │   ├── VectorError            wrong size, NaN/inf, zero direction
    │   ├── EmptyInputError        empty prompt, messages or conversation list
    │   ├── PromptTooLongError     prompt does not fit the model's context
    │   └── UnknownFeatureError    a feature id / index not in the feature set; also a KeyError
    ├── ModelNotFoundError         a model name that resolves to nothing; says what was tried
    ├── SteeringStackEmptyError    pop on an empty steering stack; also an IndexError
    ├── BackendUnavailableError    a backend that is not installed or not usable here
    ├── EngineError                the engine failed or was closed while serving a request
    │   └── RequestFailedError     one request failed inside the engine; the engine and the others go on
    │       └── NonFiniteActivationError  its steering drove the residual stream to inf/NaN (also a ValidationError)
    └── APIError                   a thin-API call failed; carries status_code and the server's detail
        ├── APIValidationError     4xx: the request was refused (also a ValidationError)
        └── APIConnectionError     the server could not be reached

Lower-level errors (transformers, torch, OS) are translated at the boundary with
``raise ... from exc`` so the original cause stays visible.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class ValidationError(WorkbenchError, ValueError):
    """Bad input: the message names the bad value and the allowed range."""


class LayerOutOfRangeError(ValidationError):
    """A layer index outside ``[0, layer_count)``."""


class VectorError(ValidationError):
    """A steering vector of the wrong size, with NaN/inf, or with zero length."""


class EmptyInputError(ValidationError):
    """An empty prompt, message list or conversation list."""


class PromptTooLongError(ValidationError):
    """A prompt that does not fit the model's context window."""


class UnknownFeatureError(ValidationError, KeyError):
    """A feature id or index that is not in the feature set."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelNotFoundError(WorkbenchError, LookupError):
    """A model name that resolves to no weights; the message lists what was tried."""


class SteeringStackEmptyError(WorkbenchError, IndexError):
    """``pop_steering_spec`` with nothing pushed."""


class BackendUnavailableError(WorkbenchError):
    """A backend that is not installed or cannot run on this machine."""


class EngineError(WorkbenchError, RuntimeError):
    """The engine failed (or was closed) while serving a request."""


class RequestFailedError(EngineError):
    """One request failed inside the engine (its sampler, detokenizer or forward pass raised).

    Only that request ends with this error: the engine keeps serving, and the requests that shared
    its batch finish with the tokens they would have produced alone.
    """


class NonFiniteActivationError(RequestFailedError, ValidationError):
    """The request's steering made the residual stream inf or NaN (a strength too large for the dtype).

    Raised instead of returning tokens sampled from NaN logits; a bad input, so HTTP 400.
    """

    def __init__(self, detail: str | None = None):
        super().__init__(detail or "the residual stream became inf/NaN under this request's steering (a strength too "
                                   "large for the model's dtype?); lower the strength. Other requests were not affected")


class APIError(WorkbenchError):
    """A thin-API call failed: ``status_code`` (None when no answer came) and the server's ``detail``."""

    def __init__(self, detail: str, status_code: int | None = None):
        super().__init__(f"{status_code}: {detail}" if status_code else detail)
        self.detail = detail
        self.status_code = status_code


class APIValidationError(APIError, ValidationError):
    """The server (or in-process service) refused the request as bad input (HTTP 4xx)."""


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke."""
