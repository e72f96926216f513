"""KV cache sizing: vLLM's gpu_memory_utilization arithmetic, as a plain function."""

from __future__ import annotations

import pytest

from pagedserve.config import EngineConfig
from pagedserve.core.kv_sizing import GpuMemory, cpu_kv_cache_bytes, kv_cache_bytes_for_gpu

GiB = 1 << 30


def test_kv_cache_gets_what_weights_activations_and_cuda_leave():
    # an 80 GiB card: 16 GiB weights + 2 GiB activation peak, 1 GiB of CUDA context and
    # workspaces outside torch (80 - 60 free - 19 reserved), 0.9 x 80 = 72 GiB allowed
    memory = GpuMemory(total=80 * GiB, free=60 * GiB, torch_peak=18 * GiB,
                       torch_reserved=19 * GiB)
    assert memory.non_torch == 1 * GiB
    assert kv_cache_bytes_for_gpu(memory, 0.9) == int(80 * GiB * 0.9) - 18 * GiB - 1 * GiB
    assert kv_cache_bytes_for_gpu(memory, 0.5) == 40 * GiB - 19 * GiB


def test_no_room_left_names_the_knob():
    memory = GpuMemory(total=24 * GiB, free=6 * GiB, torch_peak=17 * GiB,
                       torch_reserved=17 * GiB)
    with pytest.raises(ValueError, match="^gpu_memory_utilization 0.5 allows 12.00 GiB"):
        kv_cache_bytes_for_gpu(memory, 0.5)


def test_cpu_sizing_is_capped():
    assert 0 < cpu_kv_cache_bytes(0.25) <= 2 * GiB


@pytest.mark.parametrize("value", [0, -0.1, 1.5])
def test_utilization_must_be_a_share(value):
    with pytest.raises(ValueError, match="^gpu_memory_utilization must be in"):
        EngineConfig(gpu_memory_utilization=value)


def test_profiling_pass_runs_the_largest_step_and_leaves_out_its_own_cache(
        tiny_llama_dir, monkeypatch):
    """The CUDA profiling pass, run on CPU with torch.cuda's counters stubbed."""
    import torch

    from pagedserve.engine import Engine
    from pagedserve.loader import load_model

    engine = Engine.from_model(load_model(tiny_llama_dir),
                               EngineConfig(dtype="float32", kv_cache_memory=1 << 20))
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (6 * GiB, 8 * GiB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: GiB + 4096)
    # 100 tokens as requests of at most 48: 48 + 48 + 4 -> 3 + 3 + 1 blocks of 16 tokens
    memory = engine.runner.profile_gpu_memory(100, 8, model_len=48)
    cache_bytes = 2 * 2 * 7 * 16 * 2 * 16 * 4  # K and V, 2 layers, 7 blocks, 2 KV heads x 16
    assert memory == GpuMemory(8 * GiB, 6 * GiB, GiB - cache_bytes, GiB + 4096)
