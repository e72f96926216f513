"""The asyncio front of the engine, for the server.

The engine loop runs in its own thread, so a forward pass never blocks HTTP handling and HTTP
handling never delays a step. Requests are validated and tokenized in the caller's thread (a bad
request fails at once), handed to the loop through a locked inbox, and each request's deltas
come back through its own asyncio queue. A stream that is closed before its request finished
(a client that went away) aborts the request, which frees its KV blocks on the next iteration.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from pagedserve.engine import Engine
from pagedserve.outputs import RequestOutput
from pagedserve.request import Request
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the request cannot complete."""


class RequestStream:
    """Async iterator over one request's deltas; ends after the finished one."""

    def __init__(self, request_id: str, engine: AsyncEngine):
        self.request_id = request_id
        self._engine = engine
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def abort(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            self.abort()  # a no-op unless the consumer left early


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request; raises ValueError at once for bad input."""
        if self.error is not None:
            raise EngineDeadError(f"the engine loop failed: {self.error!r}")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        request = self.engine.make_request(prompt, params, request_id)
        stream = RequestStream(request_id, self)
        self._streams[request_id] = stream
        with self._lock:
            self._inbox.append(request)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                outputs: list[RequestOutput] = []
                for request in inbox:
                    self.engine.add(request)
                for request_id in aborts:
                    out = self.engine.abort_request(request_id)
                    if out is not None:
                        outputs.append(out)
                if self.engine.has_unfinished_requests():
                    outputs.extend(self.engine.step())
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
                elif not self.engine.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
        except BaseException as exc:  # the loop must never die silently
            logger.exception("engine loop failed")
            self.error = exc
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, exc: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine loop failed: {exc!r}"))
        self._streams.clear()
