"""The elementwise work of a decoder layer between its matmuls, as three fused ops.

A layer runs four matmuls and attention; around them sit the norms, the residual adds, the
rotary embedding and the SwiGLU product. In plain torch those are ~25 small kernels per layer;
:mod:`pagedserve.ops.fused_ops_triton` does each op below in one kernel, which took a one-sequence
decode step of the Llama-3.1-8B shape on an H100 from 7.9 to 6.7 ms (docs/performance.md). The functions here are the torch reference, and the CPU path: the very
ops the model ran before they were fused, with the same numerics.

    add_rms_norm(x, r, w, eps, dtype) -> (x + r, rms_norm(x + r) * w in dtype)
        x (T, H) float32: the residual stream, without r yet
        r (T, H) model dtype: the output of the sublayer before this norm; None before layer 0
        w (H,) float32
      The residual add of one sublayer is done by the next norm (vLLM's pattern): a decoder
      layer returns (x, r) and the next layer's input norm, or the model's final norm, adds r.
      The returned stream may be x itself, updated in place: use the returned tensor.

    rotary_qkv(qkv, cos, sin, nh, nkv, hd) -> q (T, nh, hd), k (T, nkv, hd), v (T, nkv, hd)
        qkv (T, (nh + 2 nkv) hd), a row as the fused projection writes it:
            [ q head 0 | ... | q head nh-1 | k head 0 | ... | k head nkv-1 | v head 0 | ... ]
            each head is hd values, two halves [x1 | x2] of hd/2
        cos, sin (T, 1, hd/2) in the model dtype
      q and k are rotated the Hugging Face way, [x1 cos - x2 sin | x2 cos + x1 sin]; v is a view
      of qkv. All three have unit stride in the last dim, which both attention backends need.

    silu_mul(gate_up) -> silu(gate) * up
        gate_up (T, 2I) = [gate | up]  ->  (T, I)

:func:`pagedserve.ops.backends.select_ops` turns the execution plan's choice into the torch or the
Triton ops when the model is built (the Triton module imports this one, never the reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class DecoderOps(NamedTuple):
    name: str
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_mul: Callable[[torch.Tensor], torch.Tensor]


def add_rms_norm(x: torch.Tensor, residual_in: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if residual_in is not None:
        x = x + residual_in  # float32 + model dtype: the stream stays float32
    return x, F.rms_norm(x, weight.shape, weight, eps).to(out_dtype)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (T, heads, hd); cos, sin: (T, 1, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int,
               hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    qk, v = qkv.split([(nh + nkv) * hd, nkv * hd], dim=-1)
    # q and k heads sit side by side in a row: one rotation for both (half the ops of two)
    qk = rotate_halves(qk.view(T, nh + nkv, hd), cos, sin)  # (T, nh + nkv, hd)
    q, k = qk.split([nh, nkv], dim=1)  # views; rows of hd stay contiguous
    return q, k, v.reshape(T, nkv, hd)  # a view: the split keeps rows of hd contiguous


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


TORCH_OPS = DecoderOps("torch", add_rms_norm, rotary_qkv, silu_mul)
