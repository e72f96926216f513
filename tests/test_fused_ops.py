"""The decoder's fused Triton ops against their torch references, on CPU under the interpreter.

Ragged shapes (1, 3 and 17 tokens; widths that are not powers of two, rows wider than a block),
float32, float16 and bfloat16 (elementwise only: the interpreter lacks just the bf16 dot), then
tiny Llama and Qwen2 models run by the engine with every CUDA kernel (fused ops and Triton
attention) giving transformers' greedy tokens.
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

from fake_hardware import FakeHardware, plan_of  # noqa: E402

from pagedserve.config import ModelConfig  # noqa: E402
from pagedserve.models.llama import Rotary  # noqa: E402
from pagedserve.ops import fused_ops as ref  # noqa: E402
from pagedserve.ops.backends import select_ops  # noqa: E402

for _name in ("pagedserve.ops.fused_ops_triton", "pagedserve.ops.attention_triton"):
    if _name in sys.modules:  # imported earlier, maybe compiled for a GPU
        importlib.reload(sys.modules[_name])
from pagedserve.ops import fused_ops_triton as tri  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: the same arithmetic up to the order of a sum. 16-bit: the kernels round once,
    the reference after every op; they differ by about one rounding of the result."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # bf16:
    # the interpreter truncates where a GPU rounds, a whole unit in the last place
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize(("H", "block"), [(48, None), (96, None), (96, 32), (48, 32)])
def test_add_rms_norm_adds_in_place_and_normalizes(dtype, T, H, block):
    g = torch.Generator().manual_seed(T * H)
    x = torch.randn(T, H, generator=g)
    residual = torch.randn(T, H, generator=g).to(dtype)
    weight = torch.randn(H, generator=g)
    expected_x, expected_h = ref.add_rms_norm(x, residual, weight, 1e-6, dtype)

    stream = x.clone()
    got_x, got_h = tri.add_rms_norm(stream, residual, weight, 1e-6, dtype, block=block)
    assert got_x is stream  # updated in place
    assert torch.equal(got_x, expected_x)  # one float32 add, as in torch
    assert_close(got_h, expected_h, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [None, 16])
def test_add_rms_norm_without_a_residual_leaves_the_stream_alone(dtype, block):
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(1)) * 5
    weight = torch.rand(48) + 0.5
    expected_x, expected_h = ref.add_rms_norm(x, None, weight, 1e-5, dtype)
    stream = x.clone()
    got_x, got_h = tri.add_rms_norm(stream, None, weight, 1e-5, dtype, block=block)
    assert torch.equal(got_x, x) and torch.equal(expected_x, x)
    assert_close(got_h, expected_h, dtype)


def rope_tables(hd: int, positions: torch.Tensor, dtype: torch.dtype):
    config = ModelConfig("llama", vocab_size=32, hidden_size=64, intermediate_size=64,
                         num_layers=1, num_heads=1, num_kv_heads=1, head_dim=hd)
    return Rotary(config, 512, dtype).at(positions)  # (T, 1, hd/2) each, as the model has them


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize(("nh", "nkv", "hd", "block_h"),
                         [(4, 2, 16, 16), (4, 2, 64, 16), (4, 2, 16, 4), (6, 1, 64, 4)])
def test_rotary_qkv_matches_the_reference_and_feeds_attention(dtype, T, nh, nkv, hd, block_h):
    g = torch.Generator().manual_seed(T + hd)
    qkv = (torch.randn(T, (nh + 2 * nkv) * hd, generator=g) * 3).to(dtype)
    positions = torch.randint(0, 512, (T,), generator=g)
    cos, sin = rope_tables(hd, positions, dtype)
    expected = ref.rotary_qkv(qkv, cos, sin, nh, nkv, hd)
    got = tri.rotary_qkv(qkv, cos, sin, nh, nkv, hd, block_h=block_h)
    for got_t, expected_t, heads in zip(got, expected, (nh, nkv, nkv), strict=True):
        assert got_t.shape == (T, heads, hd) and got_t.stride(2) == 1
        assert_close(got_t, expected_t, dtype)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    assert torch.equal(got[2], expected[2])
    assert got[2].data_ptr() == qkv.data_ptr() + (nh + nkv) * hd * qkv.element_size()  # a view


def test_rotary_in_16_bits_rounds_once():
    """The kernel's q is within half a unit in the last place of the exact rotation, which the
    reference (rounding after each multiply and add) is not everywhere. In float16: the
    interpreter casts float32 to bf16 by truncation (a GPU rounds to nearest)."""
    T, nh, nkv, hd = 17, 4, 2, 64
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(T, (nh + 2 * nkv) * hd, generator=g).to(torch.float16)
    cos, sin = rope_tables(hd, torch.arange(100, 100 + T), torch.float16)
    exact = ref.rotary_qkv(qkv.double(), cos.double(), sin.double(), nh, nkv, hd)[0]
    got = tri.rotary_qkv(qkv, cos, sin, nh, nkv, hd)[0].double()
    expected = ref.rotary_qkv(qkv, cos, sin, nh, nkv, hd)[0].double()
    half_ulp = exact.abs() * 2.0**-11  # float16 keeps 11 significant bits
    assert bool(((got - exact).abs() <= half_ulp).all())
    assert (expected - exact).abs().mean() > (got - exact).abs().mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize(("inter", "block"), [(48, 1024), (48, 32), (96, 64)])
def test_silu_mul(dtype, T, inter, block):
    gate_up = (torch.randn(T, 2 * inter, generator=torch.Generator().manual_seed(T)) * 4).to(dtype)
    got = tri.silu_mul(gate_up, block=block)
    assert got.shape == (T, inter) and got.is_contiguous()
    assert_close(got, ref.silu_mul(gate_up), dtype)


def test_ops_are_chosen_once_by_device():
    """The plan decides (fused_ops None: Triton on a GPU where it launches, torch on a CPU);
    the selector only turns its answer into the ops, and refuses an undecided None."""
    assert not plan_of(fused_ops=None).fused_ops
    assert plan_of(device="cuda", fused_ops=None).fused_ops
    assert not plan_of(FakeHardware(triton="no C compiler"), device="cuda").fused_ops
    assert not plan_of(device="cuda", fused_ops=False).fused_ops
    assert plan_of(fused_ops=True).fused_ops  # on a CPU: the interpreter
    assert select_ops(False).name == "torch"
    assert select_ops(True).name == "triton"
    with pytest.raises(ValueError, match="^fused_ops must be a resolved True or False"):
        select_ops(None)


# -- the whole model ------------------------------------------------------------------------


def hf_greedy(model_dir, prompts: list[list[int]], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_engine_with_every_cuda_kernel_generates_what_transformers_does(model, request):
    """Fused ops and Triton attention on CPU, float32: chunked prefills mixed with decodes,
    greedy tokens equal to transformers'. Qwen2's q/k/v biases pass through rotary_qkv."""
    from pagedserve.config import EngineConfig
    from pagedserve.engine import Engine
    from pagedserve.loader import load_model
    from pagedserve.sampling_params import SamplingParams

    model_dir = request.getfixturevalue(model)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(12)] for _ in range(3)]
    n = 5
    engine = Engine.from_model(load_model(model_dir), EngineConfig(
        dtype="float32", kv_cache_memory=1 << 20, max_num_batched_tokens=16,
        attention_backend="triton", fused_ops=True))
    assert engine.runner.model.ops.name == "triton"
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    out = {engine.add_request(p, params): [] for p in prompts}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id] += o.delta_token_ids
    assert list(out.values()) == hf_greedy(model_dir, prompts, n)
    assert engine.kv.all_free()
