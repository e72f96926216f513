"""Constraints -> compiled grammars, on a bounded pool of threads, with limits, cached.

Compilation never runs on the engine loop: :meth:`GrammarCompiler.compile` returns a
``Future`` at once and a worker thread does the work (llguidance releases the GIL while it
builds). Several workers share a bounded queue, so one slow schema does not hold up another
client's small one; a full queue is a :class:`GrammarBusy` (503). Each compilation has a
deadline, ``limits.compile_seconds`` after it was asked for: a watchdog thread fails its
future then (a 400 naming the field if it had started, a 503 if it was still queued), and
the worker stops at its next phase; llguidance's fuel and the prechecks (precheck.py) bound
what a phase can cost, so no work outlives its deadline by more than one phase.

Compiling a grammar is more than llguidance's constructor, because llguidance reports most
limits late: a regex such as ``(a{1000}){3000}`` builds in a millisecond, its first mask then
walks forced bytes until the lexer runs out of fuel, and only the next token is refused. So a
worker, in order:

    precheck     property count, regex repetitions (precheck.py)     -> GrammarError
    LLMatcher    the grammar under llguidance's limits (limits.py)   -> GrammarError
    first mask   computed on the kept matcher: every request starts from it
    one token    a scratch copy consumes the first allowed token: a lexer that ran out of
                 fuel on the first mask says so here                 -> GrammarError

Errors carry llguidance's reason, never its parser state or the grammar's text.

Compiled grammars (and refusals, which hold nothing) are cached by constraint, bounded in
entries and bytes (cache.py); a grammar's bytes are what the heap grew by while it was built
(heap.py), never less than its text. A compiled grammar is a matcher that never consumes a
token; each request gets a copy of it (the grammar itself is shared, the lexer is copied).

    LLTokenizer   the model's tokenizer as llguidance sees it: token bytes, EOS ids, and a
                  vocabulary as wide as the logits (ids past the tokenizer's are never allowed)
    LLMatcher     one grammar's state: fills a row of the token bitmask, consumes tokens
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pagedserve.structured import precheck
from pagedserve.structured.cache import GrammarCache
from pagedserve.structured.constraint import JSON_WHITESPACE, Constraint
from pagedserve.structured.heap import heap_in_use, release_free_memory
from pagedserve.structured.limits import GrammarLimits

if TYPE_CHECKING:
    from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

MAX_REASON_CHARS = 200  # of llguidance's message, in ours
MIN_GRAMMAR_BYTES = 16 << 10  # the least a cached grammar is counted for
# words of llguidance's messages for the limits it enforces (ours say it is a limit)
_LIMIT_WORDS = ("too many expressions", "fuel", "Too many items", "too many states",
                "grammar size", "too large", "too complex")


class GrammarError(ValueError):
    """A constraint that does not compile; ``detail`` says why, without the field's name."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class GrammarBusy(RuntimeError):
    """No compile thread was free in time: the server is busy, the constraint may be fine."""


@dataclass(slots=True)
class CompiledGrammar:
    matcher: Any  # an llguidance.LLMatcher that never consumes: the template of each request's
    seconds: float  # how long compiling took
    num_bytes: int  # the memory it holds (an estimate, see heap.py)
    mask_seconds: float  # each request's budget for one mask

    def new_matcher(self) -> Any:
        return self.matcher.deep_copy()


_job_numbers = itertools.count()


