"""The one-row Triton matmul against torch, on CPU under the interpreter, and a one-sequence
engine whose every matmul of one row takes it, giving transformers' greedy tokens."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is decorated (at its import)

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hf_reference import hf_greedy  # noqa: E402

pytest.importorskip("triton")

for _name in ("pagedserve.gemv_triton", "pagedserve.fused_ops_triton",
              "pagedserve.attention_triton"):
    if _name in sys.modules:  # imported earlier, maybe compiled for a GPU
        importlib.reload(sys.modules[_name])
from pagedserve import gemv_triton  # noqa: E402
from pagedserve.gemv_triton import CONFIGS, GemvConfig, gemv  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", [GemvConfig(*c) for c in CONFIGS[:2]] + [
    GemvConfig(4, 32, 1)])  # a small block: K spans several slices
@pytest.mark.parametrize(("N", "K", "bias"), [(37, 48, False), (64, 200, True),
                                              (5, 1030, True)])
def test_one_row_times_a_matrix(dtype, config, N, K, bias):
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(1, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    got = gemv(x, w, b, config)
    exact = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (1, N)
    # the sum is over K terms of size ~1: its error grows like sqrt(K) roundings of ~sqrt(K)
    err = ((got.double() - exact).abs() / (K ** 0.5 + exact.abs())).max().item()
    assert err < TOLERANCE[dtype]


def test_a_strided_weight_view_is_read_by_its_row_stride():
    """The LM head of a tied model is the embedding; any (N, K) view with unit K stride."""
    w = torch.randn(10, 64)
    view = w[::2]  # row stride 128
    x = torch.randn(1, 64)
    got = gemv(x, view, None, GemvConfig(4, 32, 1))
    torch.testing.assert_close(got, x @ view.T, rtol=1e-5, atol=1e-5)


def test_the_engine_on_one_sequence_with_every_one_row_matmul_in_triton(tiny_llama_dir):
    """Decode steps of one sequence and the LM head's one row take the kernel (the layers'
    matmuls and the LM head; prompts of several rows keep torch): greedy tokens equal
    transformers' in float32."""
    from pagedserve.config import EngineConfig
    from pagedserve.engine import Engine
    from pagedserve.loader import load_model
    from pagedserve.sampling_params import SamplingParams

    engine = Engine.from_model(load_model(tiny_llama_dir), EngineConfig(
        dtype="float32", kv_cache_memory=1 << 20, attention_backend="triton",
        fused_ops=True))
    model = engine.runner.model
    calls = []

    def counted(x, weight, bias, config):
        calls.append(weight.shape)
        return gemv(x, weight, bias, config)

    for group in model._linears().values():
        for linear in group:
            linear.one_row = (counted, GemvConfig(4, 64, 2))
    prompt, n = [5, 17, 300, 42, 9, 77, 120], 6
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    out = []
    while engine.has_unfinished_requests():
        out += [t for o in engine.step() if o.request_id == rid for t in o.delta_token_ids]
    assert out == hf_greedy(tiny_llama_dir, [prompt], n)[0]
    layers = len(model.layers)
    # n - 1 decode steps of 4 matmuls per layer, and the LM head of each of the n steps
    assert len(calls) == (n - 1) * 4 * layers + n


@pytest.mark.parametrize(("timings", "chosen", "seconds"), [
    ([10.0, 12.0, 9.9, 11.0, 10.5], None, 10.0),  # 1% faster is a tie: cuBLAS stays
    ([10.0, 12.0, 9.0, 8.5, 11.0], CONFIGS[2], 8.5),  # the fastest clear winner
])
def test_the_kernel_is_kept_only_where_it_measured_clearly_faster(monkeypatch, timings, chosen,
                                                                   seconds):
    """cuBLAS is timed first, then each config; a config must beat the best so far by 2%."""
    measured = iter(timings)
    monkeypatch.setattr(gemv_triton, "_time", lambda fn: next(measured))
    choice = gemv_triton.choose(torch.randn(8, 32), None, "test")
    assert choice.config == (None if chosen is None else GemvConfig(*chosen))
    assert (choice.seconds, choice.cublas_seconds) == (seconds, 10.0)
