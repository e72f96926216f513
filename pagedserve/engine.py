"""The engine: requests in, one iteration per :meth:`Engine.step`, deltas out.

A step is schedule -> run -> postprocess -> emit. Everything stateful has its own object: the
scheduler decides who runs, the KV manager (paged or static) decides where their K/V live, the
model runner computes and samples, a detokenizer per request turns tokens into text and spots
stop strings. The engine is single-threaded; :class:`~pagedserve.async_engine.AsyncEngine` runs
it in a thread for the server, :class:`~pagedserve.llm.LLM` drives it directly offline.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.block_manager import BlockManager
from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.detokenizer import IncrementalDetokenizer
from pagedserve.outputs import Logprob, RequestMetrics, RequestOutput, TokenLogprobs
from pagedserve.request import Request, RequestStatus
from pagedserve.sampling_params import SamplingParams
from pagedserve.scheduler import ScheduledRequest, Scheduler
from pagedserve.static_slots import StaticSlotManager
from pagedserve.structured.compiler import GrammarCompiler
from pagedserve.structured.state import GrammarState, GrammarWaitingRoom

if TYPE_CHECKING:
    from pagedserve.loader import LoadedModel, ModelInfo
    from pagedserve.sampler import SampledToken
    from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Consecutive steps in which every request failed before the engine gives up: one bad request
# fails alone, but a model that fails every step (a broken device) must not look healthy.
MAX_FAILED_STEPS = 8
GRAMMAR_WAIT_S = 0.02  # an engine with nothing to run but compiling grammars naps this long


class ContextLengthError(ValueError):
    """The prompt plus the tokens asked for do not fit the model's context."""

    def __init__(self, max_model_len: int, num_prompt_tokens: int, max_tokens: int):
        self.max_model_len = max_model_len
        self.num_prompt_tokens = num_prompt_tokens
        self.max_tokens = max_tokens
        total = num_prompt_tokens + max_tokens
        super().__init__(
            f"This model's maximum context length is {max_model_len} tokens, your request has "
            f"{num_prompt_tokens} input tokens. However, you requested {total} tokens "
            f"({num_prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion."
        )


class PromptTooLongError(ContextLengthError):
    """A prompt text too long to fit the context, turned away before it is tokenized.

    Every character is covered by some token and no token covers more than the vocabulary's
    longest entry, so past ``max_chars`` characters no tokenization can fit ``max_model_len``.
    """

    def __init__(self, max_model_len: int, num_chars: int, max_chars: int):
        ValueError.__init__(
            self,
            f"This model's maximum context length is {max_model_len} tokens; your prompt of "
            f"{num_chars} characters is longer than {max_chars} characters, more than that "
            "many tokens can hold. Please reduce the length of the prompt.",
        )
        self.max_model_len = max_model_len
        self.num_chars = num_chars
        self.max_chars = max_chars


class EngineStepError(RuntimeError):
    """Steps keep failing for every request they hold: the engine cannot go on."""


@dataclass(slots=True)
class StepStats:
    num_scheduled_tokens: int
    num_prompt_tokens: int  # prefill tokens computed this step
    num_generation_tokens: int  # tokens sampled this step
    num_preempted: int
    duration: float  # seconds


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of blocks in use, 0..1
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_queries: int  # tokens, cumulative
    prefix_cache_hits: int  # tokens, cumulative
    num_preemptions: int  # cumulative
    kv_reserved_tokens: int
    kv_used_tokens: int
    kv_waste_perc: float  # (reserved - used) / used * 100
    prompt_tokens_total: int
    generation_tokens_total: int
    constrained_requests_total: int = 0  # requests with a grammar, cumulative
    grammar_compiles_total: int = 0
    grammar_compile_seconds_total: float = 0.0
    grammar_cache_hits_total: int = 0


class EngineObserver:
    """Hooks called from the engine's thread after each step; override what you need."""

    def on_step(self, stats: StepStats) -> None:
        pass

    def on_output(self, output: RequestOutput) -> None:
        pass


