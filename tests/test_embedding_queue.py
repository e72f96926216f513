"""The engine core's embedding queue (batches between steps, a token budget, per-request
options, aborts, failures alone) and the core loop that runs it next to generation."""

from __future__ import annotations

import array
import asyncio

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.core import EngineCore
from pagedserve.engine.core_loop import CoreLoop
from pagedserve.engine.embedding_queue import EmbeddingQueue
from pagedserve.engine.messages import (
    AbortRequests,
    AddEmbedRequest,
    AddRequest,
    EmbedRequest,
    EngineCoreRequest,
)
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.embedder import Embedder, EmbeddingSpec


class _RecordingModel:
    """A PooledModel whose vector for a text is (its first id, its length); fails on id 13."""

    def __init__(self):
        self.calls: list[list[list[int]]] = []

    def pooled(self, token_ids, pooling):
        self.calls.append(token_ids)
        if any(13 in ids for ids in token_ids):
            raise RuntimeError("id 13 breaks the model")
        return torch.tensor([[float(ids[0]), float(len(ids))] for ids in token_ids])


def _queue(budget: int) -> tuple[EmbeddingQueue, _RecordingModel]:
    model = _RecordingModel()
    spec = EmbeddingSpec("bert", 2, 16, 16, "mean", False)
    return EmbeddingQueue(Embedder(model, None, spec, vocab_size=100), budget), model


def _vectors(result) -> list[list[float]]:
    assert result.error is None, result.error
    return result.vectors()


def test_batches_take_requests_in_arrival_order_until_the_budget():
    queue, model = _queue(budget=10)
    queue.add(EmbedRequest("r0", [[10] * 3, [11] * 3, [12] * 3], normalize=False))  # 9 tokens
    queue.add(EmbedRequest("r1", [[20] * 2], normalize=False))
    queue.add(EmbedRequest("r2", [[30] * 4, [31] * 4, [32] * 4], normalize=False))
    # 9 + 2 > 10: r0 alone
    assert [r.request_id for r in queue.run()] == ["r0"]
    # r1 (2) and two of r2's inputs (2 + 4 + 4 = 10); r2 waits for its third
    [r1] = queue.run()
    assert r1.request_id == "r1" and _vectors(r1) == [[20.0, 2.0]]
    [r2] = queue.run()
    assert _vectors(r2) == [[30.0, 4.0], [31.0, 4.0], [32.0, 4.0]]
    assert r2.num_tokens == 12
    assert queue.run() == [] and not queue.has_work
    # one Embedder.embed per run: the model saw r1's and r2's first inputs together
    assert sorted(ids[0] for ids in model.calls[1]) == [20, 30, 31]
    assert queue.counters() == {"embedding_requests_total": 3, "embedding_inputs_total": 7,
                                "embedding_tokens_total": 23, "embedding_batches_total": 3}


def test_an_input_longer_than_the_budget_runs_alone():
    queue, _ = _queue(budget=2)
    queue.add(EmbedRequest("long", [[5] * 9, [6]], normalize=False))
    assert queue.run() == []  # its first input alone
    [done] = queue.run()
    assert _vectors(done) == [[5.0, 9.0], [6.0, 1.0]]


def test_requests_in_one_batch_keep_their_own_options():
    queue, model = _queue(budget=100)
    queue.add(EmbedRequest("unit", [[3, 1, 1, 1]], normalize=True))
    queue.add(EmbedRequest("cut", [[3, 1, 1, 1]], normalize=False, dimensions=1))
    unit, cut = queue.run()
    assert len(model.calls) == 1
    assert _vectors(unit) == [pytest.approx([0.6, 0.8])]
    assert _vectors(cut) == [[3.0]] and cut.dimensions == 1
    assert array.array("f", unit.rows()[0]).tolist() == pytest.approx([0.6, 0.8])


def test_what_the_model_cannot_take_is_refused_as_the_clients_fault():
    queue, model = _queue(budget=100)
    queue.add(EmbedRequest("vocab", [[1, 100]]))
    queue.add(EmbedRequest("dims", [[1]], dimensions=3))
    queue.add(EmbedRequest("long", [[1] * 17]))
    queue.add(EmbedRequest("ok", [[1]]))
    queue.add(EmbedRequest("ok", [[2]]))
    refused = {r.request_id: r for r in queue.run() if r.error}
    assert {k: (r.client_error, r.error.split(" ")[0]) for k, r in refused.items()} == {
        "vocab": (True, "input[0]"), "dims": (True, "dimensions"), "long": (True, "input[0]"),
        "ok": (True, "request_id")}
    assert model.calls == [[[1]]]


def test_a_failing_batch_fails_only_the_request_that_breaks_it():
    queue, model = _queue(budget=100)
    queue.add(EmbedRequest("a", [[1, 2]], normalize=False))
    queue.add(EmbedRequest("bad", [[4], [13, 2]], normalize=False))
    queue.add(EmbedRequest("c", [[7]], normalize=False))
    results = {r.request_id: r for r in queue.run()}
    assert _vectors(results["a"]) == [[1.0, 2.0]] and _vectors(results["c"]) == [[7.0, 1.0]]
    assert results["bad"].error.startswith("RuntimeError: id 13") \
        and not results["bad"].client_error
    assert not queue.has_work
    assert queue.counters()["embedding_requests_total"] == 2


