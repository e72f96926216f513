"""bf16 with low-bit weights for small steps: exact grids for Q4_1, close logits overall."""

from __future__ import annotations

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine import Engine
from pagedserve.loader import load_model
from pagedserve.models.llama import SMALL_STEP_TOKENS, Linear


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    return load_model(smollm_gguf)


def test_int4_copy_of_q4_1_weights_is_exact_and_matches_the_dense_matmul(smollm):
    w = smollm.weights["model.layers.3.mlp.down_proj.weight"]  # Q4_1 in the GGUF
    n, k = w.shape
    groups = w.view(n, k // 32, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    q = ((groups - lo[..., None]) / scale[..., None]).round()
    assert torch.equal((q * scale[..., None] + lo[..., None]).view(n, k), w)  # same grid

    linear = Linear(w.to(torch.bfloat16))
    linear.pack_low_bit(4)
    x = torch.randn(SMALL_STEP_TOKENS, k, generator=torch.Generator().manual_seed(0))
    ref = x @ w.t()
    low = linear(x.to(torch.bfloat16)).float()  # the int4 kernel
    dense = linear(torch.cat([x] * 2).to(torch.bfloat16))[:SMALL_STEP_TOKENS].float()
    assert (low - ref).abs().max() / ref.abs().max() < 1e-2
    assert (dense - ref).abs().max() / ref.abs().max() < 1e-2


def test_bf16_engine_logits_stay_close_to_float32(smollm):
    ids = smollm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine.from_model(smollm, EngineConfig(kv_cache_memory=32 << 20, dtype=dtype))
        blocks = list(range(engine.kv.blocks_needed(len(ids))))
        full = engine.runner.prompt_logits(ids, blocks)  # a prompt: dense bf16
        small = engine.runner.prompt_logits(ids[:1], blocks)  # a decode-only step: int4/int8
        logits[dtype] = (full, small)
    for big_or_small in (0, 1):
        ref, got = logits["float32"][big_or_small], logits["bfloat16"][big_or_small]
        assert (got - ref).abs().max() / ref.abs().max() < 0.1
        assert (got[-1].argmax() == ref[-1].argmax()).item()


def test_low_bit_small_steps_by_default_except_in_an_explicit_float32():
    from pagedserve.worker.execution_plan import resolve_low_bit

    assert resolve_low_bit(None, "auto", "bfloat16") and resolve_low_bit(None, "bfloat16",
                                                                          "bfloat16")
    assert resolve_low_bit(None, "auto", "float32")  # auto on a CPU without native bf16
    assert not resolve_low_bit(None, "float32", "float32")  # the exact reference
    assert resolve_low_bit(True, "float32", "float32") and not resolve_low_bit(False, "auto",
                                                                               "bfloat16")


def test_float32_small_steps_read_int4_in_bf16_and_stay_close(smollm):
    ids = smollm.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    logits, layers = {}, {}
    for low_bit in (False, True):
        # torch's int4 kernel (test_cpu_kernels covers pagedserve's own)
        engine = Engine.from_model(smollm, EngineConfig(kv_cache_memory=32 << 20, dtype="float32",
                                                        low_bit_small_steps=low_bit,
                                                        native_kernels=False))
        blocks = list(range(engine.kv.blocks_needed(len(ids))))
        full = engine.runner.prompt_logits(ids, blocks)  # a prompt: dense float32 either way
        small = engine.runner.prompt_logits(ids[:1], blocks)  # a decode-size step
        logits[low_bit], layers[low_bit] = (full, small), engine.runner.model.layers[0]
    assert layers[False].mlp.down._int4 is None and layers[True].mlp.down._int4 is not None
    assert torch.equal(logits[True][0], logits[False][0])  # prompts never read low-bit copies
    ref, got = logits[False][1], logits[True][1]
    assert not torch.equal(got, ref)  # the small step did take the int4 path
    assert (got - ref).abs().max() / ref.abs().max() < 0.1
    assert (got[-1].argmax() == ref[-1].argmax()).item()
    assert got.dtype == torch.float32
