"""Long text work off the event loop, a bounded amount of it at a time.

Parsing, rendering, tokenizing or detokenizing a long text, and encoding its thousands of token
ids as JSON, take milliseconds to seconds: on the event loop they would stall every stream the
server is sending. In worker threads without a bound, a flood of them piles up memory (each
holds its text, its ids and the tokenizer's encoding) and competes with the engine for the
CPU. :class:`WorkerThreads` lets ``size`` such requests work at once and ``backlog`` more wait
for them; beyond that a request is answered 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from pagedserve.server.errors import APIError

DEFAULT_SIZE = 1  # tokenizing the longest prompt takes ~100 MB; the engine needs the cores
DEFAULT_BACKLOG = 16


class WorkerThreads:
    def __init__(self, size: int = DEFAULT_SIZE, backlog: int = DEFAULT_BACKLOG) -> None:
        if size < 1 or backlog < 0:
            raise ValueError(f"size must be >= 1 and backlog >= 0, got {size} and {backlog}")
        self.size = size
        self.backlog = backlog
        self.waiting = 0
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the ``size`` slots for the block (its work goes to threads with
        ``asyncio.to_thread``); 503 when every slot is taken and ``backlog`` wait already."""
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
