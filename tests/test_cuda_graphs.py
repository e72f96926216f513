"""CUDA-graph bookkeeping on CPU: bucket sizes, bucket choice, and decode steps padded to a
bucket giving exactly the tokens of unpadded steps (what a replayed graph computes)."""

from __future__ import annotations

import pytest

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes, pick_bucket


def test_bucket_sizes():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(8) == [1, 2, 4, 8]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert all(b - a == 8 for a, b in zip(sizes[3:], sizes[4:], strict=False))
    assert graph_batch_sizes(64, step=16) == [1, 2, 4, 8, 16, 32, 48, 64]
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_pick_bucket_is_the_smallest_size_that_holds_the_batch():
    sizes = [1, 2, 4, 8, 16]
    assert [pick_bucket(n, sizes) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert pick_bucket(17, sizes) is None
    assert pick_bucket(3, []) is None


class EagerBuckets(DecodeGraphs):
    """What a replayed graph computes, without CUDA: the model on the padded step inputs."""

    def __init__(self, sizes, runner):
        super().__init__()
        self.sizes, self.runner, self.replayed = sizes, runner, []

    def replay(self, b, batch):
        assert batch.num_rows == b and batch.meta.num_decodes == b
        self.replayed.append((batch.meta.num_actual_tokens, b))
        return self.runner._forward(batch)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def generate(loaded, prompts, graphs_sizes=None):
    engine = Engine.from_model(loaded, EngineConfig(dtype="float32", kv_cache_memory=1 << 20,
                                                    max_num_batched_tokens=32))
    if graphs_sizes is not None:
        engine.runner.graphs = EagerBuckets(graphs_sizes, engine.runner)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    out = {engine.add_request(p, params): [] for p in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.delta_token_ids
    assert engine.kv.all_free()
    engine.check_integrity()
    return list(out.values()), engine


def test_padded_decode_steps_give_the_tokens_of_unpadded_ones(tiny):
    prompts = [[5 + i] * (4 + 3 * i) for i in range(5)]
    expected, _ = generate(tiny, prompts)
    got, engine = generate(tiny, prompts, graphs_sizes=[1, 2, 4, 8])
    assert got == expected
    replayed = engine.runner.graphs.replayed
    assert (5, 8) in replayed  # five decodes padded with three rows that write no KV
    assert all(b == pick_bucket(n, [1, 2, 4, 8]) for n, b in replayed)


def test_decode_batches_above_the_largest_bucket_run_eagerly(tiny):
    prompts = [[7 + i] * 5 for i in range(3)]
    expected, _ = generate(tiny, prompts)
    got, engine = generate(tiny, prompts, graphs_sizes=[1, 2])
    assert got == expected
    assert all(n <= 2 for n, _ in engine.runner.graphs.replayed)  # 3 decodes: eager
