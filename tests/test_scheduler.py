"""Continuous batching, chunked prefill, preemption and abort, with a fake model: no torch."""

import pytest

from pagedserve.core.block_manager import BlockManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.scheduler import Scheduler
from pagedserve.core.static_slots import StaticSlotManager
from pagedserve.outputs import RequestMetrics
from pagedserve.sampling_params import SamplingParams


def make(rid: str, prompt_len: int, max_tokens: int, start: int = 0) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(start, start + prompt_len)),
        params=SamplingParams(max_tokens=max_tokens),
        eos_token_ids=frozenset(),
        max_tokens=max_tokens,
        metrics=RequestMetrics(0.0),
    )


def step(sched: Scheduler):
    """What the engine does after the model ran: advance counters, sample a token, retire."""
    out = sched.schedule()
    for s in out.scheduled:
        r = s.request
        samples = s.samples
        r.num_computed_tokens += s.num_new_tokens
        sched.kv.commit(r.request_id, r.all_token_ids, r.num_computed_tokens)
        if samples:
            r.append_output_token(1000 + r.num_output_tokens)
            if r.num_output_tokens >= r.max_tokens:
                sched.finish(r)
    sched.kv.check_integrity()
    return out


def plan(out) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in out.scheduled]


def test_chunked_prefill_splits_a_long_prompt_and_samples_only_at_its_end():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    r = make("a", 20, 2)
    sched.add(r)
    assert plan(step(sched)) == [("a", 8)]
    assert r.num_output_tokens == 0
    assert plan(step(sched)) == [("a", 8)]
    assert plan(step(sched)) == [("a", 4)]
    assert r.num_output_tokens == 1
    assert plan(step(sched)) == [("a", 1)]
    assert r.status is RequestStatus.FINISHED
    assert sched.kv.all_free()


def test_decodes_go_first_and_prefill_chunks_fill_the_rest_of_the_budget():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    sched.add(make("a", 3, 5))
    sched.add(make("b", 3, 5, start=50))
    assert plan(step(sched)) == [("a", 3), ("b", 3)]
    sched.add(make("c", 30, 5, start=100))
    # two decodes, then c's first chunk takes what is left of the budget
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 8)]
    assert plan(step(sched)) == [("a", 1), ("b", 1), ("c", 8)]


def test_max_num_seqs_caps_the_running_set_and_finished_seats_refill_next_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make(f"r{i}", 2, 1, start=10 * i))
    assert plan(step(sched)) == [("r0", 2), ("r1", 2)]  # both finish (max_tokens=1)
    assert plan(step(sched)) == [("r2", 2)]
    assert not sched.has_unfinished()


def test_preemption_frees_the_newest_request_and_it_resumes_to_the_same_length():
    # 6 blocks of 2 tokens: three requests of 4 prompt tokens + 4 output tokens cannot all fit
    sched = Scheduler(BlockManager(6, 2, enable_prefix_caching=False), 8, 100)
    reqs = [make(f"r{i}", 4, 4, start=10 * i) for i in range(3)]
    for r in reqs:
        sched.add(r)
    assert plan(step(sched)) == [("r0", 4), ("r1", 4), ("r2", 4)]  # 6 blocks used
    out = step(sched)  # each decode needs a third block: r2, the newest, makes room
    assert out.preempted == ["r2"]
    assert plan(out) == [("r0", 1), ("r1", 1)]
    assert [r.request_id for r in sched.waiting] == ["r2"]
    assert reqs[2].num_computed_tokens == 0 and reqs[2].num_output_tokens == 1
    steps = 0
    while sched.has_unfinished():
        step(sched)
        steps += 1
        assert steps < 100, "deadlock"
    assert [r.num_output_tokens for r in reqs] == [4, 4, 4]
    assert all(r.metrics.num_preemptions >= 0 for r in reqs)
    assert sched.num_preemptions >= 2
    assert sched.kv.all_free()