class Engine:
    def __init__(
        self,
        model_config: ModelConfig,
        weights: dict,
        tokenizer: Tokenizer | None,
        config: EngineConfig | None = None,
        model_info: ModelInfo | None = None,
        model_name: str = "model",
        *,
        consume_weights: bool = False,  # may empty `weights` to free unfused copies early
    ):
        from pagedserve.device import check_device
        from pagedserve.model_runner import (
            ModelRunner,
            kv_bytes_per_token,
            resolve_dtype,
            resolve_kv_cache_dtype,
            resolve_low_bit,
        )

        config = config or EngineConfig()
        check_device(config.device)
        requested = config.dtype
        dtype = resolve_dtype(config.dtype, config.device)
        self.config = config = dataclasses.replace(
            config, dtype=dtype,
            low_bit_small_steps=resolve_low_bit(config.low_bit_small_steps, requested, dtype),
            kv_cache_dtype=resolve_kv_cache_dtype(config.kv_cache_dtype, requested, dtype,
                                                  config.device))
        logger.info("computing in %s on %s%s", config.dtype, config.device,
                    _auto_dtype_note(config.dtype, config.device) if requested == "auto" else "")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.model_name = model_name
        if config.kv_cache_dtype != config.dtype:
            logger.info("KV cache in %s", config.kv_cache_dtype)
        per_token = kv_bytes_per_token(model_config, config.kv_cache_dtype)
        self.runner = ModelRunner(model_config, weights, config, consume_weights)
        model_len = config.max_model_len or model_config.max_position_embeddings
        if model_len > model_config.max_position_embeddings:
            # positions past the model's own context have no rotary angles: cap, do not crash
            logger.warning("max_model_len %d exceeds the model's context length of %d tokens; "
                           "using %d", model_len, model_config.max_position_embeddings,
                           model_config.max_position_embeddings)
            model_len = model_config.max_position_embeddings
        if config.kv_layout == "static":
            self.kv: BlockManager | StaticSlotManager = StaticSlotManager(
                config.max_parallel, config.num_ctx, config.block_size
            )
            max_num_seqs = min(config.max_num_seqs, config.max_parallel)
        else:
            budget = config.kv_cache_memory or self._kv_cache_budget(model_len, per_token)
            num_blocks = int(budget // (per_token * config.block_size))
            if num_blocks < 1:
                raise ValueError(
                    f"kv_cache_memory of {budget} bytes holds no block of {config.block_size} "
                    f"tokens ({per_token} bytes per token)"
                )
            self.kv = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
            max_num_seqs = config.max_num_seqs
        # the longest sequence the KV cache can hold: one slot, or the whole paged pool
        per_sequence = config.num_ctx if config.kv_layout == "static" else self.kv.capacity_tokens
        self.max_model_len = min(model_len, per_sequence)
        token_chars = tokenizer.max_token_chars if tokenizer is not None else 1
        self.max_prompt_chars = config.max_prompt_chars or self.max_model_len * token_chars
        self.runner.allocate(self.kv.num_blocks, max_num_seqs, self.max_model_len)
        self.scheduler = Scheduler(self.kv, max_num_seqs, config.max_num_batched_tokens)
        # structured outputs: grammars compile in a thread; requests wait for theirs apart
        self.grammars = (GrammarCompiler(tokenizer, model_config.vocab_size, config.grammar_limits)
                         if tokenizer is not None else None)
        self._awaiting_grammar = GrammarWaitingRoom()
        self._constrained_total = 0
        self.observers: list[EngineObserver] = []
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer | None] = {}
        self._ids = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._failed_steps = 0  # consecutive steps in which every request failed
        capacity = self.kv.capacity_tokens
        logger.info(
            "KV cache (%s): %d blocks x %d tokens = %d tokens, %.1f MiB; max_model_len %d: "
            "%.1f sequences of full length fit",
            config.kv_layout, self.kv.num_blocks, config.block_size, capacity,
            capacity * per_token / 2**20, self.max_model_len, capacity / self.max_model_len,
        )

    def _kv_cache_budget(self, model_len: int, per_token: int) -> int:
        """Bytes for the paged KV cache when kv_cache_memory does not say: the device's share
        (kv_sizing.py), and no more than kv_cache_sequences sequences of model_len when set."""
        from pagedserve.kv_sizing import cpu_kv_cache_bytes, kv_cache_bytes_for_gpu

        config = self.config
        if not config.device.startswith("cuda"):
            share = cpu_kv_cache_bytes(config.kv_cache_fraction)
        else:
            memory = self.runner.profile_gpu_memory(config.max_num_batched_tokens,
                                                    config.max_num_seqs, model_len)
            share = kv_cache_bytes_for_gpu(memory, config.gpu_memory_utilization)
        if config.kv_cache_sequences is None:
            return share
        sequence_bytes = -(-model_len // config.block_size) * config.block_size * per_token
        return min(share, config.kv_cache_sequences * sequence_bytes)

    @classmethod
    def from_model(
        cls,
        model: str | Path | LoadedModel,
        config: EngineConfig | None = None,
        model_name: str | None = None,
        load_format: str = "auto",
        progress: bool = False,
        consume_weights: bool | None = None,
    ) -> Engine:
        """`consume_weights` (default: when this loads the model itself): the engine may empty
        the weights dict as it fuses tensors, freeing the unfused copies early."""
        from pagedserve.device import check_device
        from pagedserve.loader import LoadedModel, load_model
        from pagedserve.model_runner import resolve_dtype

        config = config or EngineConfig()
        check_device(config.device)  # before loading: the CUDA build may be missing
        loaded_here = not isinstance(model, LoadedModel)
        if loaded_here:
            model = load_model(model, load_format=load_format,
                               dtype=resolve_dtype(config.dtype, config.device),
                               progress=progress, device=config.device)
        name = model_name or (Path(model.info.path).name if model.info else "model")
        consume = loaded_here if consume_weights is None else consume_weights
        return cls(model.config, model.weights, model.tokenizer, config, model.info, name,
                   consume_weights=consume)

    # -- requests ------------------------------------------------------------------------
    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and tokenize without touching engine state (safe from another thread)."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("n must be 1 per engine request; the API layers fan out n > 1")
        vocab = self.model_config.vocab_size
        for t in params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {t}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: this model has no tokenizer; pass token ids")
            if len(prompt) > self.max_prompt_chars:
                raise PromptTooLongError(self.max_model_len, len(prompt), self.max_prompt_chars)
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
            for t in token_ids:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {t!r}")
        if not token_ids:
            raise ValueError("prompt must not be empty")
        n = len(token_ids)
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - n
            if max_tokens < 1:
                raise ContextLengthError(self.max_model_len, n, 1)
        elif n + max_tokens > self.max_model_len:
            raise ContextLengthError(self.max_model_len, n, max_tokens)
        eos = frozenset(self.tokenizer.eos_token_ids) if self.tokenizer else frozenset()
        return Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=token_ids,
            params=params,
            eos_token_ids=eos,
            max_tokens=max_tokens,
            metrics=RequestMetrics(arrival_time or time.monotonic()),
            grammar=self._grammar(params),
        )

    def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """Start compiling the request's constraint, if it has one (in the compiler's thread:
        ``request.grammar.wait()`` or ``.compiled`` tell when it is done, or why it failed)."""
        constraint = params.constraint
        if constraint is None:
            return None
        if self.grammars is None:
            raise ValueError(f"{constraint.field}: this model has no tokenizer, which "
                             "structured outputs need")
        return GrammarState(constraint, self.grammars.compile(constraint),
                            self.grammars.vocab_size)

    def add(self, request: Request) -> None:
        """Queue a request made by :meth:`make_request`; nothing is registered if this raises."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        p = request.params
        detok = (
            IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, p.stop,
                include_stop_str_in_output=p.include_stop_str_in_output,
                skip_special_tokens=p.skip_special_tokens,
            )
            if self.tokenizer is not None
            else None
        )
        self._requests[request.request_id] = request
        self._detok[request.request_id] = detok
        if request.grammar is None:
            self.scheduler.add(request)
        else:
            self._constrained_total += 1
            self._awaiting_grammar.add(request)  # joins the scheduler once compiled

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        request = self.make_request(prompt, params, request_id)
        if request.grammar is not None:
            request.grammar.wait()  # offline: a constraint that does not compile raises here
        self.add(request)
        return request.request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output, if it was live."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        out = self._finish(request, "abort", None, RequestOutput(request_id, "", []))
        self._notify(None, [out])
        return out

    def _fail(self, request: Request, exc: BaseException) -> RequestOutput:
        """End a request whose step failed: its blocks are freed, its caller gets the error."""
        out = RequestOutput(request.request_id, "", [])
        out.error = f"{type(exc).__name__}: {exc}"
        self._detok.pop(request.request_id, None)  # nothing held back is worth showing
        return self._finish(request, "error", None, out)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or len(self._awaiting_grammar) > 0

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        outputs = self._admit_compiled()
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            if not outputs:
                self._awaiting_grammar.wait(GRAMMAR_WAIT_S)
            self._notify(None, outputs)
            return outputs
        num_decoding = sum(1 for s in plan.scheduled if s.is_decode)
        scheduled, sampled, failed = self._execute(plan.scheduled)
        outputs += [self._fail(s.request, exc) for s, exc in failed]
        outputs += self._postprocess(scheduled, sampled)
        stats = StepStats(
            num_scheduled_tokens=plan.num_batched_tokens,
            num_prompt_tokens=plan.num_batched_tokens - num_decoding,
            num_generation_tokens=sum(1 for t in sampled if t is not None),
            num_preempted=len(plan.preempted),
            duration=time.monotonic() - start,
        )
        self._notify(stats, outputs)
        return outputs

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar has compiled go to the scheduler; those whose grammar failed
        to compile end with an error (the server checks before queueing, so only offline)."""
        failed = []
        for request in self._awaiting_grammar.pop_compiled():
            try:
                request.grammar.start()
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                failed.append(self._fail(request, exc))
            else:
                self.scheduler.add(request)
        return failed

    def _execute(self, scheduled: list[ScheduledRequest]) -> tuple[
            list[ScheduledRequest], list[SampledToken | None],
            list[tuple[ScheduledRequest, Exception]]]:
        """Run the step; if it fails, run each request alone so that only a request whose
        own step fails is lost (a fault that does not repeat loses nothing).

        Running a subset of the plan is safe: each request's K/V slots and attention are its
        own, and a request that is run again writes the same K/V at the same slots. Returns
        the requests that ran, their sampled tokens, and the failed requests with the error.
        """
        try:
            return scheduled, self.runner.execute(scheduled), []
        except Exception as exc:  # noqa: BLE001 - isolated below, per request
            if len(scheduled) == 1:
                logger.exception("step failed for request %s", scheduled[0].request.request_id)
                ok, sampled, failures = [], [], [(scheduled[0], exc)]
            else:
                logger.warning("a step of %d requests failed (%r); running each alone",
                               len(scheduled), exc)
                ok, sampled, failures = self._execute_each_alone(scheduled)
        if ok:
            self._failed_steps = 0
        else:
            self._failed_steps += 1
            if self._failed_steps >= MAX_FAILED_STEPS:
                raise EngineStepError(
                    f"{self._failed_steps} steps in a row failed for every request in them; "
                    f"the last error: {failures[-1][1]!r}") from failures[-1][1]
        return ok, sampled, failures

    def _execute_each_alone(self, scheduled: list[ScheduledRequest]) -> tuple[
            list[ScheduledRequest], list[SampledToken | None],
            list[tuple[ScheduledRequest, Exception]]]:
        ok, sampled, failures = [], [], []
        for s in scheduled:
            try:
                [token] = self.runner.execute([s])
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                logger.exception("step failed for request %s", s.request.request_id)
                failures.append((s, exc))
            else:
                ok.append(s)
                sampled.append(token)
        return ok, sampled, failures

    def _notify(self, stats: StepStats | None, outputs: list[RequestOutput]) -> None:
        """Observers see every step and output; one that raises is logged, never fatal."""
        for observer in self.observers:
            try:
                if stats is not None:
                    observer.on_step(stats)
                for out in outputs:
                    observer.on_output(out)
            except Exception:  # noqa: BLE001 - metrics must not take the engine down
                logger.exception("engine observer %r failed", observer)

    def _postprocess(
        self, scheduled: list[ScheduledRequest], sampled: list[SampledToken | None]
    ) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for s, token in zip(scheduled, sampled, strict=True):
            try:
                out = self._postprocess_one(s, token, now)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("postprocessing failed for request %s", s.request.request_id)
                out = self._fail(s.request, exc) if not s.request.finished else None
            if out is not None:
                outputs.append(out)
        return outputs

    def _postprocess_one(self, s: ScheduledRequest, token: SampledToken | None,
                         now: float) -> RequestOutput | None:
        """Advance one request by its step: count computed tokens, append the sampled one,
        detokenize, and finish it on a stop. None while it is still prefilling."""
        request = s.request
        request.num_computed_tokens += s.num_new_tokens
        self.kv.commit(request.request_id, request.all_token_ids, request.num_computed_tokens)
        if token is None:
            return None
        if request.num_output_tokens == 0:
            self._prompt_tokens_total += request.num_prompt_tokens
            request.metrics.first_token_time = now
        self._generation_tokens_total += 1
        request.metrics.last_token_time = now
        request.append_output_token(token.token_id)
        out = RequestOutput(request.request_id, "", [token.token_id])
        if token.logprob is not None:
            out.delta_logprobs = [self._token_logprobs(token)]
        finish = request.check_stop_token()
        detok = self._detok[request.request_id]
        if detok is not None and not (finish and finish[0] == "stop"):
            delta = detok.add([token.token_id])
            out.delta_text = delta.text
            if delta.stop is not None:
                finish = ("stop", delta.stop)
        if request.grammar is not None:
            request.grammar.advance(request.output_token_ids)
            if request.grammar.finished and (finish is None or finish[0] == "length"):
                finish = ("stop", None)  # the grammar admits nothing more: the answer is whole
        if finish:
            return self._finish(request, finish[0], finish[1], out)
        return self._fill(request, out)

    def _token_logprobs(self, token: SampledToken) -> TokenLogprobs:
        text = self.tokenizer.token_text if self.tokenizer else str
        return TokenLogprobs(
            Logprob(token.token_id, text(token.token_id), token.logprob),
            [Logprob(t, text(t), lp) for t, lp in token.top or []],
        )

    def _finish(self, request: Request, reason, stop_reason, out: RequestOutput) -> RequestOutput:
        detok = self._detok.pop(request.request_id, None)
        if detok is not None and not isinstance(stop_reason, str):
            out.delta_text += detok.flush()
        self.scheduler.finish(request)
        self._awaiting_grammar.remove(request.request_id)
        del self._requests[request.request_id]
        request.finish_reason, request.stop_reason = reason, stop_reason
        request.metrics.finished_time = time.monotonic()
        out.finished, out.finish_reason, out.stop_reason = True, reason, stop_reason
        return self._fill(request, out)

    @staticmethod
    def _fill(request: Request, out: RequestOutput) -> RequestOutput:
        out.num_prompt_tokens = request.num_prompt_tokens
        out.num_output_tokens = request.num_output_tokens
        out.num_cached_tokens = request.num_cached_tokens
        out.metrics = request.metrics
        return out

    # -- introspection -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        usage = self.kv.usage()
        grammars = self.grammars
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._awaiting_grammar),
            kv_cache_usage=usage.usage,
            kv_blocks_total=usage.num_blocks,
            kv_blocks_free=usage.num_free_blocks,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            kv_reserved_tokens=usage.reserved_tokens,
            kv_used_tokens=usage.used_tokens,
            kv_waste_perc=usage.waste_perc,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            constrained_requests_total=self._constrained_total,
            grammar_compiles_total=grammars.num_compiled if grammars else 0,
            grammar_compile_seconds_total=grammars.compile_seconds_total if grammars else 0.0,
            grammar_cache_hits_total=grammars.num_cache_hits if grammars else 0,
        )

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        running = {r.request_id for r in self.scheduler.running}
        waiting = {r.request_id for r in self.scheduler.waiting}
        assert not running & waiting, f"requests both running and waiting: {running & waiting}"
        awaiting = self._awaiting_grammar.ids()
        assert not (running | waiting) & awaiting, "requests both compiling and scheduled"
        assert running | waiting | awaiting == set(self._requests), \
            "engine and scheduler disagree"
        for r in self.scheduler.running:
            assert r.status is RequestStatus.RUNNING


def _auto_dtype_note(dtype: str, device: str) -> str:
    if device.startswith("cuda"):
        return " (dtype auto: bfloat16 where the GPU has it, else float16)"
    if dtype == "bfloat16":
        return " (dtype auto: this CPU computes bfloat16 natively)"
    return (" (dtype auto: this CPU has no native bfloat16; decode steps of a few tokens read "
            "int4 weights, --dtype float32 keeps them exact)")
