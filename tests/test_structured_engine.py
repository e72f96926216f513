"""Constrained decoding in the engine, on a tiny random model: whatever the weights say, the
answer matches its grammar; unconstrained neighbours are untouched; preemption, failures and
slow compilations stay the business of the request they concern."""

from __future__ import annotations

import json
import threading
import time

import jsonschema
import pytest
import torch
from engine_drain import drain

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured import Constraint
from pagedserve.structured.compiler import GrammarCompiler
from pagedserve.structured.state import GrammarState
from pagedserve.worker.model_runner import kv_bytes_per_token

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "home": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"],
                 "additionalProperties": False},
    },
    "required": ["name", "age", "role", "tags", "home"],
    "additionalProperties": False,
}
JSON = Constraint.json_schema(SCHEMA, "response_format")


@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    return load_model(tiny_llama_tokenized_dir)


def make_engine(loaded, num_blocks: int = 256) -> Engine:
    per_block = kv_bytes_per_token(loaded.config, "float32") * 16
    return Engine.from_model(loaded, EngineConfig(kv_cache_memory=num_blocks * per_block,
                                                  dtype="float32"))


def run(engine: Engine, requests: list[tuple[str | list[int], SamplingParams]]) -> list[dict]:
    ids = [engine.add_request(p, params) for p, params in requests]
    return drain(engine, ids)


def sampled(seed: int, constraint: Constraint | None = JSON, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 300,
                             "constraint": constraint, **kw})


def test_random_weights_still_answer_json_that_validates(tiny):
    engine = make_engine(tiny)
    results = run(engine, [("Tell me about a person.", sampled(seed)) for seed in range(4)])
    for r in results:
        assert r["reason"] == "stop", r
        jsonschema.validate(json.loads(r["text"]), SCHEMA)
    stats = engine.stats()
    assert stats.constrained_requests_total == 4
    assert stats.grammar_compiles_total == 1  # one schema, compiled once
    assert stats.grammar_cache_hits_total == 3


@pytest.mark.parametrize("constraint, check", [
    (Constraint.regex(r"[0-9]{3}-[a-z]{2,4}", "r"),
     lambda t: len(t.split("-")[0]) == 3 and t.split("-")[1].isalpha()),
    (Constraint.choice(["yes", "no", "maybe so"], "c"), lambda t: t in ("yes", "no", "maybe so")),
    (Constraint.grammar('root ::= "(" [a-c]+ ")"', "g"),  # GBNF, as llama.cpp writes it
     lambda t: t.startswith("(") and t.endswith(")") and set(t[1:-1]) <= set("abc")),
    (Constraint.grammar('start: "x" NUM\nNUM: /[0-9]+/', "g"),  # Lark
     lambda t: t[0] == "x" and t[1:].isdigit()),
])
def test_regex_choice_and_grammars_end_when_complete(tiny, constraint, check):
    results = run(make_engine(tiny), [("Go", sampled(seed, constraint, max_tokens=40))
                                      for seed in range(6)])
    for r in results:
        assert r["reason"] in ("stop", "length"), r
        if r["reason"] == "stop":
            assert check(r["text"]), r["text"]


def test_max_tokens_still_bounds_a_constrained_request(tiny):
    [r] = run(make_engine(tiny), [("Hi", sampled(0, max_tokens=3))])
    assert r["reason"] == "length" and len(r["tokens"]) == 3


def test_greedy_unconstrained_neighbours_get_the_same_tokens(tiny):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = [("The quick brown fox", greedy), ("Paged attention keeps", greedy)]
    alone = run(make_engine(tiny), plain)
    mixed = run(make_engine(tiny), [plain[0], ("Tell me", sampled(1)), plain[1],
                                    ("About", sampled(2, temperature=0))])
    assert [mixed[0]["tokens"], mixed[2]["tokens"]] == [r["tokens"] for r in alone]
    jsonschema.validate(json.loads(mixed[1]["text"]), SCHEMA)
    # a greedy random model may write one number until max_tokens: length is all it can get
    assert mixed[3]["reason"] in ("stop", "length")


def test_preemption_recomputes_and_the_grammar_follows(tiny):
    small = {"type": "object", "properties": {"a": {"enum": ["x", "y"]}, "b": {"type": "boolean"}},
             "required": ["a", "b"], "additionalProperties": False}
    batch = [("Tell me about a person." * 3 + "Yes.",
              sampled(seed, Constraint.json_schema(small, "format"), max_tokens=100))
             for seed in range(6)]
    roomy = run(make_engine(tiny), batch)
    tight_engine = make_engine(tiny, num_blocks=16)  # four prompts fit, not their answers
    tight = run(tight_engine, batch)
    assert tight_engine.scheduler.num_preemptions > 0
    assert [r["tokens"] for r in tight] == [r["tokens"] for r in roomy]
    for r in tight:
        jsonschema.validate(json.loads(r["text"]), small)


def test_a_grammar_that_fails_fails_only_its_request(tiny, monkeypatch):
    engine = make_engine(tiny)
    advance = GrammarState.advance
    broken = Constraint.choice(["boom", "bang"], "structured_outputs.choice")

    def flaky(self, tokens):
        if self.constraint == broken:
            raise RuntimeError("matcher exploded")
        return advance(self, tokens)

    monkeypatch.setattr(GrammarState, "advance", flaky)
    results = run(engine, [("A", sampled(1)), ("B", sampled(2, broken)),
                           ("C", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))])
    assert results[1]["reason"] == "error" and "matcher exploded" in results[1]["error"]
    assert results[0]["reason"] == "stop" and results[2]["reason"] == "length"


