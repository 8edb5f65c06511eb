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
