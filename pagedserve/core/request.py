"""One request's state inside the engine: counters, not modes.

Prefill, chunked prefill, a prefix-cache hit, decode and recompute after preemption are all the
same thing: ``num_computed_tokens`` (tokens whose K/V sit in the cache) catching up with
``num_tokens`` (prompt plus sampled output). When a step computes the last known token, the model
runner samples the next one, which is appended to ``output_token_ids``.

    token positions:  [0 ........ num_computed_tokens) [...... num_tokens)
                       K/V in the cache                  still to compute

With overlapped steps (``EngineConfig.async_scheduling``) a step is scheduled before the one
before it has reported its tokens: the request then holds a :data:`PLACEHOLDER` for each token
still on its way (at most the last two), counted like any token, so that scheduling, positions
and seeds see the same numbers as without overlap. The model runner feeds a placeholder from
the device (the previous step's sampled ids); :meth:`Request.fill` writes the real id in.

    all_token_ids:  [ prompt ... | outputs known ... | PLACEHOLDER (, PLACEHOLDER) ]
                                                      ^ num_known_tokens
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.outputs import FinishReason, RequestMetrics
from pagedserve.sampling_params import SamplingParams

PLACEHOLDER = -1  # a token sampled on the device whose id the host has not read yet

if TYPE_CHECKING:
    from pagedserve.structured.state import GrammarState


class RequestStatus(enum.Enum):
    WAITING_FOR_GRAMMAR = "waiting_for_grammar"  # its grammar compiles; not in the scheduler yet
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int  # resolved: never None, fits the context
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at the first admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    grammar: GrammarState | None = None  # when params.constraint is set
    client_index: int = 0  # the front end whose request it is
    num_placeholders: int = 0  # tokens at the end of all_token_ids not known yet
    # the first prompt token whose logprob (params.prompt_logprobs) is not sent yet; the first
    # token is predicted by nothing (see pagedserve.worker.prompt_logprobs)
    prompt_logprobs_next: int = 1

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def owes_prompt_logprobs(self) -> bool:
        """Whether prompt logprobs were asked for and some are still to be computed."""
        return (self.params.prompt_logprobs is not None
                and self.prompt_logprobs_next < self.num_prompt_tokens)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows: all but the trailing placeholders."""
        return len(self.all_token_ids) - self.num_placeholders

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def append_placeholder(self) -> int:
        """Reserve the next output token for a step in flight; returns its output index."""
        self.append_output_token(PLACEHOLDER)
        self.num_placeholders += 1
        return self.num_output_tokens - 1

    def fill(self, index: int, token_id: int) -> None:
        """The id of output token ``index``, reserved by :meth:`append_placeholder`."""
        assert self.output_token_ids[index] == PLACEHOLDER, "filled twice"
        self.output_token_ids[index] = token_id
        self.all_token_ids[self.num_prompt_tokens + index] = token_id
        self.num_placeholders -= 1

    def drop_last_placeholder(self) -> None:
        """Take back the newest reservation (its step computed from a wrong token)."""
        assert self.output_token_ids[-1] == PLACEHOLDER
        self.output_token_ids.pop()
        self.all_token_ids.pop()
        self.num_placeholders -= 1

    def check_stop_token(self, index: int | None = None) -> tuple[FinishReason, int | None] | None:
        """Whether output token ``index`` (default: the newest) ends the request (stop strings
        are checked in text)."""
        if index is None:
            index = self.num_output_tokens - 1
        n = index + 1
        token = self.output_token_ids[index]
        if n >= self.params.min_tokens:
            if not self.params.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in self.params.stop_token_ids:
                return "stop", token
        if n >= self.max_tokens:
            return "length", None
        return None
