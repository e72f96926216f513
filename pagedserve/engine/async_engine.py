"""The server's asyncio front of the engine: requests in, a stream of deltas per request out.

Who does what: the front end (this object, on the server's event loop) validates and tokenizes
(:class:`InputProcessor`, in any thread: the server does long prompts off the loop), hands the
request to the engine core through a client, and turns the core's token ids into text deltas
(:class:`OutputProcessor`), which reach each request's :class:`RequestStream`. The core runs
elsewhere: in a process of its own (:class:`~pagedserve.engine.core_client.MPClient`, what
``serve`` uses) or in a thread (:class:`~pagedserve.engine.core_client.InprocClient`), so a
forward pass never blocks HTTP handling and HTTP handling never delays a step.

Who frees what: a stream that is closed before its request finished (a client that went away)
aborts it here at once (its caller gets nothing more) and in the core, which frees its KV
blocks on its next iteration. A stop string found here ends the request here and is aborted in
the core the same way.

Embedding requests take the same way (:meth:`AsyncEngine.make_embed_request`, then
:meth:`AsyncEngine.enqueue_embedding`), answered by one future each with the vectors of all its
inputs: the core embeds them in batches with other requests' between its steps.

Failures: a request whose step fails is finished by the core with ``finish_reason "error"`` and
the others go on. If the core itself dies (its loop failed, or its process is gone), every open
stream gets an :class:`EngineDeadError`, later submissions are refused with the same error, and
``on_dead`` is called on the event loop, so that the server can exit for its supervisor to
restart it: a process with a dead engine must not look alive.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from pagedserve.engine.core_client import EngineCoreClient
from pagedserve.engine.info import EngineInfo
from pagedserve.engine.input_processor import InputProcessor
from pagedserve.engine.llm_engine import EngineObserver, notify
from pagedserve.engine.messages import (
    EmbedRequest,
    EmbedResult,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
)
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.errors import EngineBusyError, EngineDeadError
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "RequestStream"]


class RequestStream:
    """Async iterator over one request's deltas; ends after the finished one.

    Deltas its consumer has not taken yet are merged into one (text and tokens appended), so a
    consumer slower than the engine (a busy event loop, a slow client) gets several tokens per
    delta instead of a queue that grows, as vLLM's output collector does.
    """

    def __init__(self, request_id: str, engine: AsyncEngine):
        self.request_id = request_id
        self._engine = engine
        self._pending: RequestOutput | BaseException | None = None
        self._ready = asyncio.Event()
        # the core's verdict on taking the request in: None, or the output that refused it
        self._verdict: asyncio.Future[RequestOutput | None] = \
            asyncio.get_running_loop().create_future()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        pending = self._pending
        if isinstance(pending, BaseException):
            return  # an error ends the stream; nothing after it matters
        if pending is None or isinstance(item, BaseException):
            self._pending = item
        else:
            _merge(pending, item)
        self._ready.set()
        if not self._verdict.done():
            refused = isinstance(item, RequestOutput) and (item.client_error or item.busy)
            self._verdict.set_result(item if refused else None)

    def admitted(self) -> None:
        """The core has taken the request in (its grammar compiled)."""
        if not self._verdict.done():
            self._verdict.set_result(None)

    async def wait_admitted(self) -> None:
        """Wait until the core has taken the request in (or ended it); raises ValueError (its
        message names the field) if the core refused it as the client's fault, e.g. a
        constraint that does not compile, EngineBusyError if it could not take it in now."""
        refusal = await self._verdict
        if refusal is not None and refusal.busy:
            raise EngineBusyError(refusal.error)
        if refusal is not None:
            raise ValueError(refusal.error)

    def abort(self) -> None:
        if not self.finished:
            self._engine.abort(self.request_id)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                if self._pending is None:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                item, self._pending = self._pending, None
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
        finally:
            self.abort()  # a no-op unless the consumer left early


def _merge(into: RequestOutput, new: RequestOutput) -> None:
    into.delta_text += new.delta_text
    into.delta_token_ids = into.delta_token_ids + new.delta_token_ids
    if new.delta_logprobs is not None:
        into.delta_logprobs = (into.delta_logprobs or []) + new.delta_logprobs
    if new.prompt_logprobs is not None:  # sent once: the merged output is the first with it
        into.prompt_logprobs, into.prompt_token_ids = new.prompt_logprobs, new.prompt_token_ids
    into.finished, into.finish_reason, into.stop_reason = (new.finished, new.finish_reason,
                                                          new.stop_reason)
    into.error, into.client_error, into.busy = new.error, new.client_error, new.busy
    into.num_prompt_tokens, into.num_output_tokens = new.num_prompt_tokens, new.num_output_tokens
    into.num_cached_tokens, into.metrics = new.num_cached_tokens, new.metrics


class AsyncEngine:
    def __init__(self, client: EngineCoreClient,
                 on_dead: Callable[[BaseException], None] | None = None,
                 client_index: int = 0):
        self.client = client
        self.info: EngineInfo = client.info
        self.on_dead = on_dead  # called on the event loop once the core has died
        self.inputs = InputProcessor(self.info, client_index)
        self.outputs = OutputProcessor(self.info.tokenizer)
        self.observers: list[EngineObserver] = []
        self._streams: dict[str, RequestStream] = {}
        self._compiling: set[str] = set()  # constrained requests the core has not admitted yet
        self._embeddings: dict[str, asyncio.Future[EmbedResult]] = {}  # sent, not answered
        self.error: BaseException | None = None
        self.grammar_compile_observers: list[Callable[[float], None]] = []

    def start(self) -> None:
        """Connect to the core (on the event loop that will serve the streams)."""
        self.client.start(self._on_outputs, self._on_dead)

    async def shutdown(self) -> None:
        await self.client.shutdown()

    @property
    def alive(self) -> bool:
        return self.error is None

    def check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine core failed: {self.error}")

    def stats(self) -> EngineStats:
        """The core's gauges and counters, as of its latest news (what /metrics shows)."""
        return self.client.stats()

    # -- requests ------------------------------------------------------------------------------
    def make_request(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> EngineCoreRequest:
        """Validate and tokenize (any thread; raises ValueError for bad input)."""
        return self.inputs.make_request(prompt, params, request_id or uuid.uuid4().hex)

    def enqueue(self, request: EngineCoreRequest) -> RequestStream:
        """Hand a made request to the core (from the event loop)."""
        self.check_alive()
        if request.request_id in self._streams:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        stream = RequestStream(request.request_id, self)
        self._streams[request.request_id] = stream
        self.outputs.add_request(request)
        if request.params.constraint is not None:
            self._compiling.add(request.request_id)
        self.client.add_request(request)
        return stream

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> RequestStream:
        """Make and queue a request; raises ValueError at once for bad input."""
        self.check_alive()
        return self.enqueue(self.make_request(prompt, params, request_id))

    def make_embed_request(self, inputs: Sequence[str] | Sequence[Sequence[int]], *,
                           truncate: bool = True, normalize: bool = True,
                           dimensions: int | None = None) -> EmbedRequest:
        """Validate and tokenize texts to embed (any thread; raises ValueError for bad
        input, naming ``input`` or ``dimensions``)."""
        return self.inputs.make_embed_request(inputs, truncate=truncate, normalize=normalize,
                                              dimensions=dimensions,
                                              request_id=f"embd-{uuid.uuid4().hex}")

    def enqueue_embedding(self, request: EmbedRequest) -> asyncio.Future[EmbedResult]:
        """Hand a made embedding request to the core (from the event loop); the future gets
        its result (which may carry an error), or EngineDeadError. Cancel it, or
        :meth:`abort` its id, when its caller goes away."""
        self.check_alive()
        if request.request_id in self._embeddings:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        future = asyncio.get_running_loop().create_future()
        self._embeddings[request.request_id] = future
        future.add_done_callback(functools.partial(self._embedding_done, request.request_id))
        self.client.add_embed_request(request)
        return future

    def _embedding_done(self, request_id: str, future: asyncio.Future[EmbedResult]) -> None:
        if future.cancelled():  # its caller went away (a client that disconnected)
            self.abort(request_id)

    def num_embedding_requests(self) -> int:
        """Embedding requests sent to the core and not yet answered."""
        return len(self._embeddings)

    def abort(self, request_id: str) -> None:
        """End a request now for its caller; the core frees its blocks on its next iteration."""
        future = self._embeddings.pop(request_id, None)
        if future is not None:
            future.cancel()
            self.client.abort_requests([request_id])
            return
        out = self.outputs.abort(request_id)
        if out is None:
            return
        self._compiling.discard(request_id)
        self._deliver([out])
        self.client.abort_requests([request_id])

    # -- admission control ---------------------------------------------------------------------
    def num_waiting(self) -> int:
        """Requests not running: waiting for a seat, or for their grammar."""
        stats = self.client.stats()
        return max(stats.num_waiting, len(self._compiling) + self._over_seats(stats))

    def num_running(self) -> int:
        return self.client.stats().num_running

    def num_queued(self) -> int:
        """Requests that cannot start now, as Ollama's OLLAMA_MAX_QUEUE counts them: those
        beyond the batch's seats, counting every request this front end has sent and not seen
        end (a burst the core has not reported on yet is mostly admitted on its next step, and
        only its excess waits), or those the core held back at its latest report; plus those
        whose grammar is still compiling, which hold no seat yet but will want one; plus the
        embedding requests the core has not answered yet."""
        stats = self.client.stats()
        held_back = stats.num_waiting - stats.num_waiting_for_grammar
        return (max(self._over_seats(stats), held_back) + len(self._compiling)
                + len(self._embeddings))

    def _over_seats(self, stats: EngineStats) -> int:
        in_core = max(len(self.outputs) - len(self._compiling),
                      stats.num_running + stats.num_waiting - stats.num_waiting_for_grammar)
        return max(0, in_core - self.info.max_num_seqs)

    # -- from the core (on the event loop) -----------------------------------------------------
    def _on_outputs(self, outputs: EngineCoreOutputs) -> None:
        for seconds in outputs.grammar_compile_seconds:
            for observe in self.grammar_compile_observers:
                observe(seconds)
        for answer in outputs.embeddings:
            future = self._embeddings.pop(answer.request_id, None)
            if future is not None and not future.done():
                future.set_result(answer)
        processed = self.outputs.process(outputs)
        for request_id in processed.admitted:
            self._compiling.discard(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.admitted()
        if processed.to_abort:
            self.client.abort_requests(processed.to_abort)
        notify(self.observers, outputs.step, processed.outputs)
        for out in processed.outputs:
            self._compiling.discard(out.request_id)
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
                if out.finished:
                    del self._streams[out.request_id]

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        notify(self.observers, None, outputs)
        for out in outputs:
            stream = self._streams.pop(out.request_id, None) if out.finished else \
                self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _on_dead(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        logger.error("the engine core failed: %s", exc)
        self.error = exc
        for stream in self._streams.values():
            stream.put(EngineDeadError(f"the engine core failed: {exc}"))
        self._streams.clear()
        for future in self._embeddings.values():
            if not future.done():
                future.set_exception(EngineDeadError(f"the engine core failed: {exc}"))
        self._embeddings.clear()
        if self.on_dead is not None:
            self.on_dead(exc)
