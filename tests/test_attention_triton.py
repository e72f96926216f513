"""The Triton kernels against the torch reference, on CPU under the Triton interpreter.

Small shapes, ragged block tables with scattered block ids, padded rows, GQA, split-KV, extend
chunks over a cached prefix and mixed decode + prefill steps, in float32 and float16 (the
interpreter has no bf16 dot).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (at their import)

import importlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from pagedserve.ops import attention as ref  # noqa: E402
from pagedserve.ops.attention import AttentionDims, AttentionMetadata  # noqa: E402

if "pagedserve.ops.attention_triton" in sys.modules:  # imported earlier, maybe compiled for a GPU
    importlib.reload(sys.modules["pagedserve.ops.attention_triton"])
from pagedserve.ops import attention_triton as tri  # noqa: E402

BS = 16
NUM_BLOCKS = 24


def make_step(requests: list[tuple[int, int]], pad_to: int = 0, seed: int = 0):
    """requests: (cached tokens, new tokens) each, one-token ones first. Every request gets
    scattered, non-contiguous block ids; `pad_to` adds padding rows up to that many requests."""
    rng = random.Random(seed)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    qsl, lens, slots, tables = [0], [], [], []
    for cached, new in requests:
        end = cached + new
        table = [free.pop() for _ in range(-(-end // BS))]
        tables.append(table)
        slots += [table[p // BS] * BS + p % BS for p in range(cached, end)]
        qsl.append(qsl[-1] + new)
        lens.append(end)
    num_actual = qsl[-1]
    for _ in range(len(requests), pad_to):  # a CUDA graph's padding: one row, no context
        qsl.append(qsl[-1] + 1)
        lens.append(0)
        slots.append(-1)
        tables.append([])
    width = max(1, max(len(t) for t in tables))
    i32 = torch.int32
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=i32),
        query_start_loc=torch.tensor(qsl, dtype=i32),
        seq_lens=torch.tensor(lens, dtype=i32),
        # past a request's blocks: junk ids, never read
        block_tables=torch.tensor([t + [NUM_BLOCKS - 1] * (width + 1 - len(t)) for t in tables],
                                  dtype=i32),
        num_decodes=sum(1 for c, n in requests if n == 1) + max(0, pad_to - len(requests)),
        num_actual_tokens=num_actual,
        max_query_len=max(b - a for a, b in zip(qsl, qsl[1:], strict=False)),
        max_seq_len=max(lens), query_start_loc_host=qsl, seq_lens_host=lens, block_size=BS,
    )
    return meta, qsl[-1]


def run_both(requests, nh, nkv, hd, dtype, pad_to=0, num_splits=1, block_n=16, seed=0):
    meta, T = make_step(requests, pad_to, seed)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(T, h, hd, generator=g).to(dtype) for h in (nh, nkv, nkv))
    cache = torch.randn(2, NUM_BLOCKS, BS, nkv, hd, generator=g).to(dtype)  # an older prefix
    dims = AttentionDims(nh, nkv, hd)
    scale = hd**-0.5

    ref_cache = cache.clone()
    ref.prepare(meta, dims)
    expected = ref.paged_attention(q, k, v, ref_cache[0], ref_cache[1], meta, scale)

    tri_cache = cache.clone()
    tri.prepare(meta, dims, num_splits=num_splits)
    got = tri.paged_attention(q, k, v, tri_cache[0], tri_cache[1], meta, scale, block_n=block_n)
    return got, expected, tri_cache, ref_cache


def assert_close(got, expected, dtype):
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


def test_store_writes_each_row_at_its_slot_and_skips_padding():
    T, nkv, hd = 5, 2, 16
    k, v = torch.randn(T, nkv, hd), torch.randn(T, nkv, hd)
    k_cache, v_cache = torch.zeros(4, BS, nkv, hd), torch.zeros(4, BS, nkv, hd)
    slots = torch.tensor([35, 3, -1, 63, -1], dtype=torch.int32)
    tri.store_kv(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, nkv, hd), v_cache.view(-1, nkv, hd)
    for row, slot in ((0, 35), (1, 3), (3, 63)):
        assert torch.equal(flat_k[slot], k[row]) and torch.equal(flat_v[slot], v[row])
    assert int((flat_k.abs().sum(dim=(1, 2)) > 0).sum()) == 3  # padding wrote nothing


def test_store_reads_strided_rows_of_a_fused_projection():
    T, nh, nkv, hd = 3, 4, 2, 16
    qkv = torch.randn(T, (nh + 2 * nkv) * hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(T, nkv, hd)  # row stride (nh + 2 nkv) hd
    v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
    k_cache, v_cache = torch.zeros(2, BS, nkv, hd), torch.zeros(2, BS, nkv, hd)
    tri.store_kv(k, v, k_cache, v_cache, torch.tensor([17, 0, 5], dtype=torch.int32))
    assert torch.equal(k_cache.view(-1, nkv, hd)[17], k[0])
    assert torch.equal(v_cache.view(-1, nkv, hd)[5], v[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("nh", "nkv"), [(4, 2), (4, 1)])
def test_decode_ragged_contexts_with_padding(dtype, nh, nkv):
    # contexts 1, 16 (a full block), 17 (one past it) and 53; two padded rows
    requests = [(0, 1), (15, 1), (16, 1), (52, 1)]
    got, expected, tri_cache, ref_cache = run_both(requests, nh, nkv, 16, dtype, pad_to=6)
    assert_close(got, expected, dtype)
    assert torch.equal(got[4:], torch.zeros_like(got[4:]))  # padding reads nothing
    assert torch.equal(tri_cache, ref_cache)  # and writes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_split_kv_matches_one_pass(dtype):
    # 3 slices of contexts up to 100 tokens: slices of 16 tokens, some empty for short contexts
    requests = [(99, 1), (5, 1), (40, 1)]
    got, expected, *_ = run_both(requests, 4, 2, 16, dtype, pad_to=4, num_splits=3)
    assert_close(got, expected, dtype)
    assert torch.equal(got[3], torch.zeros_like(got[3]))


def test_decode_with_wide_tiles_and_a_head_dim_that_is_not_a_power_of_two():
    requests = [(70, 1), (3, 1)]
    got, expected, *_ = run_both(requests, 6, 2, 24, torch.float32, num_splits=2, block_n=64)
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_and_extend_chunks_in_one_launch(dtype):
    # a fresh prompt, an extend over a 23-token cached prefix, one over exactly 2 blocks
    requests = [(0, 20), (23, 12), (32, 5)]
    got, expected, tri_cache, ref_cache = run_both(requests, 4, 2, 16, dtype)
    assert_close(got, expected, dtype)
    assert torch.equal(tri_cache, ref_cache)


def test_prefill_chunk_longer_than_a_query_tile():
    got, expected, *_ = run_both([(10, 70)], 2, 1, 16, torch.float32, block_n=64)
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mixed_decode_and_prefill_step(dtype):
    requests = [(30, 1), (0, 1), (47, 1), (0, 9), (18, 14)]
    got, expected, tri_cache, ref_cache = run_both(requests, 4, 2, 16, dtype, num_splits=2)
    assert_close(got, expected, dtype)
    assert torch.equal(tri_cache, ref_cache)


def test_split_count_fills_the_gpu_but_never_slices_short_contexts():
    assert tri.num_kv_splits(1, 8, 131072, num_sms=132) == 33  # 8 programs -> 2 x 132
    assert tri.num_kv_splits(128, 8, 131072, num_sms=132) == 1  # 1024 programs already
    assert tri.num_kv_splits(1, 8, 300, num_sms=132) == 2  # no slice under 256 tokens
    assert tri.num_kv_splits(1, 1, 10**7, num_sms=1000) == tri.MAX_SPLITS


def test_engine_with_triton_attention_generates_what_the_torch_backend_does(tiny_llama_dir):
    """The whole CUDA attention path on CPU: chunked prefill mixed with decodes, a cached
    prefix, and greedy tokens equal to the reference backend's."""
    from pagedserve.config import EngineConfig
    from pagedserve.engine import Engine
    from pagedserve.loader import load_model
    from pagedserve.sampling_params import SamplingParams

    loaded = load_model(tiny_llama_dir)
    shared = list(range(5, 37))  # two full blocks every prompt shares: prefix-cache hits
    prompts = [shared + [40 + i] * (3 + 5 * i) for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def generate(backend: str) -> tuple[list[list[int]], Engine]:
        engine = Engine.from_model(loaded, EngineConfig(
            dtype="float32", kv_cache_memory=1 << 20, max_num_batched_tokens=24,
            attention_backend=backend))
        out = {engine.add_request(p, params): [] for p in prompts}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out[o.request_id] += o.delta_token_ids
        assert engine.kv.all_free()
        return list(out.values()), engine

    expected, _ = generate("torch")
    got, engine = generate("triton")
    assert engine.runner.attention.name == "triton"
    assert got == expected
    assert engine.kv.prefix_hits > 0


def test_backend_is_chosen_by_device_at_start_up():
    """The plan decides (auto: Triton on a GPU where it launches, torch on a CPU); the
    selector only turns its answer into the backend, and refuses an undecided auto."""
    from fake_hardware import FakeHardware, plan_of

    from pagedserve.ops.backends import select_backend

    assert plan_of(attention_backend="auto").attention_backend == "torch"
    assert plan_of(device="cuda", attention_backend="auto").attention_backend == "triton"
    assert plan_of(FakeHardware(triton="no C compiler"), device="cuda").attention_backend == (
        "torch")
    assert plan_of(device="cuda", attention_backend="torch").attention_backend == "torch"
    triton = plan_of(dtype="float32", attention_backend="triton")  # on a CPU: the interpreter
    assert triton.attention_backend == "triton"
    assert select_backend("torch").name == "torch"
    triton_backend = select_backend("triton")
    assert triton_backend.name == "triton" and triton_backend.supports_cuda_graphs
    with pytest.raises(ValueError, match="^attention_backend must be a resolved torch or triton"):
        select_backend("auto")