@dataclass(slots=True, eq=False)
class _Job:
    constraint: Constraint
    future: Future[CompiledGrammar]
    deadline: float  # time.monotonic()
    started: bool = False  # a worker has taken it
    number: int = field(default_factory=lambda: next(_job_numbers))  # orders equal deadlines


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary, off the caller's thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int,
                 limits: GrammarLimits | None = None) -> None:
        self.limits = limits = limits or GrammarLimits()
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)  # bitmask width, in tokens
        self.cache = GrammarCache(limits.cache_entries, limits.cache_memory,
                                  limits.max_cached_grammar_bytes)
        self._lock = threading.Condition()  # guards the cache, the jobs and the counters
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._num_queued = 0
        self._deadlines: list[tuple[float, int, _Job]] = []  # a heap
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._ll_tokenizer: Any = None  # built once, by the first worker that needs it
        self._ll_limits: Any = None
        self._ll_lock = threading.Lock()
        self.num_compiled = 0
        self.num_refused = 0
        self.num_cache_hits = 0
        self.compile_seconds_total = 0.0
        self.on_compiled: list[Callable[[float], None]] = []  # seconds of each compilation

    def compile(self, constraint: Constraint) -> Future[CompiledGrammar]:
        """The compilation of ``constraint``: cached, under way, or queued now. Never blocks."""
        with self._lock:
            future = self.cache.get(constraint.key)
            if future is not None:
                self.num_cache_hits += 1
                return future
            future = Future()
            if self._closed or self._num_queued >= self.limits.compile_queue:
                future.set_exception(GrammarBusy(
                    f"{self._num_queued} grammars are waiting to compile, the limit is "
                    f"{self.limits.compile_queue} (pagedserve serve --grammar-compile-queue)"))
                return future
            self._start_threads()
            job = _Job(constraint, future, time.monotonic() + self.limits.compile_seconds)
            self.cache.add(constraint.key, future)
            self._num_queued += 1
            self._queue.put(job)
            heapq.heappush(self._deadlines, (job.deadline, job.number, job))
            self._lock.notify_all()
            return future

    def close(self) -> None:
        """Stop the threads; compilations still queued fail with :class:`GrammarBusy`."""
        with self._lock:
            self._closed = True
            for _, _, job in self._deadlines:
                if not job.future.done():
                    job.future.set_exception(GrammarBusy("the server is shutting down"))
            self._deadlines.clear()
            self._lock.notify_all()
            for _ in self._threads:
                self._queue.put(None)

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes

    # -- threads -----------------------------------------------------------------------------

    def _start_threads(self) -> None:
        if self._threads:
            return
        for i in range(self.limits.compile_threads):
            thread = threading.Thread(target=self._work, name=f"pagedserve-grammar-{i}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._watch, name="pagedserve-grammar-deadlines",
                         daemon=True).start()

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                self._num_queued -= 1
                if job.future.done():  # its deadline passed while it waited
                    continue
                job.started = True
            self._run(job)

    def _watch(self) -> None:
        """Fail each compilation that is not done by its deadline."""
        with self._lock:
            while not self._closed:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    self._expire(heapq.heappop(self._deadlines)[2])
                self._lock.wait(self._deadlines[0][0] - now if self._deadlines else None)

    def _expire(self, job: _Job) -> None:
        if job.future.done():
            return
        seconds = self.limits.compile_seconds
        logger.info("a %s constraint (%s) did not compile within %g s%s", job.constraint.kind,
                    job.constraint.field, seconds, "" if job.started else " (still queued)")
        if job.started:  # refused, and so cached: the same grammar would take as long again
            self.num_refused += 1
            job.future.set_exception(GrammarError(
                f"the grammar did not compile within {seconds:g} s (pagedserve serve "
                "--grammar-compile-timeout)"))
        else:  # the compile threads were busy with others: it may be fine, try again later
            self.cache.discard(job.constraint.key)
            job.future.set_exception(GrammarBusy(
                f"no compile thread was free for {seconds:g} s (pagedserve serve "
                "--grammar-compile-threads)"))

    # -- the worker threads ------------------------------------------------------------------

    def _run(self, job: _Job) -> None:
        start = time.perf_counter()
        refused = None
        try:
            self._llg_tokenizer()  # the first time: not a cost of this grammar's
            before = heap_in_use()
            matcher, text_bytes = self._build(job.constraint, job.deadline)
        except GrammarError as exc:
            refused = exc.detail  # the traceback, and the matcher its frames hold, go here
        except Exception as exc:  # noqa: BLE001 - the request fails (a 500), the thread lives
            logger.exception("compiling a %s grammar failed", job.constraint.kind)
            with self._lock:
                if not job.future.done():
                    self.cache.discard(job.constraint.key)
                    job.future.set_exception(RuntimeError(
                        f"compiling the grammar failed: {type(exc).__name__}"))
            return
        if refused is not None:
            self._refuse(job, refused)
            return
        seconds = time.perf_counter() - start
        after = heap_in_use()
        grown = after - before if after is not None and before is not None else 0
        num_bytes = max(grown, text_bytes, MIN_GRAMMAR_BYTES)
        compiled = CompiledGrammar(matcher, seconds, num_bytes, self.limits.mask_seconds)
        with self._lock:
            if job.future.done():  # past its deadline: refused already, and cached so
                return
            job.future.set_result(compiled)
            kept = self.cache.settle(job.constraint.key, num_bytes)
            self.num_compiled += 1
            self.compile_seconds_total += seconds
        logger.debug("compiled a %s grammar in %.1f ms, %.1f MiB%s", job.constraint.kind,
                     seconds * 1e3, num_bytes / 2**20, "" if kept else " (too big to keep)")
        for callback in self.on_compiled:
            try:
                callback(seconds)
            except Exception:  # noqa: BLE001 - a metrics hook must not fail a compilation
                logger.exception("grammar compile callback failed")

    def _refuse(self, job: _Job, detail: str) -> None:
        """Hand back what the attempt allocated, then fail the job with a fresh exception (no
        traceback: the cache keeps none of the attempt's memory)."""
        release_free_memory()
        with self._lock:
            if job.future.done():  # past its deadline: refused already
                return
            job.future.set_exception(GrammarError(detail))
            self.cache.settle(job.constraint.key, 0)
            self.num_refused += 1
        logger.info("refused a %s constraint (%s): %s", job.constraint.kind,
                    job.constraint.field, detail)

    def _build(self, constraint: Constraint, deadline: float) -> tuple[Any, int]:
        """The kept matcher, its first mask computed, and the length of its grammar's text."""
        import llguidance

        try:
            precheck.check(constraint, self.limits)
            text = _grammar_text(constraint)
        except ValueError as exc:
            raise GrammarError(_first_line(str(exc)) or type(exc).__name__) from None
        tokenizer = self._llg_tokenizer()
        try:
            matcher = llguidance.LLMatcher(tokenizer, text, log_level=0,
                                           limits=self._ll_limits)
        except Exception as exc:  # noqa: BLE001 - what the client sent does not compile
            raise GrammarError(short_reason(str(exc)) or type(exc).__name__) from None
        _check(matcher)
        _check_deadline(deadline, self.limits)
        mask = matcher.compute_bitmask()
        _check(matcher)
        token = _first_allowed(mask, self.vocab_size, set(tokenizer.eos_tokens))
        if token is not None:
            _check_deadline(deadline, self.limits)
            scratch = matcher.deep_copy()
            scratch.consume_token(token)
            _check(scratch)
        return matcher, len(text)

    def _llg_tokenizer(self) -> Any:
        with self._ll_lock:
            return self._llg_tokenizer_locked()

    def _llg_tokenizer_locked(self) -> Any:
        if self._ll_tokenizer is None:
            import llguidance

            start = time.perf_counter()
            try:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                    eos_token=list(self._tokenizer.eos_token_ids) or None)
            except Exception as exc:  # noqa: BLE001 - reported as a reason to refuse
                raise GrammarError(f"this model's tokenizer cannot be used for structured "
                                   f"outputs: {exc}") from None
            self._ll_limits = self.limits.parser_limits()
            logger.info("structured outputs: the vocabulary of %d tokens prepared in %.2f s",
                        self.vocab_size, time.perf_counter() - start)
        return self._ll_tokenizer


