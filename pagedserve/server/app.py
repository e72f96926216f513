"""The FastAPI application: both APIs over one :class:`AsyncEngine`, plus the operator's routes.

    /v1/*                      OpenAI API          (openai_api.py)
    /api/*                     Ollama API          (ollama_api.py, ollama_models_api.py,
                                                    ollama_store_api.py)
    /api/embed, /api/embeddings, /v1/embeddings    (embeddings_api.py)
    /tokenize, /detokenize     vLLM's tokenizer    (tokenize_api.py)
    /health, /version, /       liveness, version, "Ollama is running"
    /metrics                   Prometheus          (pagedserve/metrics.py)

With an API key set, ``/v1/*``, ``/api/*``, ``/tokenize`` and ``/detokenize`` require
``Authorization: Bearer KEY`` (the tokenizer routes cost the server what a prompt costs); the
operator's routes (``/health``, ``/ready``, ``/metrics``, ``/version``, ``/``) stay open so
that probes and scrapers need no secret. Bodies beyond the server's size limit are refused (413)
before any handler reads them. The engine loop starts with the application (its lifespan) and
stops with it.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.metrics import CONTENT_TYPE, ServerMetrics
from pagedserve.server import (
    embeddings_api,
    ollama_api,
    ollama_models_api,
    ollama_store_api,
    openai_api,
    tokenize_api,
)
from pagedserve.server.errors import APIError, error_response, install_error_handlers
from pagedserve.server.generation import ClientDisconnected
from pagedserve.server.openapi import install_openapi
from pagedserve.server.served_model import ServedModel
from pagedserve.server.work_slots import WorkSlots
from pagedserve.version import __version__

logger = logging.getLogger(__name__)

# what the API key guards; openapi.py's PROTECTED lists the same for the document
PROTECTED_PREFIXES = ("/v1/", "/api/", "/tokenize", "/detokenize")


def create_app(served: ServedModel, metrics: ServerMetrics | None = None,
               api_key: str | None = None) -> FastAPI:
    """The server for ``served``; ``metrics`` is registered as an engine observer here."""
    engine = served.async_engine
    metrics = metrics or ServerMetrics(served.name, engine.stats, alive=lambda: engine.alive,
                                       max_model_len=served.max_model_len)
    if metrics not in engine.observers:
        engine.observers.append(metrics)
    if metrics.grammar_compile_time.observe not in engine.grammar_compile_observers:
        engine.grammar_compile_observers.append(metrics.grammar_compile_time.observe)

    text_work = WorkSlots()  # long /tokenize and /detokenize work

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        served.async_engine.start()
        try:
            yield
        finally:
            text_work.close()
            await served.async_engine.shutdown()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.metrics = metrics
    app.state.limits = served.limits
    app.state.text_work = text_work
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodySizeLimitMiddleware, max_request_body=served.limits.max_request_body)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics)  # outermost: sees every answer

    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(ollama_models_api.router)
    app.include_router(ollama_store_api.router)
    app.include_router(embeddings_api.router)
    app.include_router(tokenize_api.router)

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine loop runs (empty body)."},
                        503: {"description": "The engine loop has died.",
                              "content": {"text/plain": {}}}})
    async def health() -> Response:
        """Liveness: 200 while the engine loop runs, 503 once it has died."""
        error = served.async_engine.error
        if error is not None:
            return PlainTextResponse(f"engine loop failed: {error!r}", status_code=503)
        return Response(status_code=200)

    @app.get("/ready", response_class=Response,
             responses={200: {"description": "Serving: send requests here (empty body)."},
                        503: {"description": "Shutting down, or the engine loop has died.",
                              "content": {"text/plain": {}}}})
    async def ready() -> Response:
        """Readiness: 200 while this server takes requests; 503 once it drains or died."""
        if not served.ready:
            reason = "draining" if served.draining else "engine loop failed"
            return PlainTextResponse(reason, status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/", response_class=PlainTextResponse)
    async def root() -> PlainTextResponse:
        """Ollama's exact words: clients and scripts probe for them."""
        return PlainTextResponse("Ollama is running")

    @app.head("/", response_class=PlainTextResponse)
    async def root_head() -> PlainTextResponse:
        return PlainTextResponse("Ollama is running")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus(request: Request) -> Response:
        """Prometheus metrics (text exposition format); ``?name[]=X&name[]=Y`` restricts the
        answer to those series, as prometheus_client's own exporters do."""
        return Response(metrics.render(request.query_params.getlist("name[]")),
                        media_type=CONTENT_TYPE)

    install_openapi(app)
    return app


class APIKeyMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streamed answers and disconnects pass untouched."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES) \
                and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(scope["path"], APIError(
                    401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def body_too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else "more"
    return APIError(413, f"Request body too large: {got}; the limit is {limit} bytes "
                    "(pagedserve serve --max-request-body).", code="request_too_large")


class BodySizeLimitMiddleware:
    """Pure ASGI, so that streamed answers and disconnects pass untouched."""

    def __init__(self, app: ASGIApp, max_request_body: int) -> None:
        self.app = app
        self.max_request_body = max_request_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_request_body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response(scope["path"], body_too_large(int(declared), limit))
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a chunked body: the handler's error handler answers
                    raise body_too_large(None, limit)
            return message

        await self.app(scope, limited_receive, send)


class HTTPMetricsMiddleware:
    """Counts every answer by route template and status (``pagedserve:http_requests_total``).

    The route is the matched template (``/v1/models/{model_id}``), or ``none`` for a path no
    route matched or a request refused before routing, so that clients cannot mint series.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                self.metrics.observe_http(getattr(route, "path", "none"), message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
