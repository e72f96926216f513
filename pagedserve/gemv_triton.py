"""One row times a weight matrix in Triton, for one-sequence decode steps on CUDA.

A decode step of one sequence multiplies one row by each weight matrix: it reads every weight
once for two flops per element, so it runs at the speed the weights stream from memory. cuBLAS
picks its own kernels for that shape; on an H100 they read the Llama-3.1-8B shape's weights at
2.5-2.8 TB/s of the card's 3.35 (measured, docs/performance.md). This kernel is the plain
bandwidth-bound form, and :func:`choose` keeps it only for the matrices where it measured
faster than cuBLAS on this GPU, at start-up (a few milliseconds per shape)::

    y (1, N) = x (1, K) @ W (N, K)^T (+ b)
    program p: rows [p * BLOCK_N, (p + 1) * BLOCK_N) of W, all of K in BLOCK_K slices,
               products summed in a (BLOCK_N, BLOCK_K) float32 tile, reduced once at the end

W is read once, in contiguous BLOCK_K runs along its rows; x (K values) is read by every
program, from cache. float32 accumulation, one rounding to the output dtype.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# (BLOCK_N, BLOCK_K, num_warps) tried at start-up
CONFIGS = [(4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8)]
TIMED_CALLS = 20


@triton.jit
def _gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, stride_w,
          K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += w * x[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


@dataclass(slots=True, frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         config: GemvConfig) -> torch.Tensor:
    """x (1, K) contiguous, weight (N, K) with unit stride along K -> (1, N) in x's dtype."""
    N, K = weight.shape
    assert x.shape == (1, K) and x.is_contiguous() and weight.stride(1) == 1
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(N, config.block_n),)](
        x, weight, bias if bias is not None else y, y, N, weight.stride(0),
        K=K, HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
        BLOCK_K=min(config.block_k, triton.next_power_of_2(K)), num_warps=config.num_warps,
    )
    return y


def _time(fn, calls: int = TIMED_CALLS) -> float:
    """Mean seconds per call on the GPU, after one warm-up call (which compiles)."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / calls


@dataclass(slots=True, frozen=True)
class GemvChoice:
    """What start-up measured for one matrix: the kernel config kept (None: cuBLAS) and the
    seconds per call of the kept one and of cuBLAS."""

    config: GemvConfig | None
    seconds: float
    cublas_seconds: float

    def describe(self) -> str:
        which = "cuBLAS" if self.config is None else \
            f"triton {self.config.block_n}x{self.config.block_k}/{self.config.num_warps}w"
        return f"{which} {self.seconds * 1e6:.1f} us (cuBLAS {self.cublas_seconds * 1e6:.1f})"


def choose(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> GemvChoice:
    """The fastest of CONFIGS for one row times `weight` on its GPU, or cuBLAS (``F.linear``)
    where no config is clearly faster. Timed on the real weight; never inside a CUDA-graph
    capture."""
    x = torch.randn((1, weight.shape[1]), dtype=weight.dtype, device=weight.device)
    cublas = _time(lambda: torch.nn.functional.linear(x, weight, bias))
    best, best_s = None, cublas
    for block_n, block_k, warps in CONFIGS:
        config = GemvConfig(block_n, block_k, warps)
        seconds = _time(lambda c=config: gemv(x, weight, bias, c))
        if seconds < best_s * 0.98:  # clearly faster, not a tie within timing noise
            best, best_s = config, seconds
    choice = GemvChoice(best, best_s, cublas)
    gbps = weight.numel() * weight.element_size() / best_s / 1e9
    logger.info("one-row matmul %s %s: %s, %.0f GB/s", name, tuple(weight.shape),
                choice.describe(), gbps)
    return choice