def test_an_aborted_request_is_dropped_halfway():
    queue, _ = _queue(budget=3)
    queue.add(EmbedRequest("gone", [[1] * 3, [2] * 3]))
    queue.add(EmbedRequest("stays", [[3]]))
    assert queue.run() == []
    queue.abort(["gone", "unknown"])
    assert [r.request_id for r in queue.run()] == ["stays"]
    assert len(queue) == 0


# ---------------------------------------------------------------------------------------------
# The core loop: embedding batches between the steps of a generating core


@pytest.fixture(scope="module")
def core(tiny_llama_dir):
    config = EngineConfig(dtype="float32", kv_cache_memory=1 << 20, max_model_len=128,
                          max_num_batched_tokens=64)
    core = EngineCore.from_model(tiny_llama_dir, config)
    yield core
    core.close()


def _generation(request_id: str, prompt: list[int], max_tokens: int = 4) -> AddRequest:
    return AddRequest(EngineCoreRequest(request_id, prompt, SamplingParams(
        temperature=0, max_tokens=max_tokens, ignore_eos=True), max_tokens, 0.0))


def test_the_loop_embeds_between_steps_and_each_front_end_gets_its_own(core):
    sent: list[tuple[int, object]] = []
    loop = CoreLoop(core, lambda index, message: sent.append((index, message)), num_clients=2)
    loop.handle(_generation("gen", [1, 5, 9, 200]))
    prompts = [[1] + list(range(20, 20 + n)) for n in (3, 40, 30)]
    loop.handle(AddEmbedRequest(EmbedRequest("e0", prompts[:2], normalize=False)))
    loop.handle(AddEmbedRequest(EmbedRequest("e1", prompts[2:], normalize=False,
                                             client_index=1)))
    loop.handle(AddEmbedRequest(EmbedRequest("e2", [[1, 2, 3]], client_index=1)))
    loop.handle(AbortRequests(["e2"]))
    assert loop.busy
    loop.run_once()
    # the step's message first, then the batch's: 4 + 41 tokens fit the budget of 64, the
    # next input (31 tokens) does not
    steps = [m for _, m in sent if m.step is not None]
    assert len(steps) == 1 and steps[0].outputs[0].request_id == "gen"
    [(index, embedded)] = [(i, m) for i, m in sent if m.embeddings]
    assert (index, [r.request_id for r in embedded.embeddings]) == (0, ["e0"])
    assert embedded.stats.embedding_batches_total == 1
    sent.clear()
    loop.run_once()
    [(index, embedded)] = [(i, m) for i, m in sent if m.embeddings]
    assert (index, [r.request_id for r in embedded.embeddings]) == (1, ["e1"])
    # the vectors are the model's pooled last hidden states, as Embedder.embed gives them
    reference = core.embeddings.embedder.embed(prompts, normalize=False)
    got = torch.tensor(embedded.embeddings[0].vectors())
    assert torch.allclose(got, reference[2:], atol=1e-5)
    while core.has_unfinished_requests():
        loop.run_once()
    assert not loop.busy and core.stats().embedding_requests_total == 2
    core.check_integrity()


def test_info_tells_the_front_end_how_to_tokenize(core):
    info = core.info()
    assert info.generates and info.embedding.spec.pooling == "last"
    assert (info.embedding.max_tokens, info.embedding.spec.dimensions) == (128, 64)
    # this model has no tokenizer: token ids only, checked against its vocabulary
    with pytest.raises(ValueError, match="^input: this model has no tokenizer"):
        info.embedding.tokenize(["a"])
    with pytest.raises(ValueError, match=r"^input\[1\] holds a token id outside"):
        info.embedding.check([[1, 2], [512]])


# ---------------------------------------------------------------------------------------------
# The front end: one future per request, aborted when its caller goes away


class _FakeClient:
    def __init__(self, info):
        self.info = info
        self.sent: list[EmbedRequest] = []
        self.aborted: list[str] = []

    def add_embed_request(self, request):
        self.sent.append(request)

    def abort_requests(self, request_ids):
        self.aborted += request_ids

    def stats(self):
        from pagedserve.engine.messages import EngineStats

        return EngineStats()


def test_the_front_end_answers_aborts_and_fails_embedding_requests(core):
    from pagedserve.engine.async_engine import AsyncEngine
    from pagedserve.engine.messages import EmbedResult, EngineCoreOutputs
    from pagedserve.errors import EngineDeadError

    async def main():
        client = _FakeClient(core.info())
        engine = AsyncEngine(client)
        with pytest.raises(ValueError, match="^dimensions must be an integer from 1 to 64"):
            engine.make_embed_request([[1, 2]], dimensions=65)
        answered, gone, dead = (engine.enqueue_embedding(engine.make_embed_request([[1, 2]]))
                                for _ in range(3))
        ids = [r.request_id for r in client.sent]
        assert engine.num_queued() == 3
        engine._on_outputs(EngineCoreOutputs(embeddings=[EmbedResult(ids[0], b"\0" * 8, 2)]))
        assert (await answered).vectors() == [[0.0, 0.0]]
        gone.cancel()  # its caller went away: the core is told at once
        await asyncio.sleep(0)
        assert client.aborted == [ids[1]]
        engine._on_dead(RuntimeError("boom"))
        with pytest.raises(EngineDeadError):
            await dead
        assert engine.num_embedding_requests() == 0

    asyncio.run(main())
