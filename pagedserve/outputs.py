"""What the engine hands back: per-step deltas while streaming, a whole completion offline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]  # error: the engine failed on it


@dataclass(slots=True)
class Logprob:
    token_id: int
    token: str
    logprob: float
    rank: int | None = None  # 1: the most likely token; None where it was not computed


@dataclass(slots=True)
class TokenLogprobs:
    """A token's log-probability (a sampled one's, or a prompt token's) and the top
    alternatives at its position."""

    sampled: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """One step's news for one request: the text and tokens added since the last output.

    ``delta_text`` never ends inside a UTF-8 character and never contains (part of) a stop
    string; text held back for that reason arrives in a later delta or is dropped at a stop.
    """

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    delta_logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None  # with finish_reason "error": what went wrong
    client_error: bool = False  # the error is the request's own (its message names the field)
    busy: bool = False  # the engine could not take it in now; it may well be fine (a 503)
    # with SamplingParams.prompt_logprobs, once, in the first output with a token or the
    # final one: one entry per prompt token, None for the first (nothing predicts it)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    prompt_token_ids: list[int] | None = None  # sent along with prompt_logprobs


@dataclass(slots=True)
class CompletionOutput:
    """A finished request, as the offline :class:`pagedserve.LLM` returns it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
