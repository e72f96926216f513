"""The connection guard: how long a client may take to send its request, and how many
connections may be open (:class:`ConnectionLimits`, ``pagedserve serve``'s flags).

uvicorn closes a keep-alive connection that stays idle (``timeout_keep_alive``), but it waits
for ever for a request that arrives slowly: a client that sends its headers a byte a second (a
"slowloris") holds a connection, its buffer and a file descriptor as long as it likes, and
nothing bounds how many it holds. :func:`guarded_protocol` adds both to uvicorn's HTTP
protocol. A deadline per connection:

    a request's headers   must all arrive within ``timeout_request_read`` seconds of its first
                          byte (of the connection being opened, for the first request)
    its body              must all arrive within ``timeout_request_read`` seconds of the
                          headers, plus one second for every ``min_upload_rate`` bytes received

The body's rule is Apache mod_reqtimeout's: an upload that keeps coming at a modest rate passes
however large it is (the body limit bounds it), a trickle is cut off. The rest of a body that
was answered without being read (a 401, a 413) is held to the same rule. A connection past its
deadline is closed, after a 408 when it was still sending headers, with one info line. No
deadline runs while the application answers: a long stream is not a slow request.

And a cap: while more than ``limit_concurrency`` connections are open or requests running, a
new request is answered 503 with Retry-After in its API's error shape, except the operator's
routes (``/health``, ``/ready``, ``/metrics``, ``/version``, ``/``), so that a crowd of clients
cannot make a liveness probe fail and the pod restart. (uvicorn's own ``limit_concurrency``
answers probes 503 too and logs a warning per refused request.)

The guard sees a request through the application uvicorn calls for it, which it does once the
headers are parsed, and the ``receive`` it hands that application, which yields the body; both
uvicorn protocols, h11's and httptools', keep that application in ``self.app`` and the open
connections and running requests in ``self.connections`` and ``self.tasks``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.server.errors import APIError, error_response
from pagedserve.server.limits import ConnectionLimits

logger = logging.getLogger(__name__)

OPERATOR_PATHS = frozenset({"/health", "/ready", "/metrics", "/version", "/"})
BUSY_WARNING_EVERY_S = 60.0

_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: 16\r\nconnection: close\r\n\r\nRequest Timeout\n")


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits
                     ) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol ``base`` (h11's or httptools') with the deadline and the cap;
    give uvicorn no ``limit_concurrency`` of its own."""
    return type(f"Guarded{base.__name__}", (_Guard, base),
                {"timeout": limits.timeout_request_read, "min_rate": limits.min_upload_rate,
                 "limit": limits.limit_concurrency, "warned_at": [None]})


class _Guard:
    """Mixed in before a uvicorn protocol class; the class attributes come from
    :func:`guarded_protocol`.

    The phase says what the deadline waits for: ``headers`` (armed by the first byte of a
    request), ``body`` (armed when the application is called for a request with a body),
    ``drain`` (bytes after an answer that left the body unread: its rest, then maybe the next
    request), ``answer`` (the application answers: no deadline) or None (between requests:
    uvicorn's keep-alive timer closes the connection if nothing comes).
    """

    timeout: ClassVar[float]
    min_rate: ClassVar[int]
    limit: ClassVar[int | None]
    warned_at: ClassVar[list[float | None]]  # when the cap was last logged, by any connection
    # uvicorn's protocol sets these
    app: ASGIApp
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    connections: set
    tasks: set

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._application = self.app
        self.app = self._guarded_app
        self._phase: str | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._started = 0.0  # when the body (or the drain) began
        self._received = 0  # bytes of it so far
        self._unread_body = False

    # -- uvicorn's protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._expect("headers")

    def data_received(self, data: bytes) -> None:
        if self._phase is None:
            self._expect("drain" if self._unread_body else "headers")
        if self._phase == "drain":
            self._received += len(data)
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm(None)
        super().connection_lost(exc)  # type: ignore[misc]

    # -- the application, as this connection calls it ------------------------------------------

    async def _guarded_app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._application(scope, receive, send)
            return
        has_body = _has_body(scope)
        self._unread_body = has_body
        if not has_body:
            self._disarm("answer")
        else:
            self._expect("body")

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                self._received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    self._unread_body = False
                    self._disarm("answer")
            else:  # http.disconnect
                self._disarm("answer")
            return message

        try:
            if self._over_limit(scope):
                await self._busy(scope, receive, send)
            else:
                await self._application(scope, counting_receive if has_body else receive, send)
        finally:
            self._disarm(None)

    def _over_limit(self, scope: Scope) -> bool:
        if self.limit is None or scope["path"] in OPERATOR_PATHS:
            return False
        return len(self.connections) > self.limit or len(self.tasks) > self.limit

    async def _busy(self, scope: Scope, receive: Receive, send: Send) -> None:
        open_, running = len(self.connections), len(self.tasks)
        now = self.loop.time()
        if self.warned_at[0] is None or now - self.warned_at[0] >= BUSY_WARNING_EVERY_S:
            self.warned_at[0] = now
            logger.warning("%d connections open, %d requests running: past --limit-concurrency "
                           "%d, new requests get 503 (logged at most once a minute)",
                           open_, running, self.limit)
        response = error_response(scope["path"], APIError(
            503, f"Server busy: {max(open_, running)} connections or requests, the limit is "
            f"{self.limit}; please retry.", code="server_busy", headers={"Retry-After": "1"}))
        await response(scope, receive, send)

    # -- the deadline --------------------------------------------------------------------------

    def _expect(self, phase: str) -> None:
        self._disarm(phase)
        self._started = self.loop.time()
        self._received = 0
        self._timer = self.loop.call_at(self._started + self.timeout, self._expired)

    def _disarm(self, phase: str | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = phase

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        if self._phase in ("body", "drain"):
            deadline = self._started + self.timeout + self._received / self.min_rate
            if self.loop.time() < deadline:  # the body kept coming: its deadline moved
                self._timer = self.loop.call_at(deadline, self._expired)
                return
            if self._phase == "drain":  # or the client simply went quiet afterwards
                logger.debug("closed the connection of %s: nothing more within the read "
                             "timeout after an answer that left its body unread", client)
            else:
                logger.info("closed the connection of %s: its request body came slower than "
                            "%d bytes/s after %.0f s (%d bytes; --timeout-request-read, "
                            "--min-upload-rate)", client, self.min_rate, self.timeout,
                            self._received)
        elif self._phase == "headers":
            logger.info("closed the connection of %s: no complete request headers within "
                        "%.0f s (--timeout-request-read)", client, self.timeout)
            self.transport.write(_REQUEST_TIMEOUT)
        else:
            return
        self._disarm(None)
        self.transport.close()


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"", b"0")
        if name == b"transfer-encoding":
            return True
    return False
