"""A lean HTTP/1.1 client for streamed answers: what the load generator sends its requests with.

A load generator shares the machine with the server it measures, and a general HTTP client
costs about 0.4 ms of CPU per streamed token (httpx: its connection pool, its decoders, an
object per chunk). At 10,000 tokens a second that is four cores of Python the server does not
get, or, in one asyncio process, a ceiling below the server's. This client speaks only what a
benchmark needs, over asyncio streams: ``POST`` with a JSON body on kept-alive connections, a
response read as lines (SSE or NDJSON), chunked or sized. It keeps httpx's calling shape
(``stream(...)`` as an async context manager, ``status_code``, ``aread``, ``aiter_lines``) and
raises httpx's transport errors, so the API clients take either.

Plain ``http://`` only: benchmarks against a TLS endpoint use httpx (see LoadGenerator).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx

MAX_LINE = 1 << 24  # an SSE event's line: a top-logprobs event can be long


class StreamingHTTP:
    def __init__(self, base_url: str, timeout: float = 600.0, connect_timeout: float = 30.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"StreamingHTTP speaks plain http://host:port, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._host_header = f"{self.host}:{self.port}".encode()

    async def __aenter__(self) -> StreamingHTTP:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            writer.close()

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, json: dict | None = None
                     ) -> AsyncIterator[Response]:
        body = _dumps(json)
        head = (f"{method} {self.prefix}{url} HTTP/1.1\r\n".encode()
                + b"Host: " + self._host_header + b"\r\nContent-Type: application/json\r\n"
                + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        reader, writer, reused = await self._connection()
        response = Response(reader, writer)
        try:
            async with asyncio.timeout(self.timeout):  # the whole answer, however read
                writer.write(head + body)
                try:
                    await response.read_head()
                except httpx.RemoteProtocolError:
                    if not reused or response.status_code:
                        raise
                    # A kept-alive connection the server closed after its last answer (llama.cpp's
                    # server does after every stream, whatever its Keep-Alive header says), its
                    # FIN not read yet: nothing of this request was answered, so send it again on
                    # a new connection, as HTTP clients do.
                    writer.close()
                    reader, writer, _ = await self._connection(fresh=True)
                    response = Response(reader, writer)
                    writer.write(head + body)
                    await response.read_head()
                yield response
                await response.finish()
        except OSError as exc:
            writer.close()
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from exc
        except TimeoutError as exc:
            writer.close()
            raise httpx.ReadTimeout("no answer in time") from exc
        except BaseException:
            writer.close()  # left mid-answer: the connection is not reusable
            raise
        if response.reusable:
            self._idle.append((reader, writer))
        else:
            writer.close()

    async def _connection(self, fresh: bool = False
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A kept-alive connection (reused: True), else a new one."""
        while self._idle and not fresh:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=MAX_LINE),
                self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise httpx.ConnectError(f"cannot connect to {self.host}:{self.port}: {exc}") \
                from exc
        return reader, writer, False


class Response:
    """One answer: status and headers read, the body read on demand (once)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.status_code = 0
        self.headers: dict[str, str] = {}
        self._chunked = False
        self._remaining: int | None = None  # Content-Length left to read
        self._done = False
        self.reusable = False

    async def read_head(self) -> None:
        status = await self._line()
        try:
            self.status_code = int(status.split(b" ", 2)[1])
        except (IndexError, ValueError):
            raise httpx.RemoteProtocolError(f"not an HTTP status line: {status[:80]!r}") \
                from None
        while (line := await self._line()) not in (b"\r\n", b"\n"):
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        if not self._chunked and "content-length" in self.headers:
            self._remaining = int(self.headers["content-length"])
        keep = self.headers.get("connection", "").lower() != "close"
        self.reusable = keep and (self._chunked or self._remaining is not None)

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._done:
            return
        if self._chunked:
            while True:
                size = int((await self._line()).split(b";")[0].strip(), 16)
                data = await self._exactly(size + 2)
                if size == 0:
                    break
                yield data[:-2]
        elif self._remaining is not None:
            while self._remaining:
                data = await self._wait(self._reader.read(min(self._remaining, 1 << 16)))
                if not data:
                    raise httpx.RemoteProtocolError("the server closed mid-answer")
                self._remaining -= len(data)
                yield data
        else:
            while data := await self._wait(self._reader.read(1 << 16)):
                yield data
        self._done = True

    async def aiter_lines(self) -> AsyncIterator[str]:
        pending = b""
        async for data in self.aiter_bytes():
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode()
        if pending:
            yield pending.rstrip(b"\r").decode()

    async def aread(self) -> bytes:
        return b"".join([data async for data in self.aiter_bytes()])

    async def finish(self) -> None:
        """Read what is left, so the connection can carry the next request."""
        async for _ in self.aiter_bytes():
            pass

    async def _line(self) -> bytes:
        line = await self._wait(self._reader.readuntil(b"\n"))
        return line

    async def _exactly(self, n: int) -> bytes:
        return await self._wait(self._reader.readexactly(n))

    async def _wait(self, awaitable):
        try:
            return await awaitable
        except asyncio.IncompleteReadError as exc:
            raise httpx.RemoteProtocolError("the server closed mid-answer") from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("a line longer than the limit") from exc


def _dumps(body: dict | None) -> bytes:
    return b"" if body is None else json.dumps(body).encode()
