"""The engine survives what one request can do to it: a step that fails because of one request
loses that request alone; a fault that does not repeat loses nothing; a model that fails every
step is declared broken; bad values are refused before they reach a step."""

from __future__ import annotations

import random

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine import (
    MAX_FAILED_STEPS,
    Engine,
    EngineObserver,
    EngineStepError,
    PromptTooLongError,
)
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import kv_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
POISON = 299  # a token id the fault below recognises in a prompt


@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    return load_model(tiny_llama_tokenized_dir)


def make_engine(loaded, num_blocks: int = 64, **kw) -> Engine:
    per_block = kv_bytes_per_token(loaded.config, "float32") * 16
    return Engine.from_model(loaded, EngineConfig(kv_cache_memory=num_blocks * per_block,
                                                  dtype="float32", **kw))


def prompts(n: int, length: int = 20, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 290) for _ in range(length)] for _ in range(n)]


def drain(engine: Engine) -> dict[str, dict]:
    results: dict[str, dict] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            r = results.setdefault(out.request_id, {"tokens": [], "reason": None, "error": None})
            r["tokens"] += out.delta_token_ids
            if out.finished:
                r["reason"], r["error"] = out.finish_reason, out.error
        engine.check_integrity()
    assert engine.kv.all_free()
    return results


def poison_the_runner(engine: Engine, *, times: int | None = None) -> list[int]:
    """Make the model fail on any step that holds a request whose prompt contains POISON
    (``times`` such steps, or always). Returns the list of failed batch sizes."""
    launch = engine.runner.launch
    failures: list[int] = []

    def faulty(scheduled):
        poisoned = any(POISON in s.request.prompt_token_ids for s in scheduled)
        if poisoned and (times is None or len(failures) < times):
            failures.append(len(scheduled))
            raise RuntimeError("injected fault")
        return launch(scheduled)

    engine.runner.launch = faulty
    return failures


def test_a_request_whose_step_fails_fails_alone(tiny):
    batch = prompts(4)
    clean = drain_all(make_engine(tiny), batch)
    engine = make_engine(tiny)
    failures = poison_the_runner(engine)
    ids = [engine.add_request(p, GREEDY) for p in batch]
    bad = engine.add_request(batch[0][:10] + [POISON], GREEDY)
    results = drain(engine)
    assert results[bad]["reason"] == "error" and "injected fault" in results[bad]["error"]
    assert results[bad]["tokens"] == []
    assert failures[0] == 5  # the whole step failed first, then each request ran alone
    # the others finished with exactly the tokens they get without a failing neighbour
    assert [results[i]["tokens"] for i in ids] == clean
    assert all(results[i]["reason"] == "length" for i in ids)


def test_a_fault_that_does_not_repeat_loses_nothing(tiny):
    batch = [*prompts(3), prompts(1, seed=5)[0][:10] + [POISON]]
    clean = drain_all(make_engine(tiny), batch)
    engine = make_engine(tiny)
    failures = poison_the_runner(engine, times=1)
    assert drain_all(engine, batch) == clean
    assert failures == [4]


def test_a_model_that_fails_every_step_breaks_the_engine(tiny):
    engine = make_engine(tiny)
    poison_the_runner(engine)
    arrivals = iter(prompts(MAX_FAILED_STEPS))
    for _ in range(MAX_FAILED_STEPS - 1):  # each step fails for every request in it
        engine.add_request(next(arrivals) + [POISON], GREEDY)
        [out] = engine.step()
        assert out.finish_reason == "error"
    engine.add_request(next(arrivals) + [POISON], GREEDY)
    with pytest.raises(EngineStepError, match=f"{MAX_FAILED_STEPS} steps in a row"):
        engine.step()


def test_one_good_step_resets_the_count(tiny):
    engine = make_engine(tiny)
    poison_the_runner(engine)
    for p in prompts(MAX_FAILED_STEPS * 2):
        bad = engine.add_request(p + [POISON], GREEDY)
        good = engine.add_request(p, SamplingParams(temperature=0, max_tokens=1))
        outputs = {out.request_id: out.finish_reason for out in engine.step()}
        assert outputs == {bad: "error", good: "length"}


def test_a_failing_observer_is_logged_not_fatal(tiny, caplog):
    class Broken(EngineObserver):
        def on_output(self, output):
            raise ZeroDivisionError("observer bug")

    engine = make_engine(tiny)
    engine.observers.append(Broken())
    [result] = drain_all(engine, prompts(1), keep_reasons=True)
    assert result == "length"
    assert "observer bug" in caplog.text


def test_model_dependent_values_are_refused_before_they_reach_a_step(tiny):
    engine = make_engine(tiny)
    vocab = engine.model_config.vocab_size
    with pytest.raises(ValueError, match=r"^stop_token_ids must be token ids in \[0, 512\)"):
        engine.add_request([5, 6], SamplingParams(stop_token_ids=[vocab]))
    with pytest.raises(ValueError, match="^prompt token ids"):
        engine.add_request([5, vocab], SamplingParams())
    # a text longer than max_model_len tokens of the longest vocabulary entry can cover
    limit = engine.max_prompt_chars
    assert limit == engine.max_model_len * engine.tokenizer.max_token_chars
    with pytest.raises(PromptTooLongError, match=f"longer than {limit} characters"):
        engine.add_request("x" * (limit + 1), SamplingParams())
    assert not engine.has_unfinished_requests() and engine.kv.all_free()


def test_max_prompt_chars_can_be_lowered(tiny):
    engine = make_engine(tiny, max_prompt_chars=10)
    with pytest.raises(PromptTooLongError):
        engine.add_request("hello world", SamplingParams())
    engine.add_request("hello", SamplingParams(max_tokens=1))
    drain(engine)


def drain_all(engine: Engine, batch, keep_reasons: bool = False) -> list:
    ids = [engine.add_request(p, GREEDY) for p in batch]
    results = drain(engine)
    return [results[i]["reason" if keep_reasons else "tokens"] for i in ids]
