"""The engine core: requests in, one iteration per :meth:`EngineCore.step`, token ids out.

A step is schedule -> execute -> update. Everything stateful has its own object: the scheduler
decides who runs, the KV manager (paged or static) decides where their K/V live, the model
runner computes and samples, a grammar per constrained request follows its tokens. The core
deals in token ids only: text (detokenizing, stop strings) is the front end's
(:mod:`pagedserve.engine.output_processor`), which asks the core to abort a request whose text
hit a stop string.

With ``tensor_parallel_size`` N > 1 the core is rank 0 of N: its runner holds a shard of the
model and drives N - 1 worker processes in lockstep (:mod:`pagedserve.engine.workers`); the
scheduler, the KV manager's block tables and sampling stay here, once. A lost rank is a
:class:`TensorParallelError` out of :meth:`EngineCore.step`: the core stops.

The core is single-threaded. It runs inside :class:`~pagedserve.engine.llm_engine.Engine`
(offline, in the caller's thread), in a thread of the server (tests), or in a process of its
own behind a busy loop (:mod:`pagedserve.engine.core_process`, what ``serve`` runs).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.core.block_manager import BlockManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import ScheduledRequest, Scheduler
from pagedserve.core.static_slots import StaticSlotManager
from pagedserve.engine.info import EngineInfo
from pagedserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineStats,
    StepStats,
)
from pagedserve.errors import EngineStepError, TensorParallelError
from pagedserve.outputs import RequestMetrics
from pagedserve.structured.compiler import GrammarBusy, GrammarCompiler
from pagedserve.structured.constraint import Constraint
from pagedserve.structured.state import GrammarState, GrammarWaitingRoom

if TYPE_CHECKING:
    from pagedserve.engine.workers import TensorParallelWorkers
    from pagedserve.loader import LoadedModel, ModelInfo
    from pagedserve.tokenizer import Tokenizer
    from pagedserve.worker.execution_plan import ExecutionPlan
    from pagedserve.worker.model_runner import LaunchedStep
    from pagedserve.worker.prompt_logprobs import PromptLogprobs
    from pagedserve.worker.sampler import SampledToken

logger = logging.getLogger(__name__)

# Consecutive steps in which every request failed before the core gives up: one bad request
# fails alone, but a model that fails every step (a broken device) must not look healthy.
MAX_FAILED_STEPS = 8


class EngineCore:
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
        workers: TensorParallelWorkers | None = None,  # tensor parallel: `weights` is rank 0's
        plan: ExecutionPlan | None = None,  # None: resolved here from `config`
    ):
        from pagedserve.device import check_device
        from pagedserve.parallel.tensor_shard import tensor_parallel_config
        from pagedserve.worker.execution_plan import resolve_execution_plan, with_plan
        from pagedserve.worker.model_runner import ModelRunner, kv_bytes_per_token

        config = tensor_parallel_config(config or EngineConfig())
        check_device(config.device)
        if (config.tensor_parallel_size > 1) != (workers is not None):
            raise ValueError("tensor_parallel_size > 1 needs its workers: build the core with "
                             "EngineCore.from_model")
        self.plan = plan = plan if plan is not None else resolve_execution_plan(config)
        self.config = config = with_plan(config, plan)
        logger.info("computing in %s on %s (dtype %s)", plan.dtype, plan.device,
                    plan.why["dtype"])
        if plan.kv_cache_dtype != plan.dtype:
            logger.info("KV cache in %s", plan.kv_cache_dtype)
        if plan.threads is not None:
            logger.info("computing with %d threads: %s", plan.threads, plan.why["threads"])
        logger.info("execution plan: %s", plan.summary())
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.model_name = model_name
        self.workers = workers
        self.runner = ModelRunner(model_config, weights, config, consume_weights,
                                  tp=workers.group if workers is not None else None, plan=plan)
        if workers is not None:
            workers.collect_reports(self.runner.model.weight_bytes())
        # this rank's K/V heads: under tensor parallelism each rank caches its own
        per_token = kv_bytes_per_token(self.runner.config, config.kv_cache_dtype)
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
            budget = self._kv_cache_budget(model_len, per_token)
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
        self.grammars = (GrammarCompiler(tokenizer, model_config.vocab_size,
                                         config.grammar_limits)
                         if tokenizer is not None else None)
        self._compile_seconds: list[float] = []
        if self.grammars is not None:
            self.grammars.on_compiled.append(self._compile_seconds.append)
        self._awaiting_grammar = GrammarWaitingRoom()
        self._constrained_total = 0
        self._eos = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self._requests: dict[str, Request] = {}
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._failed_steps = 0  # consecutive steps in which every request failed
        # overlap: the step on the device whose tokens the host has not read yet
        self.async_scheduling = plan.async_scheduling
        self._in_flight: _InFlight | None = None
        self.embeddings = _decoder_embeddings(self)
        capacity = self.kv.capacity_tokens
        logger.info(
            "KV cache (%s): %d blocks x %d tokens = %d tokens, %.1f MiB; max_model_len %d: "
            "%.1f sequences of full length fit",
            config.kv_layout, self.kv.num_blocks, config.block_size, capacity,
            capacity * per_token / 2**20, self.max_model_len, capacity / self.max_model_len,
        )

    def _kv_cache_budget(self, model_len: int, per_token: int) -> int:
        """Bytes for the paged KV cache, as the plan's kv_sizing says: kv_cache_memory's, else
        the device's share (kv_sizing.py), and no more than kv_cache_sequences sequences of
        model_len when set."""
        from pagedserve.core.kv_sizing import cpu_kv_cache_bytes, kv_cache_bytes_for_gpu

        config = self.config
        if self.plan.kv_sizing == "fixed":
            return config.kv_cache_memory
        if self.plan.kv_sizing == "share":  # a CPU's share of its free memory
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
    ) -> EngineCore:
        """`consume_weights` (default: when this loads the model itself): the core may empty
        the weights dict as it fuses tensors, freeing the unfused copies early."""
        from pagedserve.device import check_device
        from pagedserve.loader import LoadedModel, load_model
        from pagedserve.parallel.tensor_shard import tensor_parallel_config
        from pagedserve.worker.execution_plan import resolve_config_dtype, resolve_execution_plan

        config = tensor_parallel_config(config or EngineConfig())
        check_device(config.device)  # before loading: the CUDA build may be missing
        loaded_here = not isinstance(model, LoadedModel)
        workers = shard = None
        if config.tensor_parallel_size > 1:
            if not loaded_here:
                raise ValueError("tensor_parallel_size > 1: each rank loads its shard from the "
                                 "file; pass the model's path, not a LoadedModel")
            # every rank computes in the dtype rank 0 chose, and resolves its plan from it
            config = dataclasses.replace(config, dtype=resolve_config_dtype(config))
        plan = resolve_execution_plan(config)  # before loading: the weights' dtype is its
        if config.tensor_parallel_size > 1:
            from pagedserve.engine.workers import TensorParallelWorkers

            # every rank computes with the share of this host's threads the plan gave rank 0
            workers = TensorParallelWorkers.start(
                str(model), load_format, dataclasses.replace(config, num_threads=plan.threads))
            shard = workers.group.shard
        try:
            if loaded_here:
                model = load_model(model, load_format=load_format, dtype=plan.dtype,
                                   progress=progress, device=config.device, shard=shard)
            name = model_name or (Path(model.info.path).name if model.info else "model")
            consume = loaded_here if consume_weights is None else consume_weights
            return cls(model.config, model.weights, model.tokenizer, config, model.info, name,
                       consume_weights=consume, workers=workers, plan=plan)
        except BaseException:
            if workers is not None:
                workers.close()
            raise

    def info(self) -> EngineInfo:
        return EngineInfo(
            model_name=self.model_name, model_config=self.model_config, config=self.config,
            tokenizer=self.tokenizer, model_info=self.model_info,
            max_model_len=self.max_model_len, max_prompt_chars=self.max_prompt_chars,
            max_num_seqs=self.scheduler.max_num_seqs, kv_capacity_tokens=self.kv.capacity_tokens,
            kv_num_blocks=self.kv.num_blocks,
            # embedding batches run on rank 0 alone: not under tensor parallelism
            embedding=self.embeddings.inputs if self.workers is None else None)

    # -- requests ------------------------------------------------------------------------
    def grammar_for(self, constraint: Constraint) -> GrammarState:
        """A grammar for one request, compiling (or found in the cache) in the compiler's
        thread: ``wait()`` tells when it is ready, or raises ValueError naming the field."""
        if self.grammars is None:
            raise ValueError(f"{constraint.field}: this model has no tokenizer, which "
                             "structured outputs need")
        return GrammarState(constraint, self.grammars.compile(constraint),
                            self.grammars.vocab_size)

    def add_request(self, request: EngineCoreRequest,
                    grammar: GrammarState | None = None) -> None:
        """Queue a request; a constrained one first waits for its grammar (``grammar``, if the
        caller made it with :meth:`grammar_for`): its admission is announced by an empty
        output, or it ends with a client error."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        constraint = request.params.constraint
        if self.workers is not None and request.params.prompt_logprobs is not None:
            raise ValueError("prompt_logprobs: not supported with tensor_parallel_size > 1")
        if grammar is None and constraint is not None:
            grammar = self.grammar_for(constraint)
        params = request.params
        r = Request(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=params,
            eos_token_ids=self._eos,
            max_tokens=request.max_tokens,
            metrics=RequestMetrics(request.arrival_time),
            grammar=grammar,
            client_index=request.client_index,
        )
        self._requests[r.request_id] = r
        if grammar is None:
            self.scheduler.add(r)
        else:
            r.status = RequestStatus.WAITING_FOR_GRAMMAR  # joins the scheduler once compiled
            self._awaiting_grammar.add(r)

    def abort_requests(self, request_ids: list[str]) -> list[EngineCoreOutput]:
        """Stop requests now and free their KV blocks; the final outputs of those still live."""
        outputs = []
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is not None:
                outputs.append(self._finish(request, "abort", None,
                                            EngineCoreOutput(request_id)))
        return outputs

    def request_ids(self) -> set[str]:
        return set(self._requests)

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or len(self._awaiting_grammar) > 0
                or self._in_flight is not None)

    def has_runnable_requests(self) -> bool:
        """Whether a step would do something now (not only wait for grammars)."""
        return self.scheduler.has_unfinished() or self._in_flight is not None or any(
            r.grammar.ready for r in self._awaiting_grammar.requests())

    def wait_for_grammars(self, timeout: float) -> None:
        """Block until a compilation ends or ``timeout`` seconds pass (an engine idle but for
        compiling grammars)."""
        self._awaiting_grammar.wait(timeout)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One iteration: schedule and launch a step, then read the tokens of the step before
        it (with overlap: the device runs this step while the host reads the previous one and
        goes on to schedule the next) or of this one (without)."""
        start = time.monotonic()
        if self.workers is not None:
            self.workers.check()
        outputs = self._admit_compiled()
        plan = self.scheduler.schedule()
        launched = None
        if plan.scheduled:
            launched, failed = self._launch(plan.scheduled)
            outputs += failed
        previous, self._in_flight = self._in_flight, None
        if previous is not None:
            outputs += self._resolve(previous, launched)
        if launched is not None:
            if self.async_scheduling and not launched.needs_host:
                self._in_flight = launched
            else:
                outputs += self._resolve(launched, None)
        now = time.monotonic()
        if not plan.scheduled and previous is None:
            return EngineCoreOutputs(outputs, now, None, self.stats(),
                                     self._take_compile_seconds())
        num_decoding = sum(1 for s in plan.scheduled if s.is_decode)
        step = StepStats(
            num_scheduled_tokens=plan.num_batched_tokens,
            num_prompt_tokens=plan.num_batched_tokens - num_decoding,
            num_generation_tokens=sum(len(o.new_token_ids) for o in outputs),
            num_preempted=len(plan.preempted),
            duration=now - start,
        )
        return EngineCoreOutputs(outputs, now, step, self.stats(), self._take_compile_seconds())

    def _take_compile_seconds(self) -> list[float]:
        taken, self._compile_seconds[:] = self._compile_seconds[:], []
        return taken

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Requests whose grammar has compiled go to the scheduler, announced by an empty
        output; those whose grammar did not compile end with the reason (a client error)."""
        outputs = []
        for request in self._awaiting_grammar.pop_compiled():
            try:
                request.grammar.start()
            except ValueError as exc:  # the constraint does not compile: the client's fault
                out = self._fail(request, exc)
                out.error, out.client_error = str(exc), True
                outputs.append(out)
            except GrammarBusy as exc:  # no compile thread was free in time: retry later
                out = self._fail(request, exc)
                out.error, out.busy = str(exc), True
                outputs.append(out)
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                outputs.append(self._fail(request, exc))
            else:
                self._constrained_total += 1
                self.scheduler.add(request)
                outputs.append(EngineCoreOutput(request.request_id))
        return outputs

    def _launch(self, scheduled: list[ScheduledRequest]) -> tuple[_InFlight | None,
                                                                  list[EngineCoreOutput]]:
        """Queue the step and advance its requests (their sampled tokens become placeholders).

        If the step fails, it runs each request alone so that only a request whose own step
        fails is lost (a fault that does not repeat loses nothing). Running a subset of the
        plan is safe: each request's K/V slots and attention are its own, and a request that
        is run again writes the same K/V at the same slots. Those runs are read at once.
        """
        try:
            launched = self.runner.launch(scheduled)
        except TensorParallelError:
            raise  # a rank is lost: every request would fail alone too
        except Exception as exc:  # noqa: BLE001 - isolated below, per request
            outputs = []
            previous, self._in_flight = self._in_flight, None
            if previous is not None:  # its tokens first: the requests run alone need them
                outputs += self._resolve(previous, None)
            alive = [s for s in scheduled if not s.request.finished]
            if len(alive) == 1:
                logger.exception("step failed for request %s", alive[0].request.request_id)
                ok, tokens, failures = [], [], [(alive[0], exc)]
            else:
                logger.warning("a step of %d requests failed (%r); running each alone",
                               len(alive), exc)
                ok, tokens, failures = self._execute_each_alone(alive)
            outputs += [self._fail(s.request, e) for s, e in failures]
            if ok:
                self._failed_steps = 0
            else:
                self._failed_steps += 1
                if self._failed_steps >= MAX_FAILED_STEPS:
                    raise EngineStepError(
                        f"{self._failed_steps} steps in a row failed for every request in "
                        f"them; the last error: {failures[-1][1]!r}") from failures[-1][1]
            if ok:
                from pagedserve.worker.model_runner import LaunchedStep

                flight = self._advance(ok, LaunchedStep.done(tokens))
                flight.prompt_logprobs = self.runner.take_prompt_logprobs()
                outputs += self._resolve(flight, None)
            return None, outputs
        self._failed_steps = 0
        flight = self._advance(scheduled, launched)
        flight.prompt_logprobs = self.runner.take_prompt_logprobs()
        return flight, []

    def _execute_each_alone(self, scheduled: list[ScheduledRequest]) -> tuple[
            list[ScheduledRequest], list[SampledToken | None],
            list[tuple[ScheduledRequest, Exception]]]:
        ok, sampled, failures = [], [], []
        for s in scheduled:
            try:
                [token] = self.runner.execute([s])
            except TensorParallelError:
                raise
            except Exception as exc:  # noqa: BLE001 - this request fails alone
                logger.exception("step failed for request %s", s.request.request_id)
                failures.append((s, exc))
            else:
                ok.append(s)
                sampled.append(token)
        return ok, sampled, failures

    @staticmethod
    def _advance(scheduled: list[ScheduledRequest], launched: LaunchedStep) -> _InFlight:
        """Count the step's tokens as computed and reserve the tokens it samples."""
        reserved: list[int | None] = []
        needs_host = False
        for s in scheduled:
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            reserved.append(r.append_placeholder() if s.samples else None)
            needs_host = needs_host or _needs_host(r)
        return _InFlight(scheduled, launched, reserved, needs_host)

    def _resolve(self, flight: _InFlight, following: _InFlight | None
                 ) -> list[EngineCoreOutput]:
        """Read a launched step's tokens into its requests: their outputs, and their ends (a
        stop token, max_tokens, a complete grammar). ``following``: the step launched after
        it, which fed on its ids on the device."""
        try:
            sampled = flight.launched.result()
        except Exception as exc:  # noqa: BLE001 - the device failed after the launch
            logger.exception("reading a step's tokens failed")
            return [self._fail(s.request, exc) for s in flight.scheduled
                    if not s.request.finished]
        if following is not None:
            for i in flight.launched.changed:  # the device fed the next step another id
                request = flight.scheduled[i].request
                if i not in flight.taken_back and not request.finished:
                    following.take_back(request)
        now = time.monotonic()
        outputs = []
        for i, (s, token) in enumerate(zip(flight.scheduled, sampled, strict=True)):
            request = s.request
            if request.finished or i in flight.taken_back:
                continue  # ended (or taken back) meanwhile: this step's token is not its own
            try:
                out = self._update_one(request, flight.reserved[i], token, now,
                                       flight.prompt_logprobs.get(request.request_id))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("updating request %s failed", request.request_id)
                out = self._fail(request, exc) if not request.finished else None
            if out is not None:
                outputs.append(out)
        return outputs

    def _update_one(self, request: Request, index: int | None, token: SampledToken | None,
                    now: float, prompt_logprobs: PromptLogprobs | None = None
                    ) -> EngineCoreOutput | None:
        """One request's share of a step it ran: the K/V it computed can be shared, its
        sampled token is filled in, and it finishes on a stop token, at max_tokens, or when
        its grammar is complete. None while it is still prefilling, unless the step computed
        some of its prompt logprobs. A request of ``max_tokens`` 0 ends when its prompt is
        computed, keeping no token."""
        if index is not None:
            request.fill(index, token.token_id)
        if request.status is RequestStatus.RUNNING:
            self.kv.commit(request.request_id, request.all_token_ids,
                           min(request.num_computed_tokens, request.num_known_tokens))
        out = EngineCoreOutput(request.request_id)
        if prompt_logprobs is not None:
            _add_prompt_logprobs(request, out, prompt_logprobs)
        if index is None:
            return out if prompt_logprobs is not None else None
        if index == 0:
            self._prompt_tokens_total += request.num_prompt_tokens
            out.first_scheduled_time = request.metrics.first_scheduled_time
            out.num_cached_tokens = request.num_cached_tokens
            if request.max_tokens == 0:
                return self._finish(request, "length", None, out)
            request.metrics.first_token_time = now
        out.new_token_ids = [token.token_id]
        self._generation_tokens_total += 1
        request.metrics.last_token_time = now
        if token.logprob is not None:
            out.logprobs = [token.logprob]
            top = token.top or []
            out.top_ids = [[t for t, _ in top]]
            out.top_logprobs = [[lp for _, lp in top]]
        finish = request.check_stop_token(index)
        out.stop_token = finish is not None and finish[0] == "stop"
        if request.grammar is not None:
            request.grammar.advance(request.output_token_ids)
            if request.grammar.finished and (finish is None or finish[0] == "length"):
                finish = ("stop", None)  # the grammar admits nothing more: the answer is whole
        if finish:
            return self._finish(request, finish[0], finish[1], out)
        return out

    def _fail(self, request: Request, exc: BaseException) -> EngineCoreOutput:
        """End a request whose step failed: its blocks are freed, its caller gets the error."""
        out = EngineCoreOutput(request.request_id, error=f"{type(exc).__name__}: {exc}")
        return self._finish(request, "error", None, out)

    def _finish(self, request: Request, reason: str, stop_reason: int | None,
                out: EngineCoreOutput) -> EngineCoreOutput:
        self.scheduler.finish(request)
        self._awaiting_grammar.remove(request.request_id)
        del self._requests[request.request_id]
        request.finish_reason, request.stop_reason = reason, stop_reason
        request.metrics.finished_time = time.monotonic()
        out.finish_reason, out.stop_reason = reason, stop_reason
        out.num_preemptions = request.metrics.num_preemptions
        out.num_cached_tokens = request.num_cached_tokens
        if out.first_scheduled_time is None:
            out.first_scheduled_time = request.metrics.first_scheduled_time
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
            num_waiting_for_grammar=len(self._awaiting_grammar),
            **self.embeddings.counters(),
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

    def close(self) -> None:
        if self.grammars is not None:
            self.grammars.close()
        if self.workers is not None:
            self.workers.close()
            self.workers = None


