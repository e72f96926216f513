"""The kernels a :class:`~pagedserve.models.llama.Linear` reads its weights with: one object per
path, chosen once, when the weights are packed (:func:`pack_low_bit`).

A step of a few tokens is bound by memory bandwidth: every weight is read for a handful of
multiply-adds. For those steps a low-bit copy of W is read instead of the dense one; large steps
are compute-bound and keep the dense matmul. Each kernel is called with the step's rows and
whether the step is small (the caller's rule: decode-only steps of at most ``SMALL_STEP_TOKENS``
tokens, or, for the LM head, that many sampling rows)::

    kernel       holds                                 small step               larger step
    Dense        W                                     x W^T + b                x W^T + b
    TorchInt4    int4, groups of 32 (scale, zero)      torch's int4 kernel      dense
    TorchInt8    int8, a scale per output row          torch's int8 kernel      dense
    CpuTiles     Q4_1 or Q8_0 tiles (cpu_kernels/)     pagedserve's kernels     float32 model: the
                                                                                same; else dense

torch's int4 copy is exact for weights that came from Q4_0/Q4_1 GGUF blocks (min/max-quantized
over the same groups of 32 along the input dimension). Its kernels want bf16 activations on a
CPU (given float32 they fall back to a reference loop ~10x slower), so a float32 model's small
steps cast their few rows to bf16 and back.

The CPU kernels' tiles keep the same grid (Q8_0 for the LM head) and round the activations to
int8 (llama.cpp's arithmetic). In a float32 model they serve every step, prompts included: they
are faster than dense float32 at every size measured, and a row's result does not depend on the
other rows of the step, so a prompt's tokens round the same whole or after a prefix-cache hit.
A bf16 model keeps its dense weights for large steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.ops.cpu_kernels import Kernels
from pagedserve.ops.cpu_kernels.packing import int4_grid

INT4_GROUP = 32  # along the input dimension, as Q4_0/Q4_1 blocks


def low_dtype(weight: torch.Tensor) -> torch.dtype:
    """What torch's low-bit kernels compute in: bf16, also for a float32 model."""
    return torch.bfloat16 if weight.dtype == torch.float32 else weight.dtype


class Dense:
    """``y = x W^T + b`` on every step; the other kernels are Dense on their larger steps."""

    name = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias  # (out, in), (out,)

    def __call__(self, x: torch.Tensor, small_step: bool) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _biased(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias


class TorchInt4(Dense):
    """Small steps: torch's weight-only int4 kernel in bf16; larger ones: dense."""

    name = "torch int4"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor) -> None:
        """`w`: the weight in float32."""
        super().__init__(weight, bias)
        n, k = w.shape
        q, scale, lo = int4_grid(w)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.view(n, k).to(torch.int32), 1)
        # the kernel computes (q - 8) * scale + zero
        zeros = lo + 8 * scale
        self.scales_zeros = torch.stack([scale.t(), zeros.t()], -1).to(
            low_dtype(weight)).contiguous()

    def __call__(self, x: torch.Tensor, small_step: bool) -> torch.Tensor:
        if not small_step:
            return F.linear(x, self.weight, self.bias)
        y = torch._weight_int4pack_mm_for_cpu(x.to(low_dtype(self.weight)), self.packed,
                                              INT4_GROUP, self.scales_zeros)
        return self._biased(y.to(x.dtype))


class TorchInt8(Dense):
    """Small steps: torch's weight-only int8 kernel in bf16; larger ones: dense."""

    name = "torch int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor) -> None:
        super().__init__(weight, bias)
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
        self.q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.scale = scale.to(low_dtype(weight))

    def __call__(self, x: torch.Tensor, small_step: bool) -> torch.Tensor:
        if not small_step:
            return F.linear(x, self.weight, self.bias)
        y = torch._weight_int8pack_mm(x.to(low_dtype(self.weight)), self.q, self.scale)
        return self._biased(y.to(x.dtype))


class CpuTiles(Dense):
    """pagedserve's CPU kernels over Q4_1 (``bits`` 4) or Q8_0 (8) tiles: on small steps, and
    on every step of a float32 model; a bf16 model's larger steps stay dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor,
                 kernels: Kernels, bits: int) -> None:
        super().__init__(weight, bias)
        self.kernels, self.bits = kernels, bits
        self.tiles = kernels.pack(w) if bits == 4 else kernels.pack_q8(w)
        self.every_step = weight.dtype == torch.float32
        self.name = f"cpu-{'q4_1' if bits == 4 else 'q8_0'} {kernels.isa}"

    def __call__(self, x: torch.Tensor, small_step: bool) -> torch.Tensor:
        if not (small_step or self.every_step):
            return F.linear(x, self.weight, self.bias)
        if self.bits == 4:
            y = self.kernels.matmul(x, self.tiles)
        else:
            y = self.kernels.matmul_q8(x, self.tiles)
        return self._biased(y.to(x.dtype))


def pack_low_bit(weight: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 kernels: Kernels | None = None) -> Dense | None:
    """The kernel of a `bits`-bit copy of `weight` (4: int4 / Q4_1, 8: int8 / Q8_0), in the
    tiles of `kernels` where given and the shape fits them, else in torch's layouts; None
    where no copy fits (int4 needs the input dimension in whole groups of 32)."""
    w = weight.float()
    n, k = w.shape
    if kernels is not None and kernels.fits(n, k) and bits in (4, 8):
        return CpuTiles(weight, bias, w, kernels, bits)
    if bits == 4 and k % INT4_GROUP == 0:
        return TorchInt4(weight, bias, w)
    if bits == 8:
        return TorchInt8(weight, bias, w)
    return None
