"""Transports carry API calls: in-process (through the schemas, as JSON) or over HTTP.

One client, pluggable transports, as httpx does it: ``Client(model)`` uses an
``InProcessTransport`` that still serializes every request and response through the schemas, so
a bug that only a remote client would see shows up in-process too.
"""

from __future__ import annotations

import json

import pydantic

from ..errors import APIError, APIValidationError, EngineError, RequestFailedError, ValidationError, WorkbenchError
from . import schemas as s

# route -> (request schema, Service method name); the server mounts the same table
ROUTES = {
    "/v1/chat/completions": (s.ChatCompletionRequest, "chat"),
    "/v1/features/search": (s.FeatureSearchRequest, "search"),
    "/v1/features/rerank": (s.FeatureRerankRequest, "rerank"),
    "/v1/features/concepts": (s.ConceptRequest, "add_concept"),
    "/v1/features/load": (s.FeatureSetRequest, "load_features"),
    "/v1/features/page": (s.FeaturePageRequest, "feature_page"),
    "/v1/lens/logit": (s.LogitLensRequest, "logit_lens"),
    "/v1/lens/direction": (s.DirectionTokensRequest, "direction_tokens"),
    "/v1/steering/best": (s.BestSteeringRequest, "best_steering"),
    "/v1/chat_attribution/inspect": (s.FeatureInspectionRequest, "inspect"),
    "/v1/chat_attribution/activations": (s.ActivationsRequest, "activations"),
    "/v1/chat_attribution/logits": (s.LogitsRequest, "logits"),
    "/v1/chat_attribution/contrast": (s.ContrastRequest, "contrast"),
    "/v1/chat_attribution/norms": (s.NormsRequest, "norms"),
    "/v1/chat_attribution/token_activations": (s.TokenActivationsRequest, "token_activations"),
}


def error_status(exc: BaseException) -> int:
    """The HTTP status an error maps to (the server uses the same table)."""
    if isinstance(exc, (ValidationError, pydantic.ValidationError)):
        return 422 if isinstance(exc, pydantic.ValidationError) else 400
    if isinstance(exc, RequestFailedError):  # this request alone failed: the server is fine
        return 500
    if isinstance(exc, EngineError):
        return 503
    return 500


def error_detail(exc: BaseException) -> str:
    if isinstance(exc, pydantic.ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


def to_api_error(exc: BaseException) -> APIError:
    status, detail = error_status(exc), error_detail(exc)
    return (APIValidationError if status < 500 else APIError)(detail, status)


class InProcessTransport:
    """Calls a ``Service`` in this process, round-tripping bodies through JSON and the schemas."""

    def __init__(self, model, aliases=()):
        from .handlers import Service  # the engine side: imported here so a remote-only client never loads torch

        self.service = Service(model, aliases)

    def _parse(self, path: str, body: dict):
        if path not in ROUTES:
            raise APIValidationError(f"no route {path}", 404)
        schema, method = ROUTES[path]
        try:
            return schema.model_validate(json.loads(json.dumps(body))), getattr(self.service, method)
        except pydantic.ValidationError as exc:
            raise to_api_error(exc) from exc

    async def request(self, path: str, body: dict) -> dict:
        req, handler = self._parse(path, body)
        try:
            response = await handler(req)
        except WorkbenchError as exc:
            raise to_api_error(exc) from exc
        return json.loads(response.model_dump_json())

    async def stream(self, path: str, body: dict):
        req, _ = self._parse(path, body)
        try:
            async for chunk in self.service.chat_stream(req):
                yield json.loads(chunk.model_dump_json())
        except WorkbenchError as exc:
            raise to_api_error(exc) from exc

    async def get(self, path: str) -> dict:
        if path == "/v1/models":
            return json.loads((await self.service.models()).model_dump_json())
        if path == "/health":
            return {"status": "ok"}
        raise APIValidationError(f"no route {path}", 404)

    async def aclose(self) -> None:
        return None
