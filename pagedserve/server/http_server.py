"""The HTTP server process: uvicorn, made to end open answers first when told to stop, and to
exit non-zero when the engine has died.

uvicorn's graceful shutdown waits for open connections to finish; a stream of a few hundred
tokens would hold it up for its whole length. On SIGINT/SIGTERM this server first aborts every
answer in progress, so that streams end at once (with ``finish_reason``/``done_reason``
``abort``) and the engine stops with nothing running.

When the engine loop dies (a bug, a broken device), the process has nothing left to serve: it
fails what is in flight (503 in each API's shape), keeps answering for a moment so that those
answers reach their clients, and exits with status 1, so that its supervisor (Kubernetes,
systemd) restarts it. A server that stayed up with a dead engine would pass for healthy to
anything but /health.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5
DEAD_ENGINE_GRACE_S = 1.0  # time for the failed answers to go out before the process exits
EXIT_ENGINE_DEAD = 1


class HTTPServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_exit = on_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self.exit_code = 0

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame) -> None:
        # runs as a signal handler: hand the work to the event loop instead of taking locks here
        if self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._on_exit)
        super().handle_exit(sig, frame)

    def engine_died(self, exc: BaseException) -> None:
        """Called on the event loop once the engine loop has died: exit non-zero soon."""
        logger.error("the engine loop died (%r); exiting with status %d so that a supervisor "
                     "restarts the server", exc, EXIT_ENGINE_DEAD)
        self.exit_code = EXIT_ENGINE_DEAD
        asyncio.get_running_loop().call_later(DEAD_ENGINE_GRACE_S, self._stop)

    def _stop(self) -> None:
        self.should_exit = True


class PortInUseError(OSError):
    """Another process listens on the address; the message says which and what to do."""


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening) as uvicorn binds it: taken before the
    model loads, so that a port in use fails the start at once and nobody takes it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(
                exc.errno, f"{address} is already in use (another pagedserve or an Ollama "
                "server?): stop it, or choose another port with --port") from None
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
    return sock


def make_http_server(app: ASGIApp, host: str, port: int, on_exit: Callable[[], None],
                     access_log: bool = False) -> HTTPServer:
    """A server for ``app``; ``on_exit`` runs on the event loop at SIGINT/SIGTERM.

    uvicorn's own logging stays at warnings unless ``access_log`` (a line per request).
    """
    config = uvicorn.Config(app, host=host, port=port,
                            log_level="info" if access_log else "warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return HTTPServer(config, on_exit)


def run_http_server(server: HTTPServer, sock: socket.socket | None = None) -> int:
    """Serve until SIGINT/SIGTERM (status 0) or the engine's death (status 1); ``sock``, from
    :func:`bind_socket`, is used instead of binding the configured host and port here."""
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:
        # uvicorn re-raises a captured SIGINT after its graceful shutdown; that is our exit
        pass
    logger.info("server stopped")
    return server.exit_code
