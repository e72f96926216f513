"""EmbeddingQueue: the engine core's embedding requests, embedded in batches between steps.

Requests arrive tokenized and checked (the front end did both, :class:`EmbeddingInputs`). Each
iteration of the core loop (:meth:`CoreLoop.run_once`, after the generation step) :meth:`run`
takes what is pending, in arrival order, up to a token budget, and embeds it with one
:meth:`Embedder.embed` call, which packs the inputs into forward passes by length. Whole
requests are taken while they fit; the request that does not is split, its first inputs now
and the rest in the next iterations (an iteration always takes at least one input, however
long). A request is answered once all its inputs are embedded::

    pending     r0 [a b c]   r1 [a]   r2 [a b c d e f g]
    batch 1     r0 a..c      r1 a     r2 a..c      (budget reached)   -> r0 and r1 answered
    batch 2     r2 d..g                                               -> r2 answered

A batch is embedded raw (pooled hidden states, full length); each request's rows are then
finished as it asked (the Matryoshka cut, unit length: :func:`models.pooling.finish`), so
requests with different options share the forward passes.

The budget: with a generating model, the engine's ``max_num_batched_tokens``, so that an
embedding batch costs about what a prefill chunk does and the streams keep their pace between
steps; an encoder alone has nothing to protect and takes the Embedder's ``max_batch_tokens``.

A batch that fails runs again request by request, so that only a request whose own inputs fail
gets an error (as :meth:`EngineCore._execute` does for steps). An aborted request (its client
went away) is dropped with whatever of it was embedded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pagedserve.embedding_inputs import EmbeddingInputs
from pagedserve.engine.messages import EmbedRequest, EmbedResult
from pagedserve.models.pooling import finish
from pagedserve.worker.embedder import Embedder

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    request: EmbedRequest
    vectors: torch.Tensor  # (inputs, hidden) float32: raw pooled rows, [0, done) filled
    done: int = 0

    @property
    def complete(self) -> bool:
        return self.done == len(self.request.token_ids)


# (request, first input, end input) of a batch: inputs [start, end) of the request
_Part = tuple[_Pending, int, int]


class EmbeddingQueue:
    def __init__(self, embedder: Embedder, token_budget: int) -> None:
        if token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {token_budget}")
        self.embedder = embedder
        self.token_budget = token_budget
        self._pending: dict[str, _Pending] = {}  # arrival order
        self._refused: list[EmbedResult] = []  # answered at add(), sent with the next run()
        self.num_requests = 0  # answered with vectors, cumulative
        self.num_inputs = 0
        self.num_tokens = 0
        self.num_batches = 0

    @property
    def inputs(self) -> EmbeddingInputs:
        """What the front end needs to tokenize and check inputs (``EngineInfo.embedding``)."""
        return self.embedder.inputs

    @property
    def has_work(self) -> bool:
        """:meth:`run` would embed or answer something."""
        return bool(self._pending or self._refused)

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, request: EmbedRequest) -> None:
        """Queue a request; one the model cannot take is answered with the reason (a client
        error) by the next :meth:`run`."""
        try:
            if request.request_id in self._pending:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self.inputs.check(request.token_ids)
            self.inputs.check_dimensions(request.dimensions)
        except ValueError as exc:
            self._refused.append(EmbedResult(request.request_id, error=str(exc),
                                             client_error=True))
            return
        vectors = torch.empty(len(request.token_ids), self.embedder.dimensions)
        self._pending[request.request_id] = _Pending(request, vectors)

    def abort(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._pending.pop(request_id, None)

    def run(self) -> list[EmbedResult]:
        """Embed one batch; the results of the requests it completed (and of those refused)."""
        results, self._refused = self._refused, []
        batch = self._take()
        if batch:
            self.num_batches += 1
            self._embed(batch, results)
        return results

    def counters(self) -> dict[str, int]:
        """The cumulative counters, under EngineStats' names."""
        return {"embedding_requests_total": self.num_requests,
                "embedding_inputs_total": self.num_inputs,
                "embedding_tokens_total": self.num_tokens,
                "embedding_batches_total": self.num_batches}

    # -- internals -----------------------------------------------------------------------------

    def _take(self) -> list[_Part]:
        """The next batch: pending inputs in arrival order while the budget lasts."""
        batch: list[_Part] = []
        tokens = 0
        for pending in self._pending.values():
            token_ids = pending.request.token_ids
            end = pending.done
            while end < len(token_ids) and (
                    tokens == 0 or tokens + len(token_ids[end]) <= self.token_budget):
                tokens += len(token_ids[end])
                end += 1
            if end > pending.done:
                batch.append((pending, pending.done, end))
            if end < len(token_ids):
                break
        return batch

    def _embed(self, batch: list[_Part], results: list[EmbedResult]) -> None:
        token_ids = [ids for pending, start, end in batch
                     for ids in pending.request.token_ids[start:end]]
        try:
            rows = self.embedder.embed(token_ids, normalize=False)  # (inputs, hidden)
        except Exception as exc:  # noqa: BLE001 - isolated below, per request
            if len(batch) == 1:
                logger.exception("embedding request %s failed", batch[0][0].request.request_id)
                results.append(self._fail(batch[0][0], exc))
            else:
                logger.warning("an embedding batch of %d requests failed (%r); embedding each "
                               "alone", len(batch), exc)
                for part in batch:
                    self._embed([part], results)
            return
        self.num_inputs += len(token_ids)
        self.num_tokens += sum(len(ids) for ids in token_ids)
        offset = 0
        for pending, start, end in batch:
            pending.vectors[start:end] = rows[offset:offset + end - start]
            offset += end - start
            pending.done = end
            if pending.complete:
                results.append(self._finish(pending))

    def _finish(self, pending: _Pending) -> EmbedResult:
        request = pending.request
        del self._pending[request.request_id]
        vectors = finish(pending.vectors, request.normalize, request.dimensions)
        if not torch.isfinite(vectors).all():
            return self._fail(pending, ArithmeticError("the model's output holds NaN or "
                                                       "infinite values"))
        self.num_requests += 1
        return EmbedResult(request.request_id, vectors.numpy().astype("<f4").tobytes(),
                           vectors.shape[1], sum(len(ids) for ids in request.token_ids))

    def _fail(self, pending: _Pending, exc: BaseException) -> EmbedResult:
        self._pending.pop(pending.request.request_id, None)
        return EmbedResult(pending.request.request_id, error=f"{type(exc).__name__}: {exc}")
