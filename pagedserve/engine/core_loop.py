"""The busy loop around an :class:`EngineCore`: take what the front ends sent, step, send back.

One iteration::

    inputs   AddRequest -> core.add_request  (a request the core refuses ends at once: error)
             AbortRequests -> core.abort_requests (their final outputs go out this iteration)
             AddEmbedRequest -> core.embeddings (EmbeddingQueue)
    step     when a request can run; a core that only waits for grammars does not spin
    emit     one EngineCoreOutputs per front end with news: its requests' outputs, and the
             stats every front end shows on /metrics
    embed    when embedding requests wait: one batch of them (core.embeddings.run, bounded
             by a token budget), between two steps, and its results emitted at once

The same loop runs in a thread of the server's process (:class:`InprocClient`, tests) and in
the engine-core process (:mod:`pagedserve.engine.core_process`); only how messages arrive and
leave differs. Front end ``i`` gets the outputs of the requests it sent (``client_index``);
step statistics and grammar timings go to front end 0 alone, so that histograms summed over
several front ends count each step once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from pagedserve.engine.core import EngineCore
from pagedserve.engine.encoder_core import EncoderCore
from pagedserve.engine.messages import (
    AbortRequests,
    AddEmbedRequest,
    AddRequest,
    CoreInput,
    EmbedResult,
    EngineCoreOutput,
    EngineCoreOutputs,
)

logger = logging.getLogger(__name__)

GRAMMAR_WAIT_S = 0.02  # a core with nothing to run but compiling grammars looks again this often

Emit = Callable[[int, EngineCoreOutputs], None]  # (front end index, its message)


class CoreLoop:
    def __init__(self, core: EngineCore | EncoderCore, emit: Emit, num_clients: int = 1
                 ) -> None:
        self.core = core
        self.emit = emit
        self.num_clients = num_clients
        self._client_of: dict[str, int] = {}  # request id -> front end, with several
        self._pending: list[EngineCoreOutput] = []  # outputs of the inputs, not yet sent
        self._stats_stale = False  # inputs changed the queues: the front ends' gauges lag

    def handle(self, message: CoreInput) -> None:
        self._stats_stale = True
        if isinstance(message, AddRequest):
            request = message.request
            if self.num_clients > 1:
                self._client_of[request.request_id] = request.client_index
            try:
                self.core.add_request(request)
            except ValueError as exc:  # the request's own fault: its field is named
                self._pending.append(EngineCoreOutput(
                    request.request_id, finish_reason="error", error=str(exc),
                    client_error=True))
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                logger.exception("could not add request %s", request.request_id)
                self._pending.append(EngineCoreOutput(
                    request.request_id, finish_reason="error",
                    error=f"{type(exc).__name__}: {exc}"))
        elif isinstance(message, AddEmbedRequest):
            if self.num_clients > 1:
                self._client_of[message.request.request_id] = message.request.client_index
            self.core.embeddings.add(message.request)
        elif isinstance(message, AbortRequests):
            self._pending.extend(self.core.abort_requests(message.request_ids))
            self.core.embeddings.abort(message.request_ids)

    @property
    def busy(self) -> bool:
        """A step or an embedding batch would compute something now."""
        return self.core.has_runnable_requests() or self.core.embeddings.has_work

    @property
    def waiting_for_grammars(self) -> bool:
        return self.core.has_unfinished_requests() and not self.core.has_runnable_requests()

    def run_once(self) -> None:
        """Step if there is work, and send out everything this iteration produced; then embed
        a batch if embedding requests wait, and send their vectors."""
        if self.core.has_runnable_requests():
            result = self.core.step()
            if self._pending:
                result.outputs = self._pending + result.outputs
                self._pending = []
            self._send(result)
        elif self._pending or self._stats_stale:  # e.g. a request now waits for its grammar
            self._send(EngineCoreOutputs(self._pending, time.monotonic(), None,
                                         self.core.stats()))
            self._pending = []
        self._stats_stale = False
        if self.core.embeddings.has_work:
            embedded = self.core.embeddings.run()
            self._send(EngineCoreOutputs(timestamp=time.monotonic(), stats=self.core.stats(),
                                         embeddings=embedded))

    def _send(self, result: EngineCoreOutputs) -> None:
        if self.num_clients == 1:
            self.emit(0, result)
            return
        per_client: list[list[EngineCoreOutput]] = [[] for _ in range(self.num_clients)]
        for out in result.outputs:
            index = (self._client_of.pop(out.request_id, 0) if out.finish_reason is not None
                     else self._client_of.get(out.request_id, 0))
            per_client[index].append(out)
        embedded: list[list[EmbedResult]] = [[] for _ in range(self.num_clients)]
        for answer in result.embeddings:
            embedded[self._client_of.pop(answer.request_id, 0)].append(answer)
        for index, outputs in enumerate(per_client):
            if index == 0:
                self.emit(0, EngineCoreOutputs(outputs, result.timestamp, result.step,
                                               result.stats, result.grammar_compile_seconds,
                                               embeddings=embedded[0]))
            else:
                self.emit(index, EngineCoreOutputs(outputs, result.timestamp, None,
                                                   result.stats, embeddings=embedded[index]))
