"""The core's token ids -> :class:`RequestOutput` deltas: text, stop strings, logprobs, timings.

Runs in the front end, which owns one detokenizer per request (text never crosses the process
boundary). A stop string is found here, not in the core: the request ends for its caller at
once, and the front end asks the core to abort it (:attr:`ProcessedOutputs.to_abort`); tokens
the core sampled meanwhile are dropped. What the core ends (EOS, stop token ids, max_tokens, a
complete grammar, an abort, an error) arrives as a finish reason with the last tokens.

Prompt logprobs arrive in pieces while the prompt is computed; they are gathered here and handed
over whole, once, with the request's first token (or its end, for ``max_tokens`` 0).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagedserve.detokenizer import IncrementalDetokenizer
from pagedserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest
from pagedserve.outputs import Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from pagedserve.tokenizer import Tokenizer


@dataclass(slots=True)
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    to_abort: list[str] = field(default_factory=list)  # ended here (a stop string): tell the core
    admitted: list[str] = field(default_factory=list)  # their grammar compiled: now scheduled


@dataclass(slots=True)
class _RequestState:
    request_id: str
    num_prompt_tokens: int
    metrics: RequestMetrics
    detokenizer: IncrementalDetokenizer | None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = None  # with prompt logprobs asked for
    # gathered until the first output with a token, or the last: None for the first token
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def request_ids(self) -> set[str]:
        return set(self._states)

    def add_request(self, request: EngineCoreRequest) -> None:
        p = request.params
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output,
                skip_special_tokens=p.skip_special_tokens)
        state = _RequestState(request.request_id, len(request.prompt_token_ids),
                              RequestMetrics(request.arrival_time), detokenizer)
        if p.prompt_logprobs is not None:
            state.prompt_token_ids = request.prompt_token_ids
            state.prompt_logprobs = [None]
        self._states[request.request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request here (its caller went away); None if it was not live."""
        state = self._states.get(request_id)
        if state is None:
            return None
        return self._finish(state, RequestOutput(request_id, "", []), "abort", None)

    def process(self, outputs: EngineCoreOutputs) -> ProcessedOutputs:
        processed = ProcessedOutputs()
        for core_output in outputs.outputs:
            state = self._states.get(core_output.request_id)
            if state is None:
                continue  # ended here already (a stop string, an abort): its news is stale
            out = self._process_one(state, core_output, outputs.timestamp, processed)
            if out is not None:
                processed.outputs.append(out)
        return processed

    def _process_one(self, state: _RequestState, o: EngineCoreOutput, timestamp: float,
                     processed: ProcessedOutputs) -> RequestOutput | None:
        metrics = state.metrics
        if o.first_scheduled_time is not None:
            metrics.first_scheduled_time = o.first_scheduled_time
            state.num_cached_tokens = o.num_cached_tokens
        new = o.new_token_ids
        if o.prompt_logprobs is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs += self._prompt_logprobs(state, o)
        if not new and o.finish_reason is None:
            if o.prompt_logprobs is None:
                processed.admitted.append(state.request_id)
            return None
        out = RequestOutput(state.request_id, "", new)
        if state.prompt_logprobs is not None:  # complete now: handed over once
            out.prompt_logprobs = state.prompt_logprobs
            out.prompt_token_ids = state.prompt_token_ids
            state.prompt_logprobs = None
        if new:
            if state.num_output_tokens == 0:
                metrics.first_token_time = timestamp
            metrics.last_token_time = timestamp
            state.num_output_tokens += len(new)
            if o.logprobs is not None:
                out.delta_logprobs = self._logprobs(o)
        stop_string = None
        detokenizer = state.detokenizer
        if detokenizer is not None and new:
            shown = new[:-1] if o.stop_token else new
            if shown:
                delta = detokenizer.add(shown)
                out.delta_text = delta.text
                stop_string = delta.stop
        if stop_string is not None:
            if o.finish_reason is None:
                processed.to_abort.append(state.request_id)
            return self._finish(state, out, "stop", stop_string)
        if o.finish_reason is not None:
            metrics.num_preemptions = o.num_preemptions
            state.num_cached_tokens = o.num_cached_tokens
            if o.error is not None:
                out.error, out.client_error, out.busy = o.error, o.client_error, o.busy
            return self._finish(state, out, o.finish_reason, o.stop_reason)
        return self._fill(state, out)

    def _logprobs(self, o: EngineCoreOutput) -> list[TokenLogprobs]:
        text = self.tokenizer.token_text if self.tokenizer is not None else str
        result = []
        for i, token_id in enumerate(o.new_token_ids):
            top_ids = o.top_ids[i] if o.top_ids else []
            top_logprobs = o.top_logprobs[i] if o.top_logprobs else []
            result.append(TokenLogprobs(
                Logprob(token_id, text(token_id), o.logprobs[i]),
                [Logprob(t, text(t), lp) for t, lp in zip(top_ids, top_logprobs, strict=True)]))
        return result

    def _prompt_logprobs(self, state: _RequestState, o: EngineCoreOutput
                         ) -> list[TokenLogprobs | None]:
        """A piece of prompt logprobs, for the prompt tokens after those gathered so far."""
        text = self.tokenizer.token_text if self.tokenizer is not None else str
        first = len(state.prompt_logprobs)
        targets = state.prompt_token_ids[first : first + len(o.prompt_logprobs)]
        result: list[TokenLogprobs | None] = []
        for i, token_id in enumerate(targets):
            top_ids, top_logprobs = o.prompt_top_ids[i], o.prompt_top_logprobs[i]
            result.append(TokenLogprobs(
                Logprob(token_id, text(token_id), o.prompt_logprobs[i], o.prompt_ranks[i]),
                [Logprob(t, text(t), lp, rank) for rank, (t, lp)
                 in enumerate(zip(top_ids, top_logprobs, strict=True), 1)]))
        return result

    def _finish(self, state: _RequestState, out: RequestOutput, reason: str,
                stop_reason: str | int | None) -> RequestOutput:
        del self._states[state.request_id]
        detokenizer = state.detokenizer
        # text held back (an incomplete character, a possible stop string) is released unless
        # a stop string ended it or the request failed (nothing held back is worth showing)
        if detokenizer is not None and not isinstance(stop_reason, str) and reason != "error":
            out.delta_text += detokenizer.flush()
        state.metrics.finished_time = time.monotonic()
        out.finished, out.finish_reason, out.stop_reason = True, reason, stop_reason
        return self._fill(state, out)

    @staticmethod
    def _fill(state: _RequestState, out: RequestOutput) -> RequestOutput:
        out.num_prompt_tokens = state.num_prompt_tokens
        out.num_output_tokens = state.num_output_tokens
        out.num_cached_tokens = state.num_cached_tokens
        out.metrics = state.metrics
        return out
