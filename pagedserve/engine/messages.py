"""What crosses between the front end and the engine core: requests in, per-step outputs out.

The same objects serve both ways of running the core: in a thread of the server's process
(handed over as they are) and in a process of its own (msgpack over ZeroMQ, see
:mod:`pagedserve.engine.transport`). They are ``msgspec`` Structs: typed, validated on decode,
and encoded as arrays (no field names on the wire), so a step of 256 sequences is one small
message. Everything in them is ids and numbers; text exists only in the front end.

    front end --AddRequest / AddEmbedRequest / AbortRequests / ...--> engine core
    front end <------- EngineCoreOutputs (one per step) ------- engine core

An embedding request travels the same way: its inputs as token ids (tokenized in the front
end), its vectors back in ``EngineCoreOutputs.embeddings`` as float32 bytes, one row per input.
"""

from __future__ import annotations

import array
import sys

import msgspec

from pagedserve.sampling_params import SamplingParams

FinishReason = str  # "stop" | "length" | "abort" | "error" (outputs.FinishReason)


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request the front end has validated and tokenized; the core schedules it as is."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: never None, fits the context
    arrival_time: float  # time.monotonic() in the front end (the clock is system-wide)
    client_index: int = 0  # which front end sent it (--api-server-count), for its outputs


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One request's news from one step: its new token ids (none when it only finished, was
    admitted, or computed a piece of a prompt whose logprobs it wants) and, when it ended, why.

    Prompt logprobs (``SamplingParams.prompt_logprobs``) come in pieces, in order, as prefill
    chunks compute them: the first piece starts at the prompt's second token (the first is
    predicted by nothing), and the pieces end with the step that samples the first token (or
    finishes a ``max_tokens`` 0 request).

    The first output of a request whose constraint had to compile, tokens or not, says the
    grammar is ready (its admission); a constraint that does not compile ends the request
    with ``finish_reason "error"`` and ``client_error`` set (the front end's 400).
    """

    request_id: str
    new_token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    # the last new token is a stop token (EOS or a stop_token_id): its text is not shown
    stop_token: bool = False
    logprobs: list[float] | None = None  # of each new token, under the raw distribution
    top_ids: list[list[int]] | None = None  # each new token's top alternatives
    top_logprobs: list[list[float]] | None = None
    num_cached_tokens: int = 0  # prefix-cache hit at its first admission
    # the next prompt tokens' logprobs, their ranks (1: the most likely) and top alternatives
    prompt_logprobs: list[float] | None = None
    prompt_ranks: list[int] | None = None
    prompt_top_ids: list[list[int]] | None = None
    prompt_top_logprobs: list[list[float]] | None = None
    first_scheduled_time: float | None = None  # sent with a request's first output
    num_preemptions: int = 0
    error: str | None = None  # with finish_reason "error": what went wrong
    client_error: bool = False  # the error is the request's own (a 400, naming its field)
    busy: bool = False  # the core could not take it in now (a 503): it may well be fine


class EmbedRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """An embedding request the front end has tokenized and checked; the core embeds its
    inputs in batches with those of other requests (:mod:`pagedserve.engine.embedding_queue`)."""

    request_id: str
    token_ids: list[list[int]]  # one list per input, the model's special tokens included
    normalize: bool = True  # unit length (after the cut to `dimensions`)
    dimensions: int | None = None  # keep the first components only (Matryoshka); None: all
    arrival_time: float = 0.0  # time.monotonic() in the front end
    client_index: int = 0  # which front end sent it


class EmbedResult(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One embedding request's vectors: ``len(token_ids)`` rows of ``dimensions`` float32,
    little-endian, row after row in ``data`` (what OpenAI's base64 encoding sends as is); or
    why it failed (``client_error``: the request's own fault, a 400)."""

    request_id: str
    data: bytes = b""
    dimensions: int = 0
    num_tokens: int = 0  # of every input, special tokens included
    error: str | None = None
    client_error: bool = False

    def vectors(self) -> list[list[float]]:
        """The rows as lists of floats."""
        values = array.array("f", self.data)
        if sys.byteorder == "big":
            values.byteswap()
        d = self.dimensions
        return [values[i:i + d].tolist() for i in range(0, len(values), d)] if d else []

    def rows(self) -> list[bytes]:
        """Each row's little-endian float32 bytes."""
        size = 4 * self.dimensions
        return [self.data[i:i + size] for i in range(0, len(self.data), size)] if size else []


class StepStats(msgspec.Struct, array_like=True, gc=False):
    num_scheduled_tokens: int
    num_prompt_tokens: int  # prefill tokens computed this step
    num_generation_tokens: int  # tokens sampled this step
    num_preempted: int
    duration: float  # seconds


class EngineStats(msgspec.Struct, array_like=True, gc=False):
    """The core's gauges and cumulative counters, as of one moment."""

    num_running: int = 0
    num_waiting: int = 0  # for a seat or for their grammar
    kv_cache_usage: float = 0.0  # fraction of blocks in use, 0..1
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_cache_queries: int = 0  # tokens, cumulative
    prefix_cache_hits: int = 0  # tokens, cumulative
    num_preemptions: int = 0  # cumulative
    kv_reserved_tokens: int = 0
    kv_used_tokens: int = 0
    kv_waste_perc: float = 0.0  # (reserved - used) / used * 100
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    constrained_requests_total: int = 0  # requests with a grammar, cumulative
    grammar_compiles_total: int = 0
    grammar_compile_seconds_total: float = 0.0
    grammar_cache_hits_total: int = 0
    num_waiting_for_grammar: int = 0  # of num_waiting: their constraint is compiling
    embedding_requests_total: int = 0  # answered, cumulative
    embedding_inputs_total: int = 0  # texts (or token-id lists) embedded, cumulative
    embedding_tokens_total: int = 0
    embedding_batches_total: int = 0  # Embedder.embed calls, each between two steps


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Everything one iteration of the core loop has to say to one front end."""

    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0  # time.monotonic() when the step's tokens were sampled
    step: StepStats | None = None  # None when nothing was scheduled
    stats: EngineStats | None = None
    grammar_compile_seconds: list[float] = []  # compilations that ended since the last message
    dead: str | None = None  # the core loop failed: why; nothing more will come
    embeddings: list[EmbedResult] = []  # embedding requests answered in this iteration


# -- front end -> core --------------------------------------------------------------------------


class AddRequest(msgspec.Struct, tag=True, array_like=True, gc=False):
    request: EngineCoreRequest


class AddEmbedRequest(msgspec.Struct, tag=True, array_like=True, gc=False):
    request: EmbedRequest


class AbortRequests(msgspec.Struct, tag=True, array_like=True, gc=False):
    request_ids: list[str]  # generation or embedding requests


class Shutdown(msgspec.Struct, tag=True, array_like=True, gc=False):
    pass


CoreInput = AddRequest | AddEmbedRequest | AbortRequests | Shutdown
