"""The FastAPI application: routes, authentication, body limits and error handling.

Every refusal is an OpenAI-style error JSON (400, 401, 404, 413, 429); an unexpected failure is logged and
answered with a 500 JSON, never a hung connection. Every request has an id (the client's `X-Request-Id`, or a new
one), echoed in the response's `X-Request-Id` header and named in the server's log lines about it.
"""
from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import APIError, error_response, served_models, unknown_model
from .generation import Generator, request_id_of
from .scheduler import Scheduler
from .settings import ServerSettings

log = logging.getLogger("gemma3n.server")


def create_app(model, settings: ServerSettings | None = None) -> FastAPI:
    """An app serving `model` (a loaded `gemma3n.Model`); its scheduler thread runs while the app runs."""
    settings = settings or ServerSettings()
    served = served_models(model, settings)
    if len(set(served)) != len(served):
        raise ValueError(f"an adapter may not be named like the base model ({settings.model_name!r}); rename it")
    scheduler = Scheduler(model, max_batch=settings.max_batch, max_queue=settings.max_queue,
                          prefix_cache_mb=settings.prefix_cache_mb)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="gemma3n", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.settings = scheduler, settings
    app.add_middleware(RequestIds)
    generator = Generator(model, settings, scheduler)
    _add_error_handlers(app)
    authorized = [Depends(_authorizer(settings))]

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "active": scheduler.active,
                "waiting": scheduler.waiting}

    @app.get("/v1/models", dependencies=authorized)
    async def models():
        return {"object": "list", "data": [_model_card(model, settings, name) for name in served]}

    @app.get("/v1/models/{name:path}", dependencies=authorized)
    async def model_card(name: str):
        if name not in served:
            raise unknown_model(name, served)
        return _model_card(model, settings, name)

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat_completions(request: Request):
        return await generator.chat(request)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(request: Request):
        return await generator.completion(request)

    @app.post("/tokenize", dependencies=authorized)
    async def tokenize(request: Request):
        return await generator.tokenize(request)

    @app.post("/detokenize", dependencies=authorized)
    async def detokenize(request: Request):
        return await generator.detokenize(request)

    @app.get("/tokenizer_info", dependencies=authorized)
    async def tokenizer_info():
        return generator.tokenizer_info()

    @app.get("/metrics", dependencies=authorized)
    async def metrics():
        text = scheduler.metrics.render(settings.model_name, scheduler.active, scheduler.waiting, scheduler.steps,
                                        scheduler.peak_batch,
                                        scheduler.prefix_cache.stats() if scheduler.prefix_cache.budget else None)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/audio/transcriptions", dependencies=authorized)
    async def transcriptions(request: Request):
        return await generator.audio(request, translate=False)

    @app.post("/v1/audio/translations", dependencies=authorized)
    async def translations(request: Request):
        return await generator.audio(request, translate=True)

    return app


REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class RequestIds:
    """ASGI middleware: the request's id (a client's `X-Request-Id` when it is a short token, else a new one) in
    `request.state.request_id`, in the response's `X-Request-Id` header, and in one log line when the response
    ends (streamed ones included). Pure ASGI, so a handler still sees the client's disconnect at once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1").strip()
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status, started = [None], time.perf_counter()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            client = scope.get("client") or ("-", 0)
            log.info("request %s: %s %s %s from %s, %.3f s", request_id, scope.get("method"), scope.get("path"),
                     status[0] or "no response", client[0], time.perf_counter() - started)


def _model_card(model, settings: ServerSettings, name: str) -> dict:
    card = {"id": name, "object": "model", "created": 0, "owned_by": "gemma3n"}
    if name != settings.model_name:  # an adapter: vLLM names its base `parent` and its folder `root`
        card.update(parent=settings.model_name, root=model.adapters.folders.get(name))
    return card


def _authorizer(settings: ServerSettings):
    async def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")
    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}; see /v1/models, /v1/chat/completions, "
                        "/v1/completions, /v1/audio/transcriptions, /v1/audio/translations, /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {exc.errors()[:3]}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("request %s: unexpected error on %s %s", request_id_of(request), request.method,
                      request.url.path)
        return error_response(500, "internal server error; see the server log")
