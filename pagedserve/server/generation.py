"""One HTTP request's engine requests, merged into one stream of ``(index, RequestOutput)``.

An OpenAI request with ``n`` choices (or a batch of prompts) becomes several engine requests;
their deltas interleave as the engine produces them, each tagged with its choice index. Leaving
the stream early (the client went away, the handler failed) aborts every request still running,
so its KV blocks are freed at once rather than when it would have finished.

Failures come out as :class:`APIError`: a request the engine finished with ``"error"`` is a 500
(the server failed on it; other requests go on), a dead engine loop a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, TypeVar

from starlette.requests import Request

from pagedserve.errors import EngineDeadError
from pagedserve.outputs import RequestOutput
from pagedserve.server.errors import APIError

if TYPE_CHECKING:
    from pagedserve.engine.async_engine import RequestStream

logger = logging.getLogger(__name__)

_DONE = object()
T = TypeVar("T")


class Generation:
    """The engine requests behind one API call; iterate for ``(index, output)`` deltas."""

    def __init__(self, streams: Sequence[RequestStream]) -> None:
        self.streams = list(streams)
        self._finished: set[int] = set()

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def finished(self) -> bool:
        """Every engine request has ended (finished, failed or aborted)."""
        return len(self._finished) == len(self.streams)

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            if len(self.streams) == 1:
                async for output in self.streams[0]:
                    self._note(0, output)
                    yield 0, output
            else:
                async for index, output in self._merged():
                    yield index, output
        except EngineDeadError as exc:
            raise APIError.engine_dead(exc) from exc
        finally:
            self.abort()

    def abort(self) -> None:
        """Abort every engine request that has not finished; idempotent."""
        for index, stream in enumerate(self.streams):
            if index not in self._finished:
                self._finished.add(index)
                logger.debug("aborting request %s", stream.request_id)
                stream.abort()

    def _note(self, index: int, output: RequestOutput) -> None:
        if output.finished:
            self._finished.add(index)
        if output.finish_reason == "error" and output.busy:
            raise APIError(503, f"Server busy: {output.error}; please retry.",
                           code="server_busy", headers={"Retry-After": "1"})
        if output.finish_reason == "error" and output.client_error:
            field = (output.error or "").split(":", 1)[0]
            raise APIError.bad_request(output.error or "bad request", param=field)
        if output.finish_reason == "error":
            raise APIError(500, f"The server failed on this request: {output.error}",
                           code="engine_error")

    async def _merged(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for output in stream:
                    await queue.put((index, output))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                await queue.put((index, exc))
            finally:
                await queue.put((index, _DONE))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is _DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    self._note(index, item)
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class ClientDisconnected(Exception):
    """The client went away before its non-streamed answer was ready."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it and raise.

    For non-streamed answers: nothing is written until the end, so only listening for the
    ``http.disconnect`` message notices a client that gave up. Cancelling ``work`` unwinds its
    ``async for`` over a :class:`Generation`, which aborts the engine requests. (Streamed answers
    notice a disconnect when Starlette cancels the response's iterator.)
    """

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        logger.info("client disconnected from %s; its requests were aborted", request.url.path)
        raise ClientDisconnected
    return task.result()