def test_a_slow_compilation_does_not_stall_other_requests(tiny, monkeypatch):
    engine = make_engine(tiny)
    release = threading.Event()
    build = GrammarCompiler._build

    def slow(self, constraint, deadline):
        release.wait(30)
        return build(self, constraint, deadline)

    monkeypatch.setattr(GrammarCompiler, "_build", slow)
    slow_id = engine.add(engine.make_request("Tell me", sampled(3))) or "req-0"
    fast_id = engine.add_request("Hi", SamplingParams(temperature=0, max_tokens=5,
                                                      ignore_eos=True))
    finished = {}
    while fast_id not in finished:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        engine.check_integrity()
    assert slow_id not in finished and engine.has_unfinished_requests()
    assert engine.stats().num_waiting == 1  # waiting for its grammar, not scheduled
    release.set()
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished[slow_id].finish_reason == "stop"


def test_a_bad_constraint_names_its_field_and_the_failure_is_cached(tiny):
    engine = make_engine(tiny)
    bad = Constraint.json_schema({"type": "object", "properties": {"a": {"not": {}}}},
                                 "response_format.json_schema.schema")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^response_format\.json_schema\.schema: .*not"):
            engine.add_request("x", sampled(0, bad))
    assert engine.grammars.num_compiled == 0 and engine.grammars.num_cache_hits == 1
    with pytest.raises(ValueError, match=r"^structured_outputs\.regex: .*regex"):
        engine.add_request("x", sampled(0, Constraint.regex("(ab", "structured_outputs.regex")))
    assert not engine.has_unfinished_requests()


def test_json_whitespace_is_capped(tiny):
    engine = make_engine(tiny)
    compiled = engine.grammars.compile(Constraint.json_object("format")).result()
    tokenizer = engine.tokenizer

    def accepts(text: str) -> bool:
        matcher = compiled.new_matcher()
        return all(matcher.consume_token(t)
                   for t in tokenizer.encode(text, add_special_tokens=False))

    assert accepts('{\n  "a": [1,\n    2]\n}')
    assert accepts('{"a": 1, "b":2}')
    assert accepts("{\n" + "\t" * 16 + '"a"')
    assert not accepts("{\n" + " " * 17)
    assert not accepts("{  ")  # a space, or a line break and indentation: no runs
    assert not accepts("{\n\n")


@pytest.mark.parametrize("parser, sep", [("hermes", "\n"), ("llama3_json", "; ")])
def test_required_tool_calls_are_bounded(tiny, parser, sep):
    """A small model repeats a forced call until max_tokens unless the grammar stops it."""
    from pagedserve.structured.tool_parsers import MAX_PARALLEL_CALLS, TOOL_PARSERS

    engine = make_engine(tiny)
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"enum": ["x"]}}, "required": ["a"]}}]
    p = TOOL_PARSERS[parser]()
    grammar = Constraint.grammar(p.required_grammar(tools, parallel=True), "tools")
    compiled = engine.grammars.compile(grammar).result()
    body = f'{{"name": "f", "{p.arguments_key}": {{"a": "x"}}}}'
    call = f"<tool_call>\n{body}\n</tool_call>" if parser == "hermes" else body

    def accepts(text: str) -> bool:
        matcher = compiled.new_matcher()
        return all(matcher.consume_token(t)
                   for t in engine.tokenizer.encode(text, add_special_tokens=False))

    assert accepts(sep.join([call] * MAX_PARALLEL_CALLS))
    assert not accepts(sep.join([call] * MAX_PARALLEL_CALLS) + sep + call[:2])


def test_listed_properties_close_an_object_unless_the_schema_opens_it():
    from pagedserve.structured.constraint import closed

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"x": {"type": "integer"}}},
        "b": {"type": "array", "items": {"$ref": "#/$defs/B"}},
        "c": {"type": "object", "properties": {}, "additionalProperties": True},
        "properties": {"anyOf": [{"type": "object", "properties": {"y": {}}}, {"type": "null"}]},
    }, "$defs": {"B": {"type": "object", "properties": {"z": {}}}}}
    out = closed(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["$defs"]["B"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True
    assert out["properties"]["properties"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["b"]
    assert "additionalProperties" not in schema  # the client's schema is not changed
    assert closed({"type": "object"}) == {"type": "object"}  # json_object stays open


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # host path, device path
def test_the_bitmask_masks_exactly_the_constrained_rows(dtype, monkeypatch):
    from pagedserve.structured.bitmask import GrammarBatch

    V = 70  # not a multiple of 32: the last word is partly padding
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)
    monkeypatch.setattr(GrammarBatch, "fill", lambda self: words)
    logits = torch.randn(4, V, generator=gen).to(dtype)
    before = logits.clone()
    GrammarBatch(rows=[1, 3], states=[None, None], vocab_size=V).apply(logits)
    for j, row in enumerate([1, 3]):
        for t in range(V):
            allowed = (int(words[j, t // 32]) >> (t % 32)) & 1
            assert logits[row, t] == (before[row, t] if allowed else float("-inf"))
    assert torch.equal(logits[[0, 2]], before[[0, 2]])  # unconstrained rows untouched
