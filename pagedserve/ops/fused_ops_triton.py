"""The decoder's fused elementwise ops in Triton: the CUDA path, one kernel per op.

Same functions and layouts as :mod:`pagedserve.ops.fused_ops` (the torch reference):

1. ``_add_rms_norm``: grid (T,). Row t reads x[t] (+ r[t]) in chunks of BLOCK columns twice:
   the first pass sums squares, the second writes x + r back into x (in place: each chunk is
   read before it is written) and the normed row into a new tensor in the model dtype.
   ``x * rsqrt(mean(x^2) + eps) * w`` in float32, as F.rms_norm computes it.
2. ``_rotary_qkv``: grid (T, cdiv(nh + nkv, BLOCK_H)). The q and k heads of a qkv row are
   adjacent, so a program takes BLOCK_H of the nh + nkv heads of token t as one tile:

       head h of the row, 0 <= h < nh + nkv:  h < nh -> q[t, h]      else -> k[t, h - nh]

   q and k are written contiguous; v is a view of qkv, nothing to compute.
3. ``_silu_mul``: grid (T, cdiv(I, BLOCK)): ``gate / (1 + exp(-gate)) * up``.

Every kernel loads in the tensors' dtype, computes in float32 and rounds once to the output
dtype. In float32 that is the reference's arithmetic (up to the order of the norm's sum and
the GPU's exp/rsqrt); in bf16/fp16 the rotary and SwiGLU results are more exact than the
reference, which rounds after every op. The launchers read shapes and strides only, never
tensor values, and allocate their outputs with torch.empty: safe inside a CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedserve.ops.fused_ops import DecoderOps

MAX_NORM_BLOCK = 8192  # a row up to this wide is one chunk (Llama 70B's hidden size)
SILU_BLOCK = 1024


@triton.jit
def _stream_chunk(x_row, r_row, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """x + residual over one chunk of a row, in float32 (the stream, as the next layer sees it)."""
    x = tl.load(x_row + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x += tl.load(r_row + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _add_rms_norm(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, eps,
                  HIDDEN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + t * stride_x
    r_row = r_ptr + t * stride_r
    squares = tl.zeros([BLOCK], tl.float32)
    for start in range(0, HIDDEN, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = _stream_chunk(x_row, r_row, offs, offs < HIDDEN, HAS_RESIDUAL)
        squares += x * x
    rstd = tl.rsqrt(tl.sum(squares, 0) / HIDDEN + eps)
    for start in range(0, HIDDEN, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < HIDDEN
        x = _stream_chunk(x_row, r_row, offs, mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(x_row + offs, x, mask=mask)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + t * stride_o + offs, (x * rstd * w).to(out_ptr.dtype.element_ty),
                 mask=mask)


@triton.jit
def _rotary_qkv(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, stride_qkv, stride_cos, stride_sin,
                NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # of the row's nh + nkv
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    cos = tl.load(cos_ptr + t * stride_cos + offs, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + t * stride_sin + offs, mask=d_mask, other=0.0).to(tl.float32)
    mask = (heads[:, None] < NUM_HEADS + NUM_KV_HEADS) & d_mask[None, :]
    src = qkv_ptr + t * stride_qkv + heads[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_H, BLOCK_HALF)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]

    is_q = heads < NUM_HEADS
    q_head = tl.where(is_q, heads, 0)  # masked lanes still get an address inside the tensor
    q_dst = q_ptr + t * (NUM_HEADS * HEAD_DIM) + q_head[:, None] * HEAD_DIM + offs[None, :]
    q_mask = mask & is_q[:, None]
    tl.store(q_dst, out1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF, out2.to(q_ptr.dtype.element_ty), mask=q_mask)
    k_head = tl.where(is_q, 0, heads - NUM_HEADS)
    k_dst = k_ptr + t * (NUM_KV_HEADS * HEAD_DIM) + k_head[:, None] * HEAD_DIM + offs[None, :]
    k_mask = mask & (heads >= NUM_HEADS)[:, None]
    tl.store(k_dst, out1.to(k_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_dst + HALF, out2.to(k_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, stride_in, stride_out,
              INTER: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    row = gate_up_ptr + t * stride_in
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------


def add_rms_norm(x: torch.Tensor, residual_in: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, out_dtype: torch.dtype,
                 block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x is updated in place to x + residual_in and returned with the normed rows."""
    T, H = x.shape
    r = x if residual_in is None else residual_in  # not read when None
    assert x.dtype == torch.float32 and x.stride(1) == 1 and r.stride(1) == 1
    assert weight.is_contiguous() and weight.shape == (H,)
    out = torch.empty((T, H), dtype=out_dtype, device=x.device)
    block = block or min(triton.next_power_of_2(H), MAX_NORM_BLOCK)
    _add_rms_norm[(T,)](
        x, r, weight, out, x.stride(0), r.stride(0), out.stride(0), eps,
        HIDDEN=H, HAS_RESIDUAL=residual_in is not None, BLOCK=block,
        num_warps=8 if block >= 2048 else 4,
    )
    return x, out


def rotary_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int,
               hd: int, block_h: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = qkv.shape[0]
    assert qkv.shape[1] == (nh + 2 * nkv) * hd and qkv.stride(1) == 1 and hd % 2 == 0
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and cos.shape[-1] == hd // 2
    q = torch.empty((T, nh, hd), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((T, nkv, hd), dtype=qkv.dtype, device=qkv.device)
    block_h = min(block_h, triton.next_power_of_2(nh + nkv))
    _rotary_qkv[(T, triton.cdiv(nh + nkv, block_h))](
        qkv, cos, sin, q, k, qkv.stride(0), cos.stride(0), sin.stride(0),
        NUM_HEADS=nh, NUM_KV_HEADS=nkv, HEAD_DIM=hd, HALF=hd // 2, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(hd // 2),
    )
    v = qkv[:, (nh + nkv) * hd:].view(T, nkv, hd)  # row stride (nh + 2 nkv) hd
    return q, k, v


def silu_mul(gate_up: torch.Tensor, block: int = SILU_BLOCK) -> torch.Tensor:
    T, two_i = gate_up.shape
    inter = two_i // 2
    assert gate_up.stride(1) == 1
    out = torch.empty((T, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(block, triton.next_power_of_2(inter))
    _silu_mul[(T, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), INTER=inter, BLOCK=block,
    )
    return out


TRITON_OPS = DecoderOps("triton", add_rms_norm, rotary_qkv, silu_mul)