def _grammar_text(constraint: Constraint) -> str:
    """llguidance's serialized grammar for a constraint (not yet checked)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if constraint.kind == "json_schema":
        return LLMatcher.grammar_from_json_schema(
            constraint.spec, overrides={"whitespace_pattern": JSON_WHITESPACE})
    if constraint.kind == "regex":
        return LLMatcher.grammar_from_regex(constraint.spec)
    text = constraint.lark()
    if constraint.kind == "grammar":
        try:  # GBNF (llama.cpp's, what xgrammar takes) becomes Lark; Lark passes through
            text = any_to_lark(text)
        except Exception as exc:  # noqa: BLE001 - the converter raises several kinds
            raise ValueError(f"not a valid Lark or GBNF grammar: {exc}") from None
    return LLMatcher.grammar_from_lark(text)


def _check(matcher: Any) -> None:
    if matcher.is_error():
        raise GrammarError(short_reason(matcher.get_error()))


def _check_deadline(deadline: float, limits: GrammarLimits) -> None:
    """Stop between phases once the watchdog has refused the compilation."""
    if time.monotonic() > deadline:
        raise GrammarError(f"the grammar did not compile within {limits.compile_seconds:g} s")


def _first_allowed(mask: bytes, vocab_size: int, eos: set[int]) -> int | None:
    """The lowest token id a bitmask allows, other than EOS (None if EOS is all it allows)."""
    bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")[:vocab_size]
    for token in np.flatnonzero(bits)[:len(eos) + 1].tolist():
        if token not in eos:
            return token
    return None


def short_reason(error: str) -> str:
    """llguidance's message, short: its first line, without the parser state or the grammar
    that may follow; where it is one of llguidance's limits, it says so."""
    line = _first_line(error)
    if any(words in line for words in _LIMIT_WORDS):
        line = f"the grammar is too complex for this server's limits ({line})"
    return line


def _first_line(error: str) -> str:
    line = error.split("\n", 1)[0].replace("<non-verbose/>", "").strip()
    if len(line) > MAX_REASON_CHARS:
        line = line[:MAX_REASON_CHARS].rstrip() + "..."
    return line
