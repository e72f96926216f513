"""The HTTP server process: uvicorn, made to end open answers first when told to stop.

uvicorn's graceful shutdown waits for open connections to finish; a stream of a few hundred
tokens would hold it up for its whole length. On SIGINT/SIGTERM this server first aborts every
answer in progress, so that streams end at once (with ``finish_reason``/``done_reason``
``abort``) and the engine stops with nothing running.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


class HTTPServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # runs as a signal handler: hand the work to the event loop instead of taking locks here
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)


def run_http_server(app: ASGIApp, host: str, port: int, on_exit: Callable[[], None],
                    access_log: bool = False) -> None:
    """Serve ``app`` until SIGINT/SIGTERM; ``on_exit`` runs on the event loop at the signal.

    uvicorn's own logging stays at warnings unless ``access_log`` (a line per request).
    """
    config = uvicorn.Config(app, host=host, port=port,
                            log_level="info" if access_log else "warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    try:
        HTTPServer(config, on_exit).run()
    except KeyboardInterrupt:
        # uvicorn re-raises a captured SIGINT after its graceful shutdown; that is our exit
        pass
    logger.info("server stopped")