class _InFlight:
    """A launched step: what it scheduled, the output index it reserved for each request that
    samples (None for a chunk mid-prompt), whether the next step must wait for its ids on the
    host (a grammar's mask and penalties are computed from the tokens so far), and the prompt
    logprobs it computed."""

    def __init__(self, scheduled: list[ScheduledRequest], launched: LaunchedStep,
                 reserved: list[int | None],
                 needs_host: bool) -> None:
        self.scheduled = scheduled
        self.launched = launched
        self.reserved = reserved
        self.needs_host = needs_host
        self.taken_back: set[int] = set()
        self.prompt_logprobs: dict[str, PromptLogprobs] = {}  # computed by this step

    def take_back(self, request: Request) -> None:
        """Undo this step for ``request``: its input token turned out to be another one than
        the device fed it, so the K/V it wrote and the token it sampled are wrong. The request
        computes that position again next step; the token this step samples is dropped."""
        for i, s in enumerate(self.scheduled):
            if s.request is request and i not in self.taken_back:
                self.taken_back.add(i)
                request.num_computed_tokens -= s.num_new_tokens
                if self.reserved[i] is not None:
                    request.drop_last_placeholder()
                return


def _needs_host(request: Request) -> bool:
    """The request's next step needs this step's token on the host before it is prepared (or,
    owing prompt logprobs, must be read before the runner computes the next piece)."""
    p = request.params
    penalized = (p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty) \
        and p.repeat_last_n != 0
    return request.grammar is not None or bool(penalized) or request.owes_prompt_logprobs


def _decoder_embeddings(core: EngineCore):
    """The core's embedding requests: its model's final hidden states, pooled (the last
    token's), computed between steps with caches of their own; batches the size of a step."""
    from pagedserve.engine.embedding_queue import EmbeddingQueue
    from pagedserve.worker.embedder import Embedder

    embedder = Embedder.from_decoder(core.runner.model, core.tokenizer,
                                     backend=core.runner.attention, max_tokens=core.max_model_len)
    return EmbeddingQueue(embedder, core.config.max_num_batched_tokens)


def _add_prompt_logprobs(request: Request, out: EngineCoreOutput,
                         piece: PromptLogprobs) -> None:
    """Put the next piece of a request's prompt logprobs in its output, and count it sent."""
    if piece.start != request.prompt_logprobs_next:
        raise RuntimeError(f"prompt logprobs from token {piece.start} computed for a request "
                           f"that expects them from {request.prompt_logprobs_next}")
    request.prompt_logprobs_next = piece.end
    out.prompt_logprobs, out.prompt_ranks = piece.logprobs, piece.ranks
    out.prompt_top_ids, out.prompt_top_logprobs = piece.top_ids, piece.top_logprobs
