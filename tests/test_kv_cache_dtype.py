"""The KV cache's own dtype (EngineConfig.kv_cache_dtype, --kv-cache-dtype): what "auto"
picks, the capacity it buys, and each attention path reading a float16 cache under a float32
model. The native decoder's float16 reads are checked against the per-op path in
test_cpu_kernels.py."""

from __future__ import annotations

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.execution_plan import resolve_kv_cache_dtype


def test_auto_is_float16_only_where_auto_chose_float32_on_a_cpu():
    # (setting, dtype as asked, dtype as resolved, device) -> the cache's dtype
    assert resolve_kv_cache_dtype("auto", "auto", "float32", "cpu") == "float16"
    assert resolve_kv_cache_dtype("auto", "float32", "float32", "cpu") == "float32"  # exact
    assert resolve_kv_cache_dtype("auto", "auto", "bfloat16", "cpu") == "bfloat16"
    assert resolve_kv_cache_dtype("auto", "auto", "bfloat16", "cuda") == "bfloat16"
    assert resolve_kv_cache_dtype("auto", "float32", "float32", "cuda:0") == "float32"
    assert resolve_kv_cache_dtype("float32", "auto", "float32", "cpu") == "float32"
    assert resolve_kv_cache_dtype("float16", "float32", "float32", "cpu") == "float16"
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="fp8")


def test_a_float16_cache_holds_twice_the_tokens(tiny_llama_dir):
    engines = {kv: LLM(str(tiny_llama_dir), engine_config=EngineConfig(
        dtype="float32", kv_cache_dtype=kv, kv_cache_memory=4 << 20)).engine
        for kv in ("auto", "float16")}
    assert engines["auto"].config.kv_cache_dtype == "float32"  # an explicit float32 model
    assert engines["float16"].config.kv_cache_dtype == "float16"
    assert engines["float16"].runner.kv_caches[0][0].dtype == torch.float16
    assert engines["float16"].kv.capacity_tokens == 2 * engines["auto"].kv.capacity_tokens
    default = LLM(str(tiny_llama_dir), engine_config=EngineConfig(kv_cache_memory=4 << 20))
    if default.engine.config.dtype == "float32":  # a CPU without native bfloat16, as CI's
        assert default.engine.config.kv_cache_dtype == "float16"


def test_the_per_op_path_reads_a_float16_cache(tiny_llama_dir):
    """Plain torch attention under a float32 model: close to the float32 cache, not equal to it
    (the cache did round), and a prefix-cache hit gives the whole prompt's tokens."""
    prompt = [3 + (11 * i) % 400 for i in range(70)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3)
    runs = {}
    for kv in ("float32", "float16"):
        llm = LLM(str(tiny_llama_dir), engine_config=EngineConfig(
            dtype="float32", kv_cache_dtype=kv, low_bit_small_steps=False))
        assert llm.engine.runner.model.decoder_layers.name == "torch"
        runs[kv] = [llm.generate([prompt], params)[0] for _ in range(2)]
        assert llm.engine.kv.prefix_hits > 0
        assert runs[kv][1].token_ids == runs[kv][0].token_ids

    def top(output) -> list[dict[int, float]]:
        return [{lp.token_id: lp.logprob for lp in position.top} for position in output.logprobs]

    diffs = [abs(a[t] - b[t])
             for a, b in zip(top(runs["float32"][0]), top(runs["float16"][0]), strict=True)
             for t in a.keys() & b.keys()]
    assert 0 < max(diffs) < 1e-2


def test_a_prompt_attends_to_its_keys_and_values_as_the_cache_holds_them():
    """A chunk with no cached prefix attends to its fresh K and V without reading the cache
    back; with a float16 cache they are rounded first, so that the chunk computes what a
    prefix-cache hit or the native decoder (both reading the cache) would."""
    from pagedserve.ops.attention import AttentionDims, paged_attention, prepare
    from pagedserve.worker.step_inputs import StepChunk, StepInputs

    torch.manual_seed(0)
    n, nh, nkv, hd, bs = 20, 4, 2, 16, 16
    q, k, v = (torch.randn(n, h, hd) * 3 for h in (nh, nkv, nkv))
    inputs = StepInputs(n, 1, 2, bs, torch.device("cpu"))
    batch = inputs.prepare([StepChunk(list(range(n)), 0, [0, 1], True)])
    prepare(batch.meta, AttentionDims(nh, nkv, hd))
    caches = [torch.zeros(2, bs, nkv, hd, dtype=torch.float16) for _ in range(2)]
    got = paged_attention(q, k, v, *caches, batch.meta, hd ** -0.5)

    def reference(keys, values):
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=mask,
            scale=hd ** -0.5, enable_gqa=True).transpose(0, 1)

    rounded = reference(k.half().float(), v.half().float())
    torch.testing.assert_close(got, rounded, rtol=1e-6, atol=1e-6)
    assert (got - reference(k, v)).abs().max() > 1e-4
    assert torch.equal(caches[0].view(-1, nkv, hd)[:n], k.half())


def test_a_bfloat16_cache_leaves_the_native_decoder_for_the_per_op_path(tiny_llama_dir):
    config = EngineConfig(dtype="float32", kv_cache_dtype="bfloat16", low_bit_small_steps=True,
                          native_kernels=True)
    llm = LLM(str(tiny_llama_dir), engine_config=config)
    assert llm.engine.runner.model.decoder_layers.name == "torch"
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=4,
                                                      ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_triton_attention_refuses_a_cache_in_another_dtype(tiny_llama_dir):
    pytest.importorskip("triton")
    config = EngineConfig(dtype="float32", kv_cache_dtype="float16", attention_backend="triton")
    with pytest.raises(ValueError, match="needs attention_backend torch"):
        LLM(str(tiny_llama_dir), engine_config=config)
