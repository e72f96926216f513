"""The load generator's HTTP client (bench/http_stream.py) against raw servers that behave as
real ones do: chunked SSE on a kept-alive connection, a server that closes the connection after
every answer whatever its Keep-Alive header says (llama.cpp's), and one that answers nothing."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pagedserve.bench.http_stream import StreamingHTTP

EVENTS = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]


def _chunked(parts: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Keep-Alive: timeout=5, max=100\r\n\r\n" + body + b"0\r\n\r\n")


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return await reader.readexactly(length)


async def _serve(handler) -> tuple[asyncio.Server, str, list[int]]:
    connections: list[int] = []

    async def on_connect(reader, writer):
        connections.append(1)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", connections


async def _lines(http: StreamingHTTP) -> list[str]:
    async with http.stream("POST", "/v1/completions", json={"prompt": "hi"}) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines() if line]


def test_a_kept_alive_connection_carries_the_next_stream():
    async def keep_alive(reader, writer):
        while True:
            await _read_request(reader)
            writer.write(_chunked(EVENTS))
            await writer.drain()

    async def main():
        server, url, connections = await _serve(keep_alive)
        async with server, StreamingHTTP(url) as http:
            first, second = await _lines(http), await _lines(http)
        assert first == second == ['data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]
        assert len(connections) == 1

    asyncio.run(main())


def test_a_server_that_closes_after_each_answer_gets_the_next_request_on_a_new_connection():
    async def one_answer(reader, writer):
        await _read_request(reader)
        writer.write(_chunked(EVENTS))
        await writer.drain()  # then closes, though its header said keep-alive

    async def main():
        server, url, connections = await _serve(one_answer)
        async with server, StreamingHTTP(url) as http:
            answers = [await _lines(http) for _ in range(3)]
        assert all(a[-1] == "data: [DONE]" for a in answers)
        assert len(connections) == 3

    asyncio.run(main())


def test_a_new_connection_closed_without_an_answer_is_an_error_not_a_retry():
    async def nothing(reader, writer):
        await _read_request(reader)

    async def main():
        server, url, connections = await _serve(nothing)
        async with server, StreamingHTTP(url) as http:
            with pytest.raises(httpx.RemoteProtocolError, match="closed mid-answer"):
                await _lines(http)
        assert len(connections) == 1

    asyncio.run(main())