def test_a_preempted_request_recomputes_prompt_and_output_before_sampling_again():
    sched = Scheduler(BlockManager(4, 2, enable_prefix_caching=False), 8, 100)
    a, b = make("a", 3, 3), make("b", 3, 5, start=10)
    sched.add(a)
    sched.add(b)
    step(sched)  # a: 2 blocks, b: 2 blocks, both sampled one token
    out = step(sched)  # a needs no new block yet (4 tokens in 2 blocks); b neither
    assert out.preempted == []
    out = step(sched)  # now a needs a third block: b is preempted
    assert out.preempted == ["b"]
    assert a.status is RequestStatus.FINISHED  # a's third token was its last
    # b comes back with its 5 known tokens (3 prompt + 2 output) to recompute in one chunk
    assert plan(step(sched)) == [("b", 5)]
    assert b.num_output_tokens == 3
    assert b.metrics.num_preemptions == 1


def test_abort_frees_blocks_at_once_from_running_and_waiting():
    sched = Scheduler(BlockManager(8, 2), max_num_seqs=1, max_num_batched_tokens=100)
    a, b = make("a", 5, 10), make("b", 5, 10, start=20)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.kv.num_free_blocks == 5
    sched.finish(a)
    assert sched.kv.num_free_blocks == 8
    sched.finish(b)  # still waiting
    assert not sched.has_unfinished()
    assert sched.kv.all_free()


def test_a_second_request_with_the_same_prompt_hits_the_prefix_cache():
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=8, max_num_batched_tokens=100)
    first = make("a", 10, 1)
    sched.add(first)
    step(sched)
    second = make("b", 10, 1)
    sched.add(second)
    assert plan(step(sched)) == [("b", 2)]  # 8 of 10 tokens came from the cache
    assert second.num_cached_tokens == 8
    assert (sched.kv.prefix_queries, sched.kv.prefix_hits) == (20, 8)


def test_static_layout_never_runs_more_requests_than_slots():
    sched = Scheduler(StaticSlotManager(2, 64, 16), max_num_seqs=8, max_num_batched_tokens=512)
    reqs = [make(f"r{i}", 5, 3, start=10 * i) for i in range(5)]
    for r in reqs:
        sched.add(r)
    max_running = 0
    while sched.has_unfinished():
        step(sched)
        max_running = max(max_running, len(sched.running))
    assert max_running == 2
    assert all(r.num_output_tokens == 3 for r in reqs)
    assert sched.kv.all_free()


def test_a_request_waiting_for_its_grammar_is_not_queued_and_finishes_cleanly():
    """A constrained request waits outside the scheduler while its grammar compiles (vLLM's
    WAITING_FOR_FSM); retiring it then frees nothing and touches no queue, while a WAITING
    request missing from the queue is a bookkeeping error that shows."""
    sched = Scheduler(BlockManager(8, 2), max_num_seqs=2, max_num_batched_tokens=100)
    compiling = make("g", 5, 4)
    compiling.status = RequestStatus.WAITING_FOR_GRAMMAR
    sched.finish(compiling)
    assert compiling.status is RequestStatus.FINISHED and sched.kv.all_free()

    queued = make("q", 5, 4)
    queued.status = RequestStatus.WAITING_FOR_GRAMMAR
    sched.add(queued)  # compiled: it joins the queue as WAITING
    assert queued.status is RequestStatus.WAITING
    sched.finish(queued)
    lost = make("lost", 5, 4)  # WAITING, but never added
    with pytest.raises(ValueError):
        sched.finish(lost)


@pytest.mark.parametrize("layout", [BlockManager(8, 2), StaticSlotManager(2, 8, 2)],
                         ids=["paged", "static"])
def test_both_layouts_implement_the_whole_kv_cache_manager_contract(layout):
    import inspect

    from pagedserve.core.kv_cache_manager import KVCacheManager

    members = {n: m for n, m in vars(KVCacheManager).items() if not n.startswith("_")}
    for name, member in members.items():
        assert hasattr(layout, name), name
        if inspect.isfunction(member):
            ours = inspect.signature(getattr(type(layout), name))
            assert list(ours.parameters) == list(inspect.signature(member).parameters), name
    for name in KVCacheManager.__annotations__:
        assert hasattr(layout, name), name
    # the lookup is counted by both, so the hit rate reads 0% on static slots, not "no data"
    before = layout.prefix_queries
    layout.record_prefix_lookup(10, 0)
    assert (layout.prefix_queries - before, layout.prefix_hits) == (10, 0)
