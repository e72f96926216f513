"""The HTTP server process: uvicorn, taught how an inference server stops.

Three ways to end, each with its exit status:

- **SIGTERM: drain** (what Kubernetes, systemd and ``docker stop`` send). The server stops
  admitting at once (new requests get 503 with Retry-After in their API's shape, ``/ready``
  fails so that load balancers look elsewhere) while the requests in flight go on, for up to
  ``--shutdown-timeout`` seconds; what is left then is aborted with a proper final event
  (``finish_reason``/``done_reason`` ``abort``), and the process exits with status 0. The port
  stays open during the drain, so a late request gets its 503 rather than a refused
  connection. This is vLLM's ``--shutdown-timeout``.
- **SIGINT** (Ctrl-C in a terminal), a second signal during a drain, or SIGTERM with a timeout
  of 0: every answer in progress is aborted at once and the process exits with status 0.
  (uvicorn's own graceful shutdown would wait for open streams to finish, however long.)
- **The engine loop died** (a bug, a broken device): there is nothing left to serve. What is
  in flight fails (503), the server keeps answering for a moment so that those answers reach
  their clients, and the process exits with status 1, so that its supervisor restarts it.

Slow and numerous clients are held off per connection (connection_guard.py): a request must
arrive within ``--timeout-request-read``, and past ``--limit-concurrency`` connections or
requests the server answers 503 (the operator's routes excepted).

The served model is attached once loaded (the port answers from the first second; see
loading_app.py); until then a signal simply ends the process.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import uvicorn
from starlette.types import ASGIApp

from pagedserve.server.connection_guard import guarded_protocol
from pagedserve.server.limits import DEFAULT_SHUTDOWN_TIMEOUT_S, ConnectionLimits

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5  # uvicorn's wait for connections once every answer has ended
DEAD_ENGINE_GRACE_S = 1.0  # time for the failed answers to go out before the process exits
EXIT_OK = 0
EXIT_FAILED = 1


class Drainable(Protocol):
    """What the server needs of the served model to stop well (ServedModel has it)."""

    def start_draining(self) -> None: ...

    async def drained(self) -> None: ...

    def abort_all(self) -> None: ...


class HTTPServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config,
                 shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> None:
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.served: Drainable | None = None
        self.exit_code = EXIT_OK
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_started = threading.Event()

    def attach(self, served: Drainable) -> None:
        """The loaded model, from now on drained or aborted at a signal.

        What the load left on the heap (modules, the model's Python objects: hundreds of
        thousands) lives as long as the process, so it is frozen out of the garbage collector:
        otherwise every full collection walks it again, a pause of a few hundred milliseconds
        for every stream, in whichever thread happens to trigger it, the event loop's included.
        """
        self.served = served
        gc.collect()
        gc.freeze()

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_started.set()
        try:
            await super().serve(sockets)
        finally:
            gc.unfreeze()  # see attach(); what is left goes at exit, as nanobind's modules expect

    # -- from another thread (the model loader) --------------------------------------------------

    def run_on_loop(self, coroutine: Coroutine) -> bool:
        """Run ``coroutine`` on the server's event loop and wait for it; False when the server
        stopped first (a signal during the load)."""
        self._loop_started.wait()
        try:
            asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()
        except RuntimeError:  # the loop is closed
            coroutine.close()
            return False
        return True

    def call_on_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        self._loop_started.wait()
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server has stopped anyway
            pass

    def handle_exit(self, sig, frame) -> None:
        # Runs as a signal handler: only flags here, the work goes to the event loop. Unlike
        # uvicorn's, it records no signal to raise again at exit, so the status is ours.
        loop = self._loop
        if loop is None or self.served is None:  # nothing loaded or served yet
            self.force_exit = self.should_exit
            self.should_exit = True
            return
        if (sig == signal.SIGTERM and self.shutdown_timeout > 0 and not self.draining
                and not self.should_exit):
            self.draining = True
            loop.call_soon_threadsafe(self._begin_drain)
            return
        if self.should_exit:
            self.force_exit = True  # a third signal: stop waiting for connections too
        else:
            loop.call_soon_threadsafe(self.served.abort_all)
            self.should_exit = True

    def _begin_drain(self) -> None:
        logger.info("SIGTERM: draining; no new requests, those in flight have %.0f s to finish "
                    "(a second signal ends them now)", self.shutdown_timeout)
        self.served.start_draining()
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await asyncio.wait_for(self.served.drained(), self.shutdown_timeout)
            logger.info("drained: every request in flight has finished")
        except TimeoutError:
            logger.warning("--shutdown-timeout of %.0f s reached: aborting the requests still "
                           "running", self.shutdown_timeout)
        self.served.abort_all()
        self.should_exit = True

    def engine_died(self, exc: BaseException) -> None:
        """Called on the event loop once the engine loop has died: exit non-zero soon."""
        logger.error("the engine loop died (%r); exiting with status %d so that a supervisor "
                     "restarts the server", exc, EXIT_FAILED)
        self.fail()

    def fail(self, delay: float = DEAD_ENGINE_GRACE_S) -> None:
        """Exit with status 1 after ``delay`` seconds (call it on the event loop)."""
        self.exit_code = EXIT_FAILED
        asyncio.get_running_loop().call_later(delay, self._stop)

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


def make_http_server(app: ASGIApp, host: str, port: int,
                     shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
                     access_log: bool = False,
                     connections: ConnectionLimits | None = None) -> HTTPServer:
    """A server for ``app``; attach the served model once it is loaded.

    uvicorn's own logging stays at warnings unless ``access_log`` (a line per request).
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol  # httptools' if installed, else h11's

    connections = connections or ConnectionLimits()
    config = uvicorn.Config(app, host=host, port=port,
                            log_level="info" if access_log else "warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                            http=guarded_protocol(AutoHTTPProtocol, connections),
                            timeout_keep_alive=connections.timeout_keep_alive)
    return HTTPServer(config, shutdown_timeout)


def run_http_server(server: HTTPServer, sock: socket.socket | None = None) -> int:
    """Serve until a signal (status 0) or a failure (status 1); ``sock``, from
    :func:`bind_socket`, is used instead of binding the configured host and port here."""
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # a SIGINT before uvicorn installed its handlers
        pass
    logger.info("server stopped")
    return server.exit_code
