"""Tensor parallelism on a CPU (gloo, 2 processes): the same greedy tokens as one process.

The models: safetensors Llama (untied head) and Qwen2 (q/k/v biases, tied head), and the
Llama as an F32 GGUF (q/k rows permuted as llama.cpp writes them, undone before the cut).
Each engine of tensor_parallel_size 2 is rank 0 in this process plus one spawned worker; the
batch runs chunked prefills (max_num_batched_tokens below the prompt length), preemptions (a
KV cache of 12 blocks for six 64-token sequences) and, in a second round, prefix-cache hits on
the first round's prompts. Every engine is closed, its worker joined, before the test ends.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from engine_drain import drain

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.engine import Engine
from pagedserve.parallel.tensor_shard import TensorShard
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import kv_bytes_per_token

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
NUM_BLOCKS = 12  # of 16 tokens: two of the six 64-token sequences fit at once


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 500) for _ in range(length)] for _ in range(n)]


def _run(path, tp: int) -> dict:
    from pagedserve.loader import load_model

    config = load_model(path).config
    local = TensorShard(0, tp).local_config(config)
    per_block = kv_bytes_per_token(local, "float32") * 16
    engine = Engine.from_model(str(path), EngineConfig(
        kv_cache_memory=NUM_BLOCKS * per_block, dtype="float32", max_num_batched_tokens=32,
        tensor_parallel_size=tp))
    try:
        assert engine.kv.num_blocks == NUM_BLOCKS
        first = _prompts(6, 40, seed=0)
        # the same prompts again, one token longer: their full blocks are cached
        second = [p + [7] for p in first[-2:]]
        tokens = []
        for batch in (first, second):
            ids = [engine.add_request(p, GREEDY) for p in batch]
            tokens += [r["tokens"] for r in drain(engine, ids)]
        assert engine.kv.all_free()
        if tp > 1:  # computed by rank 0's LM head shard alone: refused, naming the field
            with pytest.raises(ValueError, match="^prompt_logprobs"):
                engine.add_request([5, 6, 7], SamplingParams(max_tokens=1, prompt_logprobs=1))
        stats = engine.core.stats()
        workers = engine.core.workers
        return {"tokens": tokens, "preemptions": stats.num_preemptions,
                "hits": stats.prefix_cache_hits,
                "weight_bytes": workers.weight_bytes if workers else
                [engine.runner.model.weight_bytes()],
                "processes": list(workers.processes) if workers else []}
    finally:
        engine.core.close()


@pytest.fixture(scope="module", params=["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama_gguf"])
def runs(request):
    path = request.getfixturevalue(request.param)
    return _run(path, 1), _run(path, 2)


def test_two_ranks_give_exactly_the_greedy_tokens_of_one(runs):
    one, two = runs
    assert two["preemptions"] > 0 and two["hits"] > 0  # the batch exercised both
    assert one["preemptions"] > 0 and one["hits"] > 0
    assert two["tokens"] == one["tokens"]


def test_each_rank_holds_about_half_the_weights(runs):
    one, two = runs
    [whole] = one["weight_bytes"]
    assert len(two["weight_bytes"]) == 2
    for rank_bytes in two["weight_bytes"]:
        # the norms are replicated: a little over half
        assert 0.5 * whole <= rank_bytes <= 0.52 * whole


def test_workers_are_gone_once_the_engine_closes(runs):
    _, two = runs
    [worker] = two["processes"]
    assert worker.exitcode == 0


def test_shard_ranges_cover_the_model_once():
    config = ModelConfig(architecture="llama", vocab_size=10, hidden_size=32,
                         intermediate_size=48, num_layers=1, num_heads=8, num_kv_heads=2,
                         head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                         max_position_embeddings=16)
    shards = [TensorShard(r, 4) for r in range(4)]
    assert [s.q_heads(config) for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # 2 KV heads over 4 ranks: each is replicated on the two ranks whose queries read it
    assert [s.kv_heads(config) for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [s.vocab(10) for s in shards] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert shards[1].slice_of("model.layers.0.self_attn.o_proj.weight", config) == (1, 8, 16)
    assert shards[3].slice_of("model.layers.0.mlp.down_proj.weight", config) == (1, 36, 48)
    assert shards[0].slice_of("model.layers.0.input_layernorm.weight", config) is None
    with pytest.raises(ValueError, match="^tensor_parallel_size 3 does not divide"):
        TensorShard(0, 3).check(config)


def test_tensor_parallel_size_must_be_positive():
    with pytest.raises(ValueError, match="^tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=0)


def test_a_worker_started_by_hand_joins_as_on_another_host(tiny_llama_dir, monkeypatch):
    """The multi-host path on one host: rank 0 starts no worker (LOCAL_WORLD_SIZE 1) and rank 1
    is started as on a second node, with torchrun's variables."""
    import os
    import subprocess
    import sys

    from pagedserve.engine.workers import _free_port

    prompt = _prompts(1, 40, seed=0)[0]
    config = EngineConfig(dtype="float32", kv_cache_memory=1 << 20)
    alone = Engine.from_model(str(tiny_llama_dir), config)
    [expected] = drain(alone, [alone.add_request(prompt, GREEDY)])
    port = str(_free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "RANK": "1"}
    worker = subprocess.Popen([sys.executable, "-m", "pagedserve.engine.workers",
                               str(tiny_llama_dir), "--tensor-parallel-size", "2"], env=env)
    try:
        for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port),
                            ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "1")):
            monkeypatch.setenv(name, value)
        engine = Engine.from_model(str(tiny_llama_dir),
                                   dataclasses.replace(config, tensor_parallel_size=2))
        try:
            assert engine.core.workers.processes == []
            [answer] = drain(engine, [engine.add_request(prompt, GREEDY)])
        finally:
            engine.core.close()
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert answer["tokens"] == expected["tokens"]
