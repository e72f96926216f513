"""Paged attention in Triton: the CUDA backend, with the torch backend's signature.

Three kernels read and write the paged cache in place, through the block tables (no gathers):

    k_cache, v_cache   [num_blocks, block_size, nkv, hd]    one layer; block_size = 16
    q                  [T, nh, hd]   k, v  [T, nkv, hd]      rows as AttentionMetadata draws them
    block_tables       [B, max_blocks] int32                 slot_mapping [T] int32, -1 = padding
    seq_lens           [B] int32                             query_start_loc [B + 1] int32

    slot of position p of request i = block_tables[i, p // 16] * 16 + p % 16

1. ``_store_kv``: grid (T,). Row t copies k[t], v[t] (all KV heads) to its slot; slot -1 writes
   nothing, which is how padded rows of a CUDA-graph bucket stay harmless.
2. ``_decode``: one query per request, requests [0, D). Grid (D, nkv, S): a program takes one
   KV head and the G = nh / nkv query heads that share it (GQA: K/V are read once for all G),
   and one of S contiguous slices of the context (split-KV, so a long context uses many SMs):

       context  [0 ........ seq_len)  split s covers [s * w, min((s + 1) * w, seq_len)),
                                       w = seq_len / S rounded up to a multiple of BLOCK_N

   With S = 1 it writes the output; otherwise each slice writes its normalized partial output
   and its log-sum-exp (base 2), and ``_reduce`` (grid (D, nh)) weighs the S partials. An empty
   slice has lse -inf and weight 0; a request with seq_len 0 (padding) outputs 0. S depends only
   on host constants (batch size, max_seq_len), never on a step's lengths, so a CUDA graph
   captured at a bucket replays for any lengths.
3. ``_prefill``: requests [D, B), every chunk of the step in one launch. Grid
   (cdiv(max_query_len, BLOCK_M), B - D, nh): a tile of BLOCK_M query rows of one head
   attends to keys at positions [0, min(seq_len, last position of the tile + 1)) of the
   cache, which holds the cached prefix and, already stored, the chunk itself; the causal mask
   is key position <= query position.

Softmax runs online in float32 (exp2, the scale folded with log2 e). In float32 the dots use
IEEE precision (no TF32), so float32 runs can be compared exactly-greedy with transformers.
Loops never see an all-masked tile for a real query row, so no NaN arises; masked lanes load 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagedserve.ops.attention import AttentionBackend, AttentionDims, AttentionMetadata

BLOCK_N = 64  # keys per tile: four 16-token blocks, gathered per token through the table
PREFILL_BLOCK_M = 64  # query rows per prefill program
MIN_GROUP = 16  # tl.dot needs at least 16 rows: the query heads of a group are padded to it
MIN_SPLIT_TOKENS = 256  # no split-KV slice shorter than this
MAX_SPLITS = 64
LOG2E = 1.4426950408889634


@triton.jit
def _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
              stride_k_t, stride_k_h, stride_v_t, stride_v_h, stride_c_slot, stride_c_h,
              NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    if slot >= 0:  # -1: a padded row, written nowhere
        dst = slot * stride_c_slot + offs_h[:, None] * stride_c_h + offs_d[None, :]
        k = tl.load(k_ptr + t * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :],
                    mask=mask)
        tl.store(k_cache_ptr + dst, k, mask=mask)
        v = tl.load(v_ptr + t * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :],
                    mask=mask)
        tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _decode(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
            out_ptr, part_out_ptr, part_lse_ptr, scale_log2,
            stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
            stride_c_block, stride_c_slot, stride_c_h,
            NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
            BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    width = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * width
    end = tl.minimum(start + width, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h  # the query heads sharing this KV head
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + seq * stride_q_t + heads[:, None] * stride_q_h + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_H, BLOCK_D)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        kv = block * stride_c_block + (offs_n % PAGE) * stride_c_slot + kv_head * stride_c_h
        k = tl.load(k_cache_ptr + kv[None, :] + offs_d[:, None],
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_H, BLOCK_N)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    has_keys = lsum > 0
    out = acc / tl.where(has_keys, lsum, 1.0)[:, None]  # 0 where this slice saw no key
    o_mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_o_t + heads[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # partials: part_out (D, nh, S, hd) and part_lse (D, nh, S), float32, contiguous
        row = (seq * NUM_HEADS + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
        lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, lsum, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=h_mask)


@triton.jit
def _reduce(part_out_ptr, part_lse_ptr, out_ptr, stride_o_t, stride_o_h,
            NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # no slice saw a key: every weight is 0
    w = tl.exp2(lse - top)
    total = tl.sum(w, 0)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_t + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["first_request"])  # one compile whatever the decode count
def _prefill(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
             out_ptr, first_request, scale_log2,
             stride_q_t, stride_q_h, stride_o_t, stride_o_h, stride_bt,
             stride_c_block, stride_c_slot, stride_c_h,
             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_PRECISION: tl.constexpr):
    tile = tl.program_id(0)
    req = (first_request + tl.program_id(1)).to(tl.int64)
    head = tl.program_id(2)
    kv_head = head // GROUP
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    first_pos = seq_len - q_len  # position of the chunk's first token

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_q_t + head * stride_q_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    q_pos = first_pos + offs_m
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lsum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_end = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)  # past the tile's last query
    table = block_tables_ptr + req * stride_bt
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_end
        block = tl.load(table + offs_n // PAGE, mask=n_mask, other=0).to(tl.int64)
        kv = block * stride_c_block + (offs_n % PAGE) * stride_c_slot + kv_head * stride_c_h
        k = tl.load(k_cache_ptr + kv[None, :] + offs_d[:, None],
                    mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # (BLOCK_M, BLOCK_N)
        visible = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv[:, None] + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    out = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o_t + head * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# -- launchers ------------------------------------------------------------------------------


@dataclass(slots=True)
class TritonStep:
    num_splits: int  # split-KV slices per decode request
    part_out: torch.Tensor | None  # (D, nh, S, hd) float32 when S > 1, shared by all layers
    part_lse: torch.Tensor | None  # (D, nh, S) float32


_NUM_SMS: dict[int, int] = {}


def num_multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a token value, so that splitting is exercised
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def num_kv_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Slices per decode request: enough programs for two waves over the SMs, no slice
    shorter than MIN_SPLIT_TOKENS."""
    programs = max(1, num_decodes * num_kv_heads)
    wanted = -(-2 * num_sms // programs)
    longest = max(1, -(-max_seq_len // MIN_SPLIT_TOKENS))
    return max(1, min(wanted, longest, MAX_SPLITS))


def prepare(meta: AttentionMetadata, dims: AttentionDims, num_splits: int | None = None) -> None:
    """Split-KV scratch for the step's decodes, allocated once and shared by every layer."""
    D = meta.num_decodes
    if num_splits is None:
        num_splits = num_kv_splits(D, dims.num_kv_heads, meta.max_seq_len,
                                   num_multiprocessors(meta.seq_lens.device))
    part_out = part_lse = None
    if D and num_splits > 1:
        dev = meta.seq_lens.device
        part_out = torch.empty(D, dims.num_heads, num_splits, dims.head_dim, dtype=torch.float32,
                               device=dev)
        part_lse = torch.empty(D, dims.num_heads, num_splits, dtype=torch.float32, device=dev)
    meta.backend_state = TritonStep(num_splits, part_out, part_lse)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v (T, nkv, hd), last dim contiguous -> their slots of the caches; slot -1: skipped."""
    T, nkv, hd = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous()
    _store_kv[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=nkv, HEAD_DIM=hd, BLOCK_H=triton.next_power_of_2(nkv),
        BLOCK_D=triton.next_power_of_2(hd),
    )


def paged_attention(
    q: torch.Tensor,  # (T, nh, hd)
    k: torch.Tensor,  # (T, nkv, hd)
    v: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,  # (num_blocks, block_size, nkv, hd), contiguous
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    block_n: int = BLOCK_N,
) -> torch.Tensor:
    T, nh, hd = q.shape
    nkv = k.shape[1]
    store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(q)
    st: TritonStep = meta.backend_state
    page = k_cache.shape[1]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    scale_log2 = scale * LOG2E
    D = meta.num_decodes
    block_d = triton.next_power_of_2(hd)
    if D:
        group = nh // nkv
        S = st.num_splits
        _decode[(D, nkv, S)](
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, out,
            st.part_out if S > 1 else out, st.part_lse if S > 1 else out, scale_log2,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), meta.block_tables.stride(0),
            *cache_strides,
            NUM_HEADS=nh, GROUP=group, HEAD_DIM=hd,
            BLOCK_H=max(MIN_GROUP, triton.next_power_of_2(group)), BLOCK_D=block_d, PAGE=page,
            BLOCK_N=block_n, NUM_SPLITS=S, DOT_PRECISION=precision,
        )
        if S > 1:
            _reduce[(D, nh)](
                st.part_out, st.part_lse, out, out.stride(0), out.stride(1),
                NUM_HEADS=nh, HEAD_DIM=hd, BLOCK_D=block_d, NUM_SPLITS=S,
                BLOCK_S=triton.next_power_of_2(S),
            )
    num_prefills = meta.num_prefills
    if num_prefills:
        _prefill[(triton.cdiv(meta.max_query_len, PREFILL_BLOCK_M), num_prefills, nh)](
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out, D,
            scale_log2, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            meta.block_tables.stride(0), *cache_strides,
            GROUP=nh // nkv, HEAD_DIM=hd, BLOCK_D=block_d, PAGE=page,
            BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=block_n, DOT_PRECISION=precision,
        )
    return out


assert math.isclose(LOG2E, 1 / math.log(2))
TRITON_BACKEND = AttentionBackend("triton", prepare, paged_attention, supports_cuda_graphs=True)
