"""``workbench serve``: the thin API over HTTP (FastAPI + uvicorn), for a GPU box shared by notebooks.

Routes are the vllm-sdk seed's (plus the norms route, ``GET /v1/models`` and ``GET /health``);
``/v1/chat/completions`` streams server-sent events when ``stream: true`` and also takes OpenAI
chat requests. Authentication: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``, compared in
constant time; without a key the server only binds to localhost.

>>> # shell: workbench serve --model default --port 8000 --served-model-name meta-llama/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import WorkbenchError
from .api.transports import ROUTES, error_detail, error_status
from .api.handlers import Service

log = logging.getLogger("workbench.server")
MAX_BODY_BYTES = 4 * 2**20
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request and response bodies of the API routes.

    The routes parse bodies themselves (to answer 413/415/400 before validation), so FastAPI cannot
    see their schemas; they are added here from the pydantic models, so that clients, docs and
    schema-based fuzzers (tests/test_fuzz.py) know what each route takes and returns.
    """
    import typing

    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})

    def ref(model) -> dict:
        js = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components[model.__name__] = js
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "bad request", "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}}
    for path, (schema, method) in ROUTES.items():
        returns = typing.get_type_hints(getattr(Service, method))["return"]
        ok = {"description": "OK", "content": {"application/json": {"schema": ref(returns)}}}
        if path == "/v1/chat/completions":
            ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}
        op = doc["paths"][path]["post"]
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(schema)}}}
        op["responses"] = {"200": ok, **{str(code): error for code in (400, 401, 404, 413, 415, 422, 500, 503)}}
    app.openapi_schema = doc
    return doc


def create_app(model, aliases=(), api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_tokens_limit: int | None = None, load_features: bool = True):
    """The ASGI app serving ``model``; ``max_tokens_limit`` caps the tokens one request may ask for.

    With ``load_features`` the model's feature set (the concept library) loads at start-up, before
    the server accepts requests; otherwise the first request that needs it loads it (off the loop).

    >>> app = create_app(wb.load("default"), aliases=["meta-llama/Llama-3.1-8B-Instruct"])  # doctest: +SKIP
    """
    service = Service(model, aliases, max_tokens_limit=max_tokens_limit)

    @asynccontextmanager
    async def lifespan(app):
        if load_features:   # a worker thread trains or loads the library; uvicorn listens after this
            try:
                await service.features()
            except Exception:   # chat still works; feature routes retry the load and report its error
                log.exception("could not load the feature set of %s at start-up", service.names[0])
        yield

    app = FastAPI(title="steering-workbench", version="0.1.0", lifespan=lifespan)
    app.openapi = lambda: _openapi(app)
    app.state.service = service
    app.state.stats = {"streams_started": 0, "streams_finished": 0, "streams_aborted": 0}

    def refuse(status: int, detail: str):
        return JSONResponse({"detail": detail}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("x-api-key") or ""
            auth = request.headers.get("authorization") or ""
            if auth.lower().startswith("bearer "):
                given = given or auth[7:].strip()
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return refuse(401, "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)")
        size = request.headers.get("content-length")
        if size and int(size) > max_body_bytes:
            return refuse(413, f"request body of {size} bytes is over the limit of {max_body_bytes}")
        return await call_next(request)

    async def parse(request: Request, schema):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise _Refused(413, f"request body of {len(raw)} bytes is over the limit of {max_body_bytes}")
        if "json" not in (request.headers.get("content-type") or "application/json"):
            raise _Refused(415, "send the body as application/json")
        try:
            return schema.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise _Refused(400, f"malformed JSON: {exc}") from exc
        except UnicodeDecodeError as exc:   # JSON must be UTF-8
            raise _Refused(400, f"the body is not valid UTF-8 JSON: {exc}") from exc
        except pydantic.ValidationError as exc:
            raise _Refused(422, error_detail(exc)) from exc

    def make_route(path, schema, method):
        async def route(request: Request):
            try:
                req = await parse(request, schema)
                if getattr(req, "stream", False):
                    # refuse what would fail before the first event: a stream's status is sent with it
                    service.check_model(req.model)
                    service._sampling(req)
                    await service._spec(req)
                    await service._probes(req.monitor)
                    return StreamingResponse(sse(req), media_type="text/event-stream")
                return JSONResponse(json.loads((await getattr(service, method)(req)).model_dump_json()))
            except _Refused as exc:
                return refuse(exc.status, exc.detail)
            except (WorkbenchError, pydantic.ValidationError) as exc:
                return refuse(error_status(exc), error_detail(exc))
        route.__name__ = method
        app.post(path)(route)

    async def sse(req):
        app.state.stats["streams_started"] += 1
        finished = False
        try:
            async for chunk in service.chat_stream(req):
                yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        except WorkbenchError as exc:
            yield f"data: {json.dumps({'error': {'detail': error_detail(exc), 'status': error_status(exc)}})}\n\n"
            finished = True
        finally:
            # a client that disconnects cancels this generator: the engine request is stopped with it
            app.state.stats["streams_finished" if finished else "streams_aborted"] += 1

    for path, (schema, method) in ROUTES.items():
        make_route(path, schema, method)

    @app.get("/v1/models")
    async def models():
        return json.loads((await service.models()).model_dump_json())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.names[0], "backend": model.backend}

    @app.get("/v1/stats")
    async def stats():
        engine = dict(getattr(model, "stats", {}))
        return {"server": dict(app.state.stats), "engine": engine,
                "active_requests": getattr(model, "active_requests", None)}

    return app


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def serve(model_name: str = "default", backend: str = "auto", host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, aliases=(), log_level: str = "info", max_tokens_limit: int | None = None,
          **load_kwargs) -> None:
    """Load a model and serve it until interrupted (what ``workbench serve`` runs); ``load_kwargs`` go to ``wb.load``."""
    import uvicorn

    from .engine import load

    if not api_key and host not in LOOPBACK:
        log.warning("no --api-key given: binding to 127.0.0.1 instead of %s (set a key to serve other machines)", host)
        print(f"workbench serve: no --api-key, so binding to 127.0.0.1 only (not {host})", flush=True)
        host = "127.0.0.1"
    model = load(model_name, backend=backend, **load_kwargs)
    app = create_app(model, aliases=aliases, api_key=api_key, max_tokens_limit=max_tokens_limit)
    print(f"workbench serve: {model.model_name} ({model.backend}) on http://{host}:{port}"
          f"{' (API key required)' if api_key else ''}; names: {app.state.service.names}", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        model.close()
