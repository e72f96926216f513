"""One row times each SmolLM2-135M matrix: torch's int4 (groups of 32) and int8 (one scale per
row) weight-only kernels with bf16 activations, and dense bf16 and float32; microseconds per
call, then the sum for one token (30 layers and the LM head). Random weights; each matrix is
timed hot in cache, so read it as the kernels' compute cost, not the model's memory traffic.

    OMP_NUM_THREADS=2 python scripts/lowbit_kernels.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}
LAYERS = 30


def microseconds(fn: Callable[[], torch.Tensor], calls: int = 300) -> float:
    for _ in range(30):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def kernels(n: int, k: int) -> dict[str, Callable[[], torch.Tensor]]:
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, k).bfloat16()
    groups = w.view(n, k // 32, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q4 = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).view(n, k).int()
    packed = torch._convert_weight_to_int4pack_for_cpu(q4, 1)
    scales_zeros = torch.stack([scale.t(), (lo + 8 * scale).t()], -1).bfloat16().contiguous()
    row_scale = w.abs().amax(1) / 127
    q8 = (w / row_scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    row_scale = row_scale.bfloat16()
    wb, xf = w.bfloat16(), x.float()
    return {
        "int4": lambda: torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros),
        "int8": lambda: torch._weight_int8pack_mm(x, q8, row_scale),
        "bf16": lambda: x @ wb.t(),
        "fp32": lambda: xf @ w.t(),
    }


def main() -> None:
    torch.manual_seed(0)
    print("threads", torch.get_num_threads())
    per_token: dict[str, float] = {}
    for name, (n, k) in SHAPES.items():
        times = {kind: microseconds(fn) for kind, fn in kernels(n, k).items()}
        for kind, us in times.items():
            per_token[kind] = per_token.get(kind, 0.0) + us * (1 if name == "lm_head" else LAYERS)
        print(f"{name:8} {n}x{k}: " + "  ".join(f"{kind} {us:7.1f}" for kind, us in times.items()))
    print("per token (30 layers + head), ms: "
          + "  ".join(f"{kind} {us / 1000:.2f}" for kind, us in per_token.items()))


if __name__ == "__main__":
    main()
