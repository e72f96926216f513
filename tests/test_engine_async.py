"""Overlapped steps (``async_scheduling``): a step is scheduled before the one before it has
reported its tokens, and every request still gets exactly the tokens it gets without overlap.

On a CPU the runner computes a step as it is launched, so nothing overlaps in time here; what
these tests check is the bookkeeping the overlap needs on any device: placeholders fed from the
previous step's ids, tokens read one step late, requests that end (a stop, max_tokens, an
abort, a preemption) while a step holding them is in flight, and steps taken back when a rare
sampled id is redrawn after the next step already used it.
"""

from __future__ import annotations

import random

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured import Constraint
from pagedserve.worker.model_runner import kv_bytes_per_token


@pytest.fixture(scope="module")
def tiny(tiny_llama_tokenized_dir):
    return load_model(tiny_llama_tokenized_dir)


def engine(loaded, overlap: bool, num_blocks: int = 64, budget: int = 64) -> Engine:
    per_block = kv_bytes_per_token(loaded.config, "float32") * 16
    return Engine.from_model(loaded, EngineConfig(
        kv_cache_memory=num_blocks * per_block, dtype="float32", async_scheduling=overlap,
        max_num_batched_tokens=budget, seed=0))


def mixed_requests(n: int = 12, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Greedy and seeded draws, top-p and top-k, logprobs, EOS and max_tokens ends."""
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        prompt = [rng.randrange(4, 290) for _ in range(rng.randrange(5, 60))]
        requests.append((prompt, SamplingParams(
            temperature=0 if i % 2 == 0 else 0.8, seed=i, max_tokens=rng.randrange(1, 30),
            ignore_eos=i % 3 == 0, top_p=0.9 if i % 4 == 1 else 1.0,
            top_k=20 if i % 4 == 3 else 0, logprobs=2 if i % 5 == 0 else None)))
    return requests


def same(a: dict[int, dict], b: dict[int, dict]) -> bool:
    """Equal tokens and ends; logprobs equal to float32 rounding (the steps hold other rows
    with overlap than without, and a CPU matmul may round a row by what is beside it)."""
    for i in a:
        if (a[i]["tokens"], a[i]["reason"]) != (b[i]["tokens"], b[i]["reason"]):
            return False
        if a[i]["logprobs"] != pytest.approx(b[i]["logprobs"], abs=1e-5):
            return False
    return a.keys() == b.keys()


def run(e: Engine, requests, abort_after: dict[int, int] | None = None) -> dict[int, dict]:
    """Every request's tokens, finish reason and logprobs; ``abort_after``: request index ->
    step after which it is aborted."""
    index = {e.add_request(prompt, params): i for i, (prompt, params) in enumerate(requests)}
    out: dict[int, dict] = {i: {"tokens": [], "reason": None, "logprobs": []}
                            for i in range(len(requests))}
    steps = 0
    while e.has_unfinished_requests():
        steps += 1
        assert steps < 1000, "the engine makes no progress"
        for o in e.step():
            r = out[index[o.request_id]]
            r["tokens"] += o.delta_token_ids
            r["logprobs"] += [lp.sampled.logprob for lp in o.delta_logprobs or []]
            if o.finished:
                r["reason"] = o.finish_reason
        for i, after in (abort_after or {}).items():
            if steps == after:
                rid = next(k for k, v in index.items() if v == i)
                aborted = e.abort_request(rid)
                if aborted is not None:
                    out[i]["reason"] = aborted.finish_reason
        e.check_integrity()
    assert e.kv.all_free()
    return out


@pytest.mark.parametrize("num_blocks,budget", [(64, 64), (64, 16), (12, 64)],
                         ids=["plain", "chunked-prefill", "preemption"])
def test_overlap_gives_the_tokens_of_steps_read_at_once(tiny, num_blocks, budget):
    requests = mixed_requests()
    without = engine(tiny, False, num_blocks, budget)
    expected = run(without, requests)
    with_overlap = engine(tiny, True, num_blocks, budget)
    assert with_overlap.core.async_scheduling
    assert same(run(with_overlap, requests), expected)
    if num_blocks == 12:
        assert with_overlap.scheduler.num_preemptions > 0


def test_no_token_after_the_end(tiny):
    """A request that ends at step N (its stop token, its max_tokens) was already scheduled
    in step N+1 with a placeholder: that step's token is never emitted."""
    prompt = [5, 6, 7, 8, 9]
    greedy = run(engine(tiny, False), [(prompt, SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True))])[0]["tokens"]
    stop_at = greedy[3]
    for overlap in (False, True):
        e = engine(tiny, overlap)
        out = run(e, [(prompt, SamplingParams(temperature=0, max_tokens=8,
                                              stop_token_ids=[stop_at])),
                      (prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))])
        assert out[0]["tokens"] == greedy[:greedy.index(stop_at) + 1]
        assert out[0]["reason"] == "stop"
        assert out[1]["tokens"] == greedy[:2] and out[1]["reason"] == "length"


