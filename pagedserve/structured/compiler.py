"""Constraints -> compiled grammars, in a worker thread, cached by constraint.

Compilation never runs on the engine loop: :meth:`GrammarCompiler.compile` returns a
``Future`` at once, and the work (building llguidance's view of the vocabulary the first time,
then the grammar's lexer and parser) happens in a thread of its own; llguidance releases the
GIL while it builds. A compiled grammar is kept as a matcher that never consumes a token; each
request gets a copy of it (cheap: the lexer tables are shared). Futures are cached by the
constraint's key, failures included, so a schema sent a thousand times compiles once and a
bad one is refused a thousand times without work.

    LLTokenizer   the model's tokenizer as llguidance sees it: token bytes, EOS ids, and a
                  vocabulary as wide as the logits (ids past the tokenizer's are never allowed)
    LLMatcher     one grammar's state: fills a row of the token bitmask, consumes tokens
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagedserve.structured.constraint import JSON_WHITESPACE, Constraint

if TYPE_CHECKING:
    from pagedserve.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (most recently used)


class GrammarError(ValueError):
    """A constraint that does not compile; ``detail`` says why, without the field's name."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(slots=True)
class CompiledGrammar:
    matcher: Any  # an llguidance.LLMatcher that never consumes: the template of each request's
    seconds: float  # how long compiling took

    def new_matcher(self) -> Any:
        return self.matcher.deep_copy()


class GrammarCompiler:
    """Compiles constraints for one model's vocabulary, off the caller's thread."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = CACHE_SIZE):
        self._tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)  # bitmask width, in tokens
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], Future[CompiledGrammar]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedserve-grammar")
        self._ll_tokenizer: Any = None
        self.num_compiled = 0
        self.num_cache_hits = 0
        self.compile_seconds_total = 0.0
        self.on_compiled: list[Callable[[float], None]] = []  # seconds of each compilation

    def compile(self, constraint: Constraint) -> Future[CompiledGrammar]:
        with self._lock:
            future = self._cache.get(constraint.key)
            if future is not None:
                self._cache.move_to_end(constraint.key)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, constraint)
            self._cache[constraint.key] = future
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the worker thread -------------------------------------------------------------------

    def _compile(self, constraint: Constraint) -> CompiledGrammar:
        import llguidance

        start = time.perf_counter()
        tokenizer = self._llg_tokenizer()
        try:
            grammar = _grammar_text(constraint)
            matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        except Exception as exc:  # noqa: BLE001 - what the client sent does not compile
            raise GrammarError(_first_line(str(exc)) or type(exc).__name__) from None
        if matcher.is_error():
            raise GrammarError(_first_line(matcher.get_error()))
        seconds = time.perf_counter() - start
        with self._lock:
            self.num_compiled += 1
            self.compile_seconds_total += seconds
        for callback in self.on_compiled:
            try:
                callback(seconds)
            except Exception:  # noqa: BLE001 - a metrics hook must not fail a compilation
                logger.exception("grammar compile callback failed")
        logger.debug("compiled a %s grammar in %.1f ms", constraint.kind, seconds * 1e3)
        return CompiledGrammar(matcher, seconds)

    def _llg_tokenizer(self) -> Any:
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


def _first_line(error: str) -> str:
    """llguidance's message without the parser-state dump that may follow it."""
    return error.split("\n<state>", 1)[0].strip()
