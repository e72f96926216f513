"""Iteration-level scheduling: who runs in the next forward pass, and how many tokens each.

There is no prefill or decode phase. Each step hands out a token budget
(``max_num_batched_tokens``): first one token to every running request that is decoding, then
prefill chunks to running requests still catching up, then new requests from the waiting queue
while the budget and ``max_num_seqs`` allow. One forward pass therefore mixes decode tokens and
prefill chunks (chunked prefill), and a finished request's seat is refilled on the next step.

When the KV cache runs out of blocks, the most recently admitted request is preempted by
recompute: its blocks are freed and it goes back to the front of the queue with its output so far,
to be prefilled again (largely from the prefix cache) and continue exactly where it stopped.

Integers and request objects only; no tensors.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step, read before the step advances the request (so its two
    flags are computed once, when scheduled, not once per use in the step's hot loops)."""

    request: Request
    num_new_tokens: int  # positions [num_computed_tokens, num_computed_tokens + num_new_tokens)
    block_table: list[int]
    # whether this chunk reaches the last known token, so the step samples a new one
    samples: bool = field(init=False)
    # one token that was itself sampled: the input of a decode step
    is_decode: bool = field(init=False)

    def __post_init__(self) -> None:
        r = self.request
        self.samples = r.num_computed_tokens + self.num_new_tokens == r.num_tokens
        self.is_decode = self.num_new_tokens == 1 and self.samples and r.num_output_tokens > 0


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decoding, catching_up = [], []
        for r in self.running:  # one pass: this runs for every sequence on every step
            left = len(r.all_token_ids) - r.num_computed_tokens
            if r.num_placeholders and r.num_output_tokens >= r.max_tokens:
                continue  # its last token is still on the device: nothing more to compute
            if left == 1:
                decoding.append(r)
            elif left > 1:
                catching_up.append(r)
        for request in decoding + catching_up:
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            preempted_before = len(out.preempted)
            fits = self._allocate_or_preempt(request, num_new, out)
            if len(out.preempted) != preempted_before:  # a victim may have been scheduled
                budget = self.max_num_batched_tokens - out.num_batched_tokens
            if not fits:
                continue
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_table(
                request.request_id)))
            budget -= num_new
        if out.preempted:
            return out  # no admissions in a step that had to preempt
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # cached blocks hold K and V, not the hidden states that prompt logprobs need
            cached = ([] if request.owes_prompt_logprobs
                      else self.kv.find_cached_prefix(request.all_token_ids))
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request.request_id, num_cached + num_new, cached):
                break
            self.kv.record_prefix_lookup(request.num_tokens, num_cached)
            self.waiting.popleft()
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv.block_table(
                request.request_id)))
            budget -= num_new
        return out

    def _allocate_or_preempt(
        self, request: Request, num_new: int, out: SchedulerOutput
    ) -> bool:
        """Grow the request's blocks, preempting the newest requests until it fits.

        Returns False when the request itself had to be preempted.
        """
        while not self.kv.allocate(request.request_id, request.num_computed_tokens + num_new):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            for i, s in enumerate(out.scheduled):
                if s.request is victim:
                    del out.scheduled[i]
                    break
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request) -> None:
        """Retire a request (finished or aborted): leave the queues, free its blocks now. One
        still waiting for its grammar was never queued here and holds no blocks."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.FINISHED