def test_an_abort_while_a_step_is_in_flight_frees_everything(tiny):
    requests = [(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
                for p, _ in mixed_requests(4)]
    e = engine(tiny, True)
    out = run(e, requests, abort_after={1: 3, 2: 5})
    assert out[1]["reason"] == out[2]["reason"] == "abort"
    full = run(engine(tiny, False), requests)
    for i in (1, 2):  # the tokens it got are those it would have got, and no more
        assert out[i]["tokens"] == full[i]["tokens"][:len(out[i]["tokens"])]
    assert same({0: out[0], 3: out[3]}, {0: full[0], 3: full[3]})


def test_a_redrawn_token_takes_back_the_step_that_used_it(tiny, monkeypatch):
    """Top-p over a flat distribution leaves the first candidates short: the host draws such a
    row again exactly, and the next step, already fed the first draw on the device, is taken
    back for that request and computed again. Tokens equal those without overlap."""
    from pagedserve.engine import core as core_module

    taken_back = []
    take_back = core_module._InFlight.take_back

    def counting(self, request):
        taken_back.append(request.request_id)
        take_back(self, request)

    monkeypatch.setattr(core_module._InFlight, "take_back", counting)
    requests = [([7 + i, 8, 9, 10], SamplingParams(temperature=1.5, top_p=0.99, seed=i,
                                                   max_tokens=12, ignore_eos=True))
                for i in range(3)]
    expected = run(engine(tiny, False), requests)
    assert same(run(engine(tiny, True), requests), expected)
    assert taken_back, "no redraw happened: the test no longer covers taking back"


def test_grammar_and_penalty_rows_read_their_tokens_before_the_next_step(tiny):
    """A grammar's mask and penalties need the tokens so far on the host: steps holding such
    requests are read at once, and the mix still matches the engine without overlap."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    requests = [
        ([5, 6, 7], SamplingParams(temperature=0, max_tokens=30,
                                   constraint=Constraint.json_schema(schema, "response_format"))),
        ([8, 9, 10], SamplingParams(temperature=0, max_tokens=15, repetition_penalty=1.3,
                                    ignore_eos=True)),
        ([11, 12, 13], SamplingParams(temperature=0.7, seed=3, max_tokens=15,
                                      ignore_eos=True)),
    ]
    expected = run(engine(tiny, False), requests)
    assert same(run(engine(tiny, True), requests), expected)


def test_prompt_logprobs_in_pieces_arrive_whole_with_overlap(tiny):
    """A request owing prompt logprobs is read step by step (each piece of its chunked
    prompt before the next is computed); its neighbours still overlap."""
    rng = random.Random(5)
    long = [rng.randrange(4, 290) for _ in range(50)]
    requests = [(long, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)),
                *[(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
                  for p, _ in mixed_requests(3, seed=2)]]

    def prompt_logprobs(overlap: bool) -> tuple[list, dict]:
        e = engine(tiny, overlap, budget=16)
        rid = e.add_request(*requests[0])
        for prompt, params in requests[1:]:
            e.add_request(prompt, params)
        got, tokens = [], {}
        while e.has_unfinished_requests():
            for o in e.step():
                tokens.setdefault(o.request_id, []).extend(o.delta_token_ids)
                if o.request_id == rid and o.prompt_logprobs is not None:
                    got += [None if lp is None else round(lp.sampled.logprob, 4)
                            for lp in o.prompt_logprobs]
        return got, tokens

    without, tokens_without = prompt_logprobs(False)
    with_overlap, tokens_with = prompt_logprobs(True)
    assert len(without) == len(long) and without[0] is None
    assert with_overlap == without and tokens_with == tokens_without
