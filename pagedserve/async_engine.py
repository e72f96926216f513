"""The asyncio front of the engine, for the server.

The engine loop runs in its own thread, so a forward pass never blocks HTTP handling and HTTP
handling never delays a step. A request is made (validated and tokenized) by the caller, in any
thread (the server does it off the event loop for long prompts), then queued from the event
loop: it reaches the engine thread through a locked inbox, and its deltas come back through
its own asyncio queue. A stream that is closed before its request finished (a client that went
away) aborts the request, which frees its KV blocks on the next iteration.

Failures: a request whose step fails is finished by the engine with ``finish_reason "error"``
and the loop goes on (see :meth:`Engine.step`). If the loop itself dies, every open stream gets
an :class:`EngineDeadError`, later submissions are refused with the same error, and
``on_dead`` is called on the event loop, so that the server can exit for its supervisor to
restart it: a process with a dead engine must not look alive.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable

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
    def __init__(self, engine: Engine,
                 on_dead: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.on_dead = on_dead  # called on the event loop once the engine loop has died
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        self._num_held_back = 0  # requests the scheduler could not admit at the last step

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    @property
    def alive(self) -> bool:
        return self.error is None

    def check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine loop failed: {self.error!r}")

    def make_request(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> Request:
        """Validate and tokenize (any thread; raises ValueError for bad input)."""
        return self.engine.make_request(prompt, params, request_id or uuid.uuid4().hex)

    def enqueue(self, request: Request) -> RequestStream:
        """Hand a made request to the engine loop (from the event loop)."""
        self.check_alive()
        if request.request_id in self._streams:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        stream = RequestStream(request.request_id, self)
        self._streams[request.request_id] = stream
        with self._lock:
            self._inbox.append(request)
        self._wake.set()
        return stream

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Make and queue a request; raises ValueError at once for bad input."""
        self.check_alive()
        return self.enqueue(self.make_request(prompt, params, request_id))

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._inbox)

    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def num_queued(self) -> int:
        """Requests that cannot start now, as Ollama's OLLAMA_MAX_QUEUE counts them: those
        the scheduler held back at its last step (no seat or no KV blocks), or those beyond
        ``max_num_seqs`` seats counting the inbox (a burst the engine has not seen yet is
        mostly admitted on its next step, and only its excess waits)."""
        scheduler = self.engine.scheduler
        in_engine = len(scheduler.running) + len(scheduler.waiting)
        over_seats = in_engine + len(self._inbox) - scheduler.max_num_seqs
        return max(over_seats, self._num_held_back)

    # -- the engine thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                with self._lock:
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                outputs: list[RequestOutput] = []
                for request in inbox:
                    try:
                        self.engine.add(request)
                    except Exception as exc:  # noqa: BLE001 - this request fails alone
                        logger.exception("could not add request %s", request.request_id)
                        outputs.append(RequestOutput(
                            request.request_id, "", [], finished=True, finish_reason="error",
                            error=f"{type(exc).__name__}: {exc}"))
                for request_id in aborts:
                    out = self.engine.abort_request(request_id)
                    if out is not None:
                        outputs.append(out)
                if self.engine.has_unfinished_requests():
                    outputs.extend(self.engine.step())
                self._num_held_back = len(self.engine.scheduler.waiting)
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
        if self.on_dead is not None:
            self.on_dead(exc)
