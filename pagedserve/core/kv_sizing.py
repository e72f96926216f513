"""How much memory the paged KV cache gets, when ``kv_cache_memory`` does not say.

CPU: a share (``kv_cache_fraction``) of the memory the kernel reports available, capped at
:data:`DEFAULT_KV_CACHE_CAP`.

CUDA, vLLM's ``gpu_memory_utilization``: the process may use that share of the GPU's total
memory. With the weights loaded, a profiling forward pass at ``max_num_batched_tokens`` (plus
the LM head and a sampler-like sort over ``max_num_seqs`` rows) sets torch's peak; what the
GPU holds outside torch's allocator (the CUDA context, cuBLAS workspaces, other processes)
counts too; the KV cache gets the rest::

    kv_bytes = total x utilization - torch_peak - non_torch
    non_torch = (total - free) - torch_reserved          measured after the profiling pass
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_KV_CACHE_CAP = 2 << 30  # bytes, when neither kv_cache_memory nor a device says more
GiB = float(1 << 30)


@dataclass(slots=True)
class GpuMemory:
    """One device's memory after the profiling pass, in bytes."""

    total: int
    free: int
    torch_peak: int  # max allocated by torch: weights + peak activations
    torch_reserved: int  # held by torch's caching allocator now

    @property
    def non_torch(self) -> int:
        return max(0, self.total - self.free - self.torch_reserved)


def kv_cache_bytes_for_gpu(memory: GpuMemory, utilization: float) -> int:
    """vLLM's rule; raises ValueError naming gpu_memory_utilization when nothing is left."""
    allowed = int(memory.total * utilization)
    kv = allowed - memory.torch_peak - memory.non_torch
    if kv <= 0:
        raise ValueError(
            f"gpu_memory_utilization {utilization} allows {allowed / GiB:.2f} GiB of the GPU's "
            f"{memory.total / GiB:.2f} GiB, but the weights and activations take "
            f"{memory.torch_peak / GiB:.2f} GiB and CUDA and other processes "
            f"{memory.non_torch / GiB:.2f} GiB: nothing is left for the KV cache; raise it, or "
            "lower max_num_batched_tokens")
    logger.info("GPU memory: %.2f GiB x %.2f = %.2f GiB for this process; weights and peak "
                "activations %.2f GiB, CUDA and other processes %.2f GiB, KV cache %.2f GiB",
                memory.total / GiB, utilization, allowed / GiB, memory.torch_peak / GiB,
                memory.non_torch / GiB, kv / GiB)
    return kv


def cpu_kv_cache_bytes(kv_cache_fraction: float) -> int:
    available = DEFAULT_KV_CACHE_CAP / kv_cache_fraction
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(available * kv_cache_fraction, DEFAULT_KV_CACHE_CAP))
