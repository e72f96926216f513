"""Paged attention: the step's metadata every backend reads, and the plain-torch backend.

The cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``, the
layout a kernel reads through block tables. A step flattens the new tokens of its B requests into
T rows, one-token requests (decodes) first, and padding (CUDA graph buckets) last::

    rows     [0 ...... D) [chunk of request D) [chunk of request D+1) ... [padding ..... T)
              one query     prefill/extend chunks, any length              slot -1, seq_len 0
              per decode

    request i, 0 <= i < B (padding rows count as one-query requests):
      query rows   [query_start_loc[i], query_start_loc[i + 1])         q_len = the difference
      context      positions [0, seq_lens[i]); its new tokens are the last q_len of them, so
                   query row r sits at position seq_lens[i] - q_len + (r - query_start_loc[i])
                   and sees the keys at positions <= its own (causal)
      slot of position p = block_tables[i, p // block_size] * block_size + p % block_size

Invariants: a padded row has slot -1 (its K/V are written nowhere) and seq_len 0 (it reads
nothing; its output is 0), and padding only follows real rows. Block-table entries past a
request's last block are never read (any value). Every backend's K/V store runs before its
attention in the same layer, so a chunk reads its own fresh K/V back from the cache.

A backend is two functions behind :class:`AttentionBackend`: ``prepare(meta, dims)``, once per
step (what every layer can share: masks, flattened tables, scratch), and
``paged_attention(q, k, v, k_cache, v_cache, meta, scale)``, once per layer. This module is the
reference and the CPU path; ``attention_triton.py`` is the CUDA one; :mod:`pagedserve.ops.backends`
picks once at start-up (a backend imports this module, never the reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    # device tensors (views of the runner's persistent buffers)
    slot_mapping: torch.Tensor  # (T,) int32; -1 on padded rows
    query_start_loc: torch.Tensor  # (B + 1,) int32
    seq_lens: torch.Tensor  # (B,) int32: tokens of each request in the cache after this step
    block_tables: torch.Tensor  # (B, >= max blocks of any request) int32
    # host-side facts (Python ints): what grid sizes and the torch backend's slicing need
    num_decodes: int  # requests [0, D) have one query row each: rows [0, D)
    num_actual_tokens: int  # rows [0, num_actual_tokens) are real, the rest padding
    max_query_len: int
    max_seq_len: int  # for CUDA graphs: the longest a captured step may see
    query_start_loc_host: list[int] = field(default_factory=list)  # (B + 1,) as above
    seq_lens_host: list[int] = field(default_factory=list)  # (B,)
    block_size: int = 16
    backend_state: Any = None  # what the backend's prepare() derived for this step

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_prefills(self) -> int:
        return self.num_requests - self.num_decodes


@dataclass(slots=True)
class AttentionDims:
    num_heads: int
    num_kv_heads: int
    head_dim: int


class AttentionBackend(NamedTuple):
    name: str
    prepare: Callable[[AttentionMetadata, AttentionDims], None]
    paged_attention: Callable[..., torch.Tensor]
    supports_cuda_graphs: bool  # reads only device tensors and per-bucket constants


# -- the torch backend ----------------------------------------------------------------------


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first row of the chunk
    num_tokens: int
    context_len: int  # tokens of the request in the cache after this step
    block_table: torch.Tensor  # (cdiv(context_len, block_size),) long
    causal_mask: torch.Tensor | None  # (num_tokens, context_len) bool, None when no prefix


@dataclass(slots=True)
class TorchStep:
    slots: torch.Tensor  # (num_actual_tokens,) long: index_copy_ wants int64
    num_real_decodes: int  # decodes before the padding
    decode_blocks: torch.Tensor | None  # (Dr * W,) long: W blocks per real decode, flattened
    decode_mask: torch.Tensor | None  # (Dr, 1, 1, W * block_size) bool: False past the end
    prefills: list[PrefillChunk]


def prepare(meta: AttentionMetadata, dims: AttentionDims | None = None) -> None:
    """Masks and index tensors every layer shares, built once per step."""
    bs = meta.block_size
    qsl, lens = meta.query_start_loc_host, meta.seq_lens_host
    real_decodes = sum(1 for n in lens[: meta.num_decodes] if n > 0)
    decode_blocks = decode_mask = None
    if real_decodes:
        width = -(-max(lens[:real_decodes]) // bs)
        decode_blocks = meta.block_tables[:real_decodes, :width].long().flatten()
        key_pos = torch.arange(width * bs, device=meta.seq_lens.device)
        ends = meta.seq_lens[:real_decodes].unsqueeze(1)
        decode_mask = (key_pos.unsqueeze(0) < ends).view(real_decodes, 1, 1, width * bs)
    prefills = []
    for i in range(meta.num_decodes, meta.num_requests):
        start, n, end = qsl[i], qsl[i + 1] - qsl[i], lens[i]
        if end == 0:  # padding
            continue
        causal = None
        if end > n:  # query j sits at position end - n + j and sees keys 0 .. end - n + j
            causal = torch.ones(n, end, dtype=torch.bool, device=meta.seq_lens.device).tril(
                diagonal=end - n)
        table = meta.block_tables[i, : -(-end // bs)].long()
        prefills.append(PrefillChunk(start, n, end, table, causal))
    slots = meta.slot_mapping[: meta.num_actual_tokens].long()
    meta.backend_state = TorchStep(slots, real_decodes, decode_blocks, decode_mask, prefills)


def paged_attention(
    q: torch.Tensor,  # (T, nh, hd)
    k: torch.Tensor,  # (T, nkv, hd)
    v: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,  # (num_blocks, block_size, nkv, hd)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    st: TorchStep = meta.backend_state
    T, nh, hd = q.shape
    nkv = k.shape[1]
    n = meta.num_actual_tokens
    if k_cache.dtype != q.dtype:
        # a cache in another dtype (EngineConfig.kv_cache_dtype): rounded once as stored, and
        # a chunk without cached prefix attends to the rounded values too, as every later
        # read of the cache (and the native decoder) does
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_cache.view(-1, nkv, hd).index_copy_(0, st.slots, k[:n])
    v_cache.view(-1, nkv, hd).index_copy_(0, st.slots, v[:n])
    D = st.num_real_decodes
    if D == T and not st.prefills:  # decodes only, no padding: the common small step
        return _decode_attention(q, k_cache, v_cache, st, scale)
    out = torch.empty_like(q) if n == T and st.num_real_decodes == meta.num_decodes \
        else torch.zeros_like(q)  # padded rows read nothing: their output is 0
    if D:
        out[:D] = _decode_attention(q[:D], k_cache, v_cache, st, scale)
    for chunk in st.prefills:
        s, n = chunk.start, chunk.num_tokens
        if chunk.context_len == n:  # no cached prefix: the fresh K/V are the whole context
            keys, values = k[s : s + n], v[s : s + n]
        else:
            keys = k_cache.index_select(0, chunk.block_table).view(-1, nkv, hd)
            values = v_cache.index_select(0, chunk.block_table).view(-1, nkv, hd)
            keys, values = keys[: chunk.context_len], values[: chunk.context_len]
        out[s : s + n] = _prefill_attention(q[s : s + n], keys.to(q.dtype), values.to(q.dtype),
                                            chunk.causal_mask, scale)
    return out


def _decode_attention(q, k_cache, v_cache, st: TorchStep, scale: float):
    D, nh, hd = q.shape
    nkv = k_cache.shape[2]
    # index_select on the flattened tables is ~6x faster than k_cache[tables]; the gathered
    # (D, L, nkv, hd) is read in place as (D, nkv, L, hd) by SDPA's CPU kernel, where two
    # matmuls would first copy both transposes (at 64 sequences those copies were a quarter of
    # a decode step; SDPA is 2x faster at 64 rows, 4x at 16, and ahead at 1)
    keys = k_cache.index_select(0, st.decode_blocks).view(D, -1, nkv, hd).transpose(1, 2)
    values = v_cache.index_select(0, st.decode_blocks).view(D, -1, nkv, hd).transpose(1, 2)
    if keys.dtype != q.dtype:  # a float16 cache under a float32 model: SDPA wants one dtype
        keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.view(D, nh, 1, hd), keys, values,
        attn_mask=st.decode_mask,  # (D, 1, 1, L): False past each sequence's end
        scale=scale, enable_gqa=True,
    )
    return out.view(D, nh, hd)


def _prefill_attention(q, keys, values, causal_mask, scale: float):
    # q: (n, nh, hd); keys, values: (c, nkv, hd), the request's whole context so far
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),  # (nh, n, hd)
        keys.transpose(0, 1),  # (nkv, c, hd)
        values.transpose(0, 1),
        attn_mask=causal_mask,
        is_causal=causal_mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(0, 1)  # (n, nh, hd)


TORCH_BACKEND = AttentionBackend("torch", prepare, paged_attention, supports_cuda_graphs=False)
