"""Long text work off the event loop, in threads of its own, a bounded amount at a time.

Parsing, tokenizing or detokenizing a long text, and encoding its thousands of token ids as
JSON, take milliseconds to seconds of CPU: on the event loop they would stall every stream the
server is sending, and in threads without a bound a flood of them piles up memory (each holds
its text, its ids and the tokenizer's encoding: about a hundred MB for the longest prompt a
context admits) and takes the cores the engine computes on. :class:`WorkSlots` lets ``size``
requests hold a slot at once and ``backlog`` more wait for one, beyond that a request is
answered 503 with Retry-After, and runs the work of those holding one in ``size`` threads of
its own: few threads, so that the allocator keeps few per-thread arenas of freed memory.

The threads run at the engine's priority: a niced thread would hold the GIL while the OS ran
everything else first, and the event loop and the engine would wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pagedserve.server.errors import APIError

T = TypeVar("T")

DEFAULT_SIZE = 1
DEFAULT_BACKLOG = 8


class WorkSlots:
    """``size`` slots and threads and a waiting line of ``backlog``; an asyncio object of one
    event loop."""

    def __init__(self, size: int = DEFAULT_SIZE, backlog: int = DEFAULT_BACKLOG) -> None:
        if size < 1 or backlog < 0:
            raise ValueError(f"size must be >= 1 and backlog >= 0, got {size} and {backlog}")
        self.size = size
        self.backlog = backlog
        self.waiting = 0
        self._slots = asyncio.Semaphore(size)
        self._threads = ThreadPoolExecutor(size, thread_name_prefix="pagedserve-text")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``size`` slots for the block, whose work goes to :meth:`call`; 503
        when every slot is taken and ``backlog`` requests wait already."""
        if self._slots.locked() and self.waiting >= self.backlog:
            raise APIError(503, f"Server busy: {self.size + self.waiting} long texts are being "
                           "tokenized or waiting for it; please retry.", code="server_busy",
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of the threads (hold a slot meanwhile)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(fn, *args))

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
