"""The AVX2 int4 kernel of small CPU steps (pagedserve/native_q4.py): its blocks hold Q4_1
weights exactly, it computes llama.cpp's integer arithmetic, a row's result does not depend on
its batch-mates, an engine reads it on its small steps and stays close to float32, and a start
that finds no kernel builds one in the background instead of waiting."""

import shutil
import sysconfig
from pathlib import Path

import pytest
import torch

from pagedserve import native_q4
from pagedserve.config import EngineConfig
from pagedserve.llm import LLM
from pagedserve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(
    not native_q4.cpu_supports_avx2() or shutil.which("c++") is None
    or not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists(),
    reason="needs an x86 CPU with AVX2/FMA/F16C, a C++ compiler and Python's headers")


def unpack(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks (n, G, 20) -> q (n, G, 32), d and lo (n, G), in float64."""
    d, lo = blocks[..., :4].contiguous().view(torch.float16).double().unbind(-1)
    nibbles = blocks[..., 4:]
    return torch.cat([nibbles & 0x0F, nibbles >> 4], -1).double(), d, lo


def dequantize(blocks: torch.Tensor) -> torch.Tensor:
    q, d, lo = unpack(blocks)
    return (lo[..., None] + d[..., None] * q).flatten(1).float()


def reference(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_1 x Q8 arithmetic, in float64: x rounded to int8 per group of 32."""
    m, k = x.shape
    groups = x.view(m, k // 32, 32).double()
    scale = groups.abs().amax(-1) / 127
    p = torch.where(scale[..., None] > 0, (groups / scale[..., None]).round(), 0.0)
    q, d, lo = unpack(blocks)
    dots = torch.einsum("mgj,ngj->mng", p, q)  # integer sums, exact in float64
    offsets = lo[None] * (scale * p.sum(-1))[:, None]  # (m, n, G)
    return (dots * (d[None] * scale[:, None])).sum(-1) + offsets.sum(-1)


def test_blocks_hold_q4_1_weights_exactly(smollm_gguf):
    llm = LLM(str(smollm_gguf), dtype="float32")  # dense float32, as dequantized from Q4_1
    w = llm.engine.runner.model.layers[3].mlp.down.weight
    blocks = native_q4.pack(w)
    assert blocks.shape == (w.shape[0], w.shape[1] // 32, 20) and blocks.dtype == torch.uint8
    assert torch.equal(dequantize(blocks), w)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (40, 64)])
def test_kernel_computes_llama_cpp_arithmetic(rows, shape):
    torch.manual_seed(rows)
    n, k = shape
    blocks = native_q4.pack(torch.randn(n, k) * 0.02)
    x = torch.randn(rows, k)
    x[0, :32] = 0  # an all-zero group: scale 0, no division by it
    got = native_q4.matmul(x, blocks)
    want = reference(x, blocks)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)
    exact = x @ dequantize(blocks).t()
    assert (got - exact).abs().max() / exact.abs().max() < 2e-2  # the int8 rounding of x


def test_a_rows_result_does_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    blocks = native_q4.pack(torch.randn(3072, 576) * 0.02)
    x = torch.randn(8, 576)
    together = native_q4.matmul(x, blocks)
    for r in range(8):
        assert torch.equal(native_q4.matmul(x[r : r + 1], blocks)[0], together[r])


def test_kernel_refuses_mismatched_shapes():
    blocks = native_q4.pack(torch.randn(64, 64))
    with pytest.raises(RuntimeError, match="columns"):
        native_q4.matmul(torch.randn(1, 96), blocks)


def test_engine_small_steps_read_the_kernel_and_stay_close_to_float32(smollm_gguf, monkeypatch):
    config = EngineConfig(low_bit_small_steps=True, native_kernels=True, dtype="float32")
    llm = LLM(str(smollm_gguf), engine_config=config)
    exact = LLM(str(smollm_gguf), dtype="float32")
    down = llm.engine.runner.model.layers[0].mlp.down
    assert down._q4 is not None and down._int4 is None
    params = SamplingParams(temperature=0, max_tokens=12)
    got = llm.generate(["The capital of France is"], params)[0]
    want = exact.generate(["The capital of France is"], params)[0]
    assert got.token_ids[:4] == want.token_ids[:4]
    # a one-token step takes the decode path, through the kernel
    calls = []
    original = native_q4.matmul
    monkeypatch.setattr(native_q4, "matmul", lambda x, b: calls.append(b is down._q4) or original(x, b))
    logits = llm.engine.runner.prompt_logits(got.prompt_token_ids[-1:], [0])
    assert any(calls)
    ref = exact.engine.runner.prompt_logits(got.prompt_token_ids[-1:], [0])
    assert not torch.equal(logits, ref)
    assert (logits - ref).abs().max() / ref.abs().max() < 0.1
    assert (logits[-1].argmax() == ref[-1].argmax()).item()


def test_a_start_without_the_kernel_builds_it_in_the_background(tmp_path, monkeypatch):
    built = native_q4.library_path()  # the suite's own build (conftest)
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(native_q4.subprocess, "Popen", lambda *a, **k: started.append(a[0]))
    assert native_q4.resolve(None) is False  # nothing built here: torch's kernel for this run
    assert started and "native_q4.build()" in started[0][-1]
    shutil.copy(built, native_q4.library_path())  # what that build leaves
    started.clear()
    assert native_q4.resolve(None) is True and not started
    assert native_q4.resolve(False) is False


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(native_q4.NativeKernelUnavailable, match="did not compile"):
        native_q4.build()
    assert not list(tmp_path.iterdir())
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(native_q4.NativeKernelUnavailable, match="could not run"):
        native_q4.build()
    assert not list(tmp_path.iterdir())
