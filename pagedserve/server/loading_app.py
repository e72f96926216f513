"""The application uvicorn serves from the first second, before the model is loaded.

Loading a model takes seconds to minutes; a server that only opened its port afterwards would
look dead to a health checker (connection refused) and could not tell anyone why. Like
llama.cpp's server, pagedserve listens at once and answers while it loads:

    GET /health, /ready     503 "loading model"  (liveness checkers wait on a startup probe)
    GET, HEAD /             200 "Ollama is running", which is what Ollama answers
    anything else           503 + Retry-After, in the API's error shape

Once the model is loaded, :meth:`LoadingApp.install` runs the real application's lifespan (the
engine loop starts) and from then on every request goes to it unchanged. With several front ends
on one port (``--api-server-count``), a front end that is ready still answers /health and /ready
503 until every other one is (``peers_ready``): the kernel spreads connections over all of them,
so a probe that passed on one must not send traffic to one still loading.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from starlette.types import Receive, Scope, Send

from pagedserve.server.errors import APIError, error_response

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 5


class LoadingApp:
    def __init__(self, peers_ready: Callable[[], bool] | None = None) -> None:
        self.app: FastAPI | None = None
        self._lifespans = contextlib.AsyncExitStack()
        self._peers_ready = peers_ready  # None once they all were

    async def install(self, app: FastAPI) -> None:
        """Start ``app``'s lifespan, then hand it every request (call on the event loop)."""
        await self._lifespans.enter_async_context(app.router.lifespan_context(app))
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif self.app is not None:
            if self._peers_ready is not None and scope["type"] == "http" and (
                    scope["path"] in ("/health", "/ready")):
                if not self._peers_ready():
                    await self._loading(scope, receive, send)
                    return
                self._peers_ready = None
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await self._loading(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._lifespans.aclose()  # the engine loop stops
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return

    async def _loading(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path in ("/health", "/ready"):
            response = PlainTextResponse("loading model", status_code=503,
                                         headers={"Retry-After": str(LOADING_RETRY_AFTER_S)})
        elif path == "/" and scope["method"] in ("GET", "HEAD"):
            response = PlainTextResponse("Ollama is running")
        else:
            response = error_response(path, APIError(
                503, "The model is still loading; please retry in a few seconds.",
                code="model_loading", headers={"Retry-After": str(LOADING_RETRY_AFTER_S)}))
        await response(scope, receive, send)
