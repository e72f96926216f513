"""Hostile grammars are bounded: refused at compile time with a short reason, compiled on a
bounded pool within a deadline, cached within a memory budget, and masked within a time
budget (issue 27). The compiler runs on the bundled model's real 49k-token vocabulary."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest

from pagedserve.structured.cache import GrammarCache
from pagedserve.structured.compiler import GrammarBusy, GrammarCompiler, GrammarError
from pagedserve.structured.constraint import Constraint
from pagedserve.structured.heap import heap_in_use
from pagedserve.structured.limits import GrammarLimits
from pagedserve.structured.precheck import TooComplex, check, regex_span

BOMB = "^(a{1000}){1000}$"
INTERNALS = ("<state>", "<grammar>", "Parser:", "Tokens:", "lexer_cost", "\n")
# what a regex's own precheck refuses, for the tests that reach llguidance's limits
NO_PRECHECK = {"max_regex_repeat": 10**9, "max_schema_properties": 10**9}


@pytest.fixture(scope="module")
def tokenizer(smollm_gguf):
    from pagedserve.loader.gguf import GGUFFile, tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(smollm_gguf))


def compiler_of(tokenizer, **limits) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size, GrammarLimits(**limits))


def refusal(compiler: GrammarCompiler, constraint: Constraint, timeout: float = 60) -> str:
    with pytest.raises(GrammarError) as info:
        compiler.compile(constraint).result(timeout)
    return info.value.detail


def assert_short(reason: str, grammar_text: str = "a{1000}") -> None:
    assert len(reason) < 300, reason
    assert not any(word in reason for word in INTERNALS), reason
    assert grammar_text not in reason, reason


# -- prechecks: the shapes llguidance cannot bound -----------------------------------------------

@pytest.mark.parametrize("pattern, span", [
    ("(a{1000}){3000}", 20_001), ("a{1000000}", 20_001), (BOMB, 20_001),
    (r"[0-9]{3}-[a-z]{2,4}", 8), ("a*b+c?", 2), (r"\p{L}{5}", 5), ("(?i)ab{3}", 4),
    ("(?:ab|cde){2}", 6), ("[]a]{4}", 4), (r"[\]]{7}", 7), ("(a|b{10}c)*", 0),
    (r"^\d{4}-\d{2}-\d{2}$", 10), ("a{2,}", 2), ("a{x}", 4), ("a)b{50}", 50),
    ("(a{100}){200}", 20_000), ("(a{100}){201}", 20_001),
])
def test_regex_span_counts_what_counted_repetitions_spell(pattern, span):
    assert regex_span(pattern, 20_000) == span


@pytest.mark.parametrize("constraint", [
    Constraint.regex("(a{1000}){3000}", "structured_outputs.regex"),
    Constraint.json_schema({"type": "string", "pattern": BOMB}, "format"),
    Constraint.json_schema({"type": "object", "properties": {"deep": {"type": "array", "items": {
        "type": "string", "pattern": BOMB}}}}, "format"),
    Constraint.json_schema({"type": "object", "patternProperties": {BOMB: {}}}, "format"),
    Constraint.grammar("start: A\nA: /(a{1000}){1000}/", "structured_outputs.grammar"),
    Constraint.grammar('start: "x" B\nB: %json {"type": "string", "pattern": "' + BOMB + '"}',
                       "tools"),
])
def test_prechecks_find_patterns_where_clients_put_them(constraint):
    with pytest.raises(TooComplex, match="more than 10000 characters .*--grammar-max-regex"):
        check(constraint, GrammarLimits())


@pytest.mark.parametrize("constraint", [
    # a "pattern" that is data, a "/" inside a string or a comment, a property named pattern
    Constraint.json_schema({"enum": [{"pattern": BOMB}], "description": BOMB}, "format"),
    Constraint.grammar('start: "/a{99999}/" X // /a{99999}/\nX: /[0-9]{3}/', "g"),
    Constraint.json_schema({"type": "object", "properties": {"pattern": {"type": "string"}}},
                           "format"),
])
def test_prechecks_leave_what_is_not_a_pattern_alone(constraint):
    check(constraint, GrammarLimits())


def test_properties_are_counted_across_a_schema():
    def objects(n: int, each: int) -> dict:
        return {"type": "object", "properties": {
            f"o{j}": {"type": "object", "properties": {f"p{i}": {} for i in range(each)}}
            for j in range(n)}}

    check(Constraint.json_schema(objects(4, 1000), "f"), GrammarLimits())  # 4004 properties
    with pytest.raises(TooComplex, match="5202 object properties, over the limit of 5000"):
        check(Constraint.json_schema(objects(2, 2600), "f"), GrammarLimits())
    lark = 'start: "x" B\nB: %json ' + json.dumps(objects(2, 2600))
    with pytest.raises(TooComplex, match="--grammar-max-schema-properties"):
        check(Constraint.grammar(lark, "tools"), GrammarLimits())


def test_limits_are_validated_with_their_names():
    with pytest.raises(ValueError, match="^compile_seconds must be a positive number"):
        GrammarLimits(compile_seconds=0)
    with pytest.raises(ValueError, match="^compile_threads must be an integer"):
        GrammarLimits(compile_threads=1.5)
    assert GrammarLimits(cache_memory=64 << 20).max_cached_grammar_bytes == 16 << 20


def test_the_serve_flags_reach_the_engine_config():
    import argparse

    from pagedserve.cli import serve
    from pagedserve.engine_args import engine_config_from_args

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--grammar-compile-timeout", "2.5",
                              "--grammar-cache-memory", "64MiB", "--grammar-mask-budget", "0.02",
                              "--grammar-lexer-fuel", "5000"])
    limits = engine_config_from_args(args).grammar_limits
    assert (limits.compile_seconds, limits.cache_memory, limits.mask_seconds,
            limits.lexer_fuel) == (2.5, 64 << 20, 0.02, 5000)
    assert limits.compile_threads == GrammarLimits().compile_threads
    bad = parser.parse_args(["serve", "--grammar-compile-threads", "0"])
    with pytest.raises(ValueError, match="^--grammar-compile-threads must be a positive"):
        engine_config_from_args(bad)


# -- the cache ------------------------------------------------------------------------------------

def test_the_cache_keeps_the_most_recently_used_within_entries_and_bytes():
    from concurrent.futures import Future

    cache = GrammarCache(max_entries=3, max_bytes=100, max_entry_bytes=50)
    keys = [("regex", str(i)) for i in range(6)]
    for key in keys[:3]:
        cache.add(key, Future())
    assert cache.settle(keys[0], 40) and cache.settle(keys[1], 40) and cache.settle(keys[2], 0)
    assert (len(cache), cache.bytes) == (3, 80)
    cache.get(keys[0])  # 0 is now the most recently used: 1 goes first
    cache.add(keys[3], Future())
    assert [k in cache for k in keys[:4]] == [True, False, True, True]
    assert cache.settle(keys[3], 45)  # 40 + 0 + 45 = 85
    cache.add(keys[4], Future())  # over 3 entries: 2, the oldest
    assert [k in cache for k in keys[:5]] == [True, False, False, True, True]
    assert cache.settle(keys[4], 30)  # 115 bytes: the oldest (0) goes
    assert [k in cache for k in keys[:5]] == [False, False, False, True, True]
    assert cache.bytes == 75
    cache.add(keys[5], Future())
    assert not cache.settle(keys[5], 51)  # bigger than an entry may be: not kept
    assert keys[5] not in cache and cache.bytes == 75 and len(cache) == 2


# -- the compiler ---------------------------------------------------------------------------------

@pytest.mark.parametrize("constraint, text", [
    (Constraint.regex("(a{1000}){3000}", "structured_outputs.regex"), "a{1000}"),
    (Constraint.regex("a{1000000}", "structured_outputs.regex"), "a{1000000}"),
    (Constraint.json_schema({"type": "string", "pattern": BOMB}, "format"), "a{1000}"),
    (Constraint.grammar("start: A\nA: /(a{1000}){1000}/", "structured_outputs.grammar"),
     "a{1000}"),
    (Constraint.grammar('start: A\nA: "a"~1000000', "structured_outputs.grammar"), "~"),
])
def test_llguidance_limits_refuse_bombs_at_compile_time_without_internals(tokenizer,
                                                                          constraint, text):
    """With the prechecks out of the way, llguidance's fuel (and the first mask and token the
    compiler tries) refuses each: a 400 before queueing, where it used to be a 500 midway."""
    compiler = compiler_of(tokenizer, **NO_PRECHECK)
    start = time.perf_counter()
    reason = refusal(compiler, constraint)
    assert time.perf_counter() - start < 10
    assert reason.startswith("the grammar is too complex for this server's limits"), reason
    assert_short(reason, text)
    compiler.close()


def test_a_refusal_is_cached_and_holds_no_memory(tokenizer):
    compiler = compiler_of(tokenizer, **NO_PRECHECK)
    compiler.compile(Constraint.regex("[0-9]+", "r")).result(60)  # the vocabulary, once
    before = heap_in_use()
    bomb = Constraint.regex("(a{1000}){3000}", "structured_outputs.regex")
    first = refusal(compiler, bomb)
    assert refusal(compiler, bomb) == first
    assert (compiler.num_refused, compiler.num_cache_hits) == (1, 1)
    assert compiler.cache_bytes < 1 << 20  # the small regex; the refusal counts 0
    if before is not None:  # glibc: the lexer states the bomb built are freed
        assert heap_in_use() - before < 8 << 20
    compiler.close()


def test_errors_from_llguidance_are_its_first_line(tokenizer):
    compiler = compiler_of(tokenizer)
    reason = refusal(compiler, Constraint.regex("(ab", "r"))
    assert "unclosed group" not in reason and "regex" in reason
    assert_short(reason, "start:")
    assert refusal(compiler, Constraint.grammar("start: nothing_here", "g")) == (
        'at 1(8): unknown name: "nothing_here"')
    compiler.close()


def test_a_slow_compile_does_not_hold_up_a_small_one(tokenizer):
    """4000 optional properties take seconds in llguidance's JSON compiler; a small schema
    sent meanwhile takes a second thread and milliseconds."""
    compiler = compiler_of(tokenizer)
    compiler.compile(Constraint.regex("[0-9]+", "r")).result(60)
    big = Constraint.json_schema({"type": "object", "properties": {
        f"property_{i:05d}": {"type": "string"} for i in range(4000)}}, "response_format")
    start = time.perf_counter()
    slow = compiler.compile(big)
    time.sleep(0.05)
    small = compiler.compile(Constraint.json_schema({"type": "object", "properties": {
        "ok": {"type": "boolean"}}, "required": ["ok"]}, "response_format"))
    small.result(60)
    small_done = time.perf_counter() - start
    with contextlib.suppress(GrammarError):  # it may go over llguidance's step items
        slow.result(60)
    slow_done = time.perf_counter() - start
    # not queued behind the slow one (whose own time depends on the machine: 1-3 s here)
    assert small_done < 1.0 and small_done * 3 < slow_done, (small_done, slow_done)
    compiler.close()


def test_a_compile_past_its_deadline_is_refused_and_what_waited_is_busy(tokenizer,
                                                                        monkeypatch):
    compiler = compiler_of(tokenizer, compile_seconds=0.5, compile_threads=1)
    release = threading.Event()
    build = GrammarCompiler._build

    def stuck(self, constraint, deadline):
        release.wait(30)
        return build(self, constraint, deadline)

    monkeypatch.setattr(GrammarCompiler, "_build", stuck)
    first, second = Constraint.regex("[0-9]+", "r"), Constraint.regex("[a-z]+", "r")
    start = time.perf_counter()
    running, queued = compiler.compile(first), compiler.compile(second)
    with pytest.raises(GrammarError, match="did not compile within 0.5 s"):
        running.result(10)
    with pytest.raises(GrammarBusy, match="no compile thread was free for 0.5 s"):
        queued.result(10)
    assert time.perf_counter() - start < 2
    release.set()
    assert compiler.compile(first) is running  # refused, and so remembered
    monkeypatch.setattr(GrammarCompiler, "_build", build)
    compiler.compile(second).result(30)  # busy is not remembered: it compiles now
    compiler.close()


def test_the_compile_queue_is_bounded(tokenizer, monkeypatch):
    compiler = compiler_of(tokenizer, compile_threads=1, compile_queue=2)
    release = threading.Event()
    build = GrammarCompiler._build
    monkeypatch.setattr(GrammarCompiler, "_build",
                        lambda self, c, d: release.wait(30) and build(self, c, d))
    futures = [compiler.compile(Constraint.regex("[0-9]{1}", "r"))]
    time.sleep(0.2)  # the first is running, two wait: the fourth finds the queue full
    futures += [compiler.compile(Constraint.regex(f"[0-9]{{{i}}}", "r")) for i in range(2, 5)]
    with pytest.raises(GrammarBusy, match="2 grammars are waiting to compile, the limit is 2"):
        futures[3].result(0)
    release.set()
    for future in futures[:3]:
        future.result(30)
    compiler.close()


def test_the_cache_is_bounded_in_bytes_and_too_big_a_grammar_is_not_kept(tokenizer):
    """a{N} builds N lexer states on its first mask (1.3 MiB at 3000): measured, counted."""
    compiler = compiler_of(tokenizer, cache_memory=8 << 20)  # entries of at most 2 MiB
    compiler.compile(Constraint.regex("[0-9]+", "r")).result(60)
    regexes = [Constraint.regex(f"b{{{i + 1}}}a{{3000}}", "r") for i in range(8)]
    for regex in regexes:
        compiled = compiler.compile(regex).result(60)
        assert 512 << 10 < compiled.num_bytes < 2 << 20, compiled.num_bytes
        assert regex.key in compiler.cache and compiler.cache_bytes <= 8 << 20
    assert regexes[0].key not in compiler.cache  # the least recently used went
    huge = Constraint.regex("a{9000}", "r")
    compiled = compiler.compile(huge).result(60)
    assert compiled.num_bytes > 2 << 20 and huge.key not in compiler.cache
    compiler.close()


# -- the engine: one step's mask within its budget -------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    from pagedserve.loader import load_model

    return load_model(tiny_llama_tokenized_dir)


def engine_with(tiny, **limits):
    from pagedserve.config import EngineConfig
    from pagedserve.engine import Engine
    from pagedserve.worker.model_runner import kv_bytes_per_token

    per_block = kv_bytes_per_token(tiny.config, "float32") * 16
    return Engine.from_model(tiny, EngineConfig(kv_cache_memory=256 * per_block, dtype="float32",
                                                grammar_limits=GrammarLimits(**limits)))


def greedy(constraint: Constraint | None = None, max_tokens: int = 40):
    from pagedserve.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, constraint=constraint,
                          ignore_eos=constraint is None)


class SlowMasks:
    """A matcher whose masks take ``delay`` seconds more from its ``after``-th on: wall-clock
    budgets tested with margins far above a loaded machine's noise."""

    def __init__(self, inner, delay: float, after: int) -> None:
        self.inner, self.delay, self.after, self.masks = inner, delay, after, 0

    def slow_down(self) -> None:
        self.masks += 1
        if self.masks > self.after:
            time.sleep(self.delay)

    def unsafe_compute_mask_ptr(self, pointer: int, size: int) -> None:
        self.slow_down()
        self.inner.unsafe_compute_mask_ptr(pointer, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def slow_masks(monkeypatch):
    """slow_masks(engine, constraint, delay, after): that constraint's requests mask slowly;
    rows filled in parallel go through a spy that records each call's number of rows."""
    from pagedserve.structured import bitmask
    from pagedserve.structured.compiler import CompiledGrammar

    templates: dict[int, tuple[float, int]] = {}
    new_matcher = CompiledGrammar.new_matcher

    def maybe_slow(self):
        matcher = new_matcher(self)
        slow = templates.get(id(self.matcher))
        return SlowMasks(matcher, *slow) if slow else matcher

    calls: list[int] = []
    executor = bitmask._llg_executor()

    class Spy:
        def unsafe_compute_mask_ptr(self, rows, *args):
            calls.append(len(rows))
            for matcher, _ in rows:
                if isinstance(matcher, SlowMasks):
                    matcher.slow_down()
            rows = [(getattr(m, "inner", m), i) for m, i in rows]
            return executor.unsafe_compute_mask_ptr(rows, *args)

    monkeypatch.setattr(CompiledGrammar, "new_matcher", maybe_slow)
    monkeypatch.setattr(bitmask, "_llg_executor", Spy)

    def make_slow(engine, constraint: Constraint, delay: float, after: int) -> list[int]:
        templates[id(engine.grammars.compile(constraint).result(60).matcher)] = (delay, after)
        return calls

    return make_slow


def test_a_mask_over_its_budget_ends_its_request_and_the_others_go_on(tiny, slow_masks):
    from engine_drain import drain

    engine = engine_with(tiny, mask_seconds=0.3)
    slow = Constraint.regex("[a-z ]{30}", "structured_outputs.regex")
    slow_masks(engine, slow, delay=0.6, after=2)
    ids = [engine.add_request("Tell me", greedy(slow)), engine.add_request("Hi", greedy()),
           engine.add_request("Yes", greedy(Constraint.regex("[a-z ]{20}", "r")))]
    start = time.perf_counter()
    slow, plain, fast = drain(engine, ids)
    assert slow["reason"] == "error", slow
    assert slow["error"].startswith("GrammarStepError: structured_outputs.regex: computing "
                                    "one token's mask took "), slow["error"]
    assert "over the budget of 300 ms (pagedserve serve --grammar-mask-budget)" in slow["error"]
    assert len(slow["tokens"]) == 2  # of the two quick masks; the slow one's is not delivered
    assert plain["reason"] == "length" and len(plain["tokens"]) == 40
    assert fast["reason"] == "stop" and len(fast["text"]) == 20
    assert time.perf_counter() - start < 0.6 + 10  # one slow mask, not one per token


def test_rows_masked_together_are_timed_alone_once_their_batch_is_slow(tiny, slow_masks):
    """Eight rows or more are filled in llguidance's threads, in one call; when that call is
    over the budget each row is timed alone at the next step, and only the slow one ends."""
    from engine_drain import drain

    engine = engine_with(tiny, mask_seconds=0.3)
    slow = Constraint.regex("[a-z ]{30}", "structured_outputs.regex")
    calls = slow_masks(engine, slow, delay=0.6, after=1)
    others = [Constraint.regex(f"[a-z ]{{{20 + i}}}", "r") for i in range(8)]
    ids = [engine.add_request("Tell me", greedy(slow))]
    ids += [engine.add_request(f"Hi {i}", greedy(c)) for i, c in enumerate(others)]
    slow, *rest = drain(engine, ids)
    assert slow["reason"] == "error" and "over the budget of 300 ms" in slow["error"], slow
    # together, then together and slow: all suspects, timed alone (the slow one ends), then
    # the eight cleared ones together again
    assert calls[:3] == [9, 9, 8], calls
    assert len(slow["tokens"]) == 2  # the slow mask computed with others let its token out
    assert [r["reason"] for r in rest] == ["stop"] * 8
    assert [len(r["text"]) for r in rest] == [20 + i for i in range(8)]


def test_a_matcher_that_gives_up_midway_ends_its_request_without_internals(tiny):
    """A bomb the prechecks let through, behind a choice: the first mask cannot see it, the
    second runs out of fuel, and the request ends with llguidance's reason, short."""
    from engine_drain import drain

    engine = engine_with(tiny, mask_seconds=30, **NO_PRECHECK)
    bomb = Constraint.regex("(x|y)(a{1000}){1000}", "structured_outputs.regex")
    deep, plain = drain(engine, [engine.add_request("Tell me", greedy(bomb)),
                                 engine.add_request("Hi", greedy())])
    assert deep["reason"] == "error", deep
    assert deep["error"].startswith("GrammarViolation: structured_outputs.regex: token "), deep
    assert "too complex for this server's limits" in deep["error"]
    assert_short(deep["error"].split(": ", 2)[2])
    assert plain["reason"] == "length"
