"""Paged attention in plain torch: the reference backend, used on CPU.

The cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``
(the layout a CUDA kernel reads through block tables). Each step:

1. the new tokens' K/V are written at their slots (``slot_mapping``);
2. decode tokens (one query each) attend over their request's blocks, all in one batched
   matmul, keys past each request's context length masked;
3. each prefill chunk attends causally over its request's cached prefix plus itself.

The flattened tokens of a step are ordered decodes first::

    tokens  [0 ........ num_decodes) [chunk 0) [chunk 1) ...
             one per decoding request  prefill chunks, one per request
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    start: int  # first token of the chunk in the flattened step
    num_tokens: int
    context_len: int  # tokens of the request in the cache after this step
    block_table: torch.Tensor  # (num_blocks_of_request,) long
    causal_mask: torch.Tensor | None  # (num_tokens, context_len) bool, None when no prefix


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) long: slot of each new token's K/V
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # (D, max_blocks) long, padded with 0
    decode_mask: torch.Tensor | None = None  # (D, 1, 1, max_blocks * block_size) additive
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # (T, nh, hd)
    k: torch.Tensor,  # (T, nkv, hd)
    v: torch.Tensor,  # (T, nkv, hd)
    k_cache: torch.Tensor,  # (num_blocks, block_size, nkv, hd)
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    T, nh, hd = q.shape
    nkv = k.shape[1]
    k_cache.view(-1, nkv, hd).index_copy_(0, meta.slot_mapping, k)
    v_cache.view(-1, nkv, hd).index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    D = meta.num_decodes
    if D:
        out[:D] = _decode_attention(q[:D], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        s, n = chunk.start, chunk.num_tokens
        if chunk.context_len == n:  # no cached prefix: the fresh K/V are the whole context
            keys, values = k[s : s + n], v[s : s + n]
        else:
            keys = k_cache.index_select(0, chunk.block_table).view(-1, nkv, hd)
            values = v_cache.index_select(0, chunk.block_table).view(-1, nkv, hd)
            keys, values = keys[: chunk.context_len], values[: chunk.context_len]
        out[s : s + n] = _prefill_attention(q[s : s + n], keys, values, chunk.causal_mask, scale)
    return out


def _decode_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    D, nh, hd = q.shape
    nkv = k_cache.shape[2]
    blocks = meta.decode_block_tables.flatten()  # index_select is ~6x faster than k_cache[tables]
    keys = k_cache.index_select(0, blocks).view(D, -1, nkv, hd).transpose(1, 2)  # (D, nkv, L, hd)
    values = v_cache.index_select(0, blocks).view(D, -1, nkv, hd).transpose(1, 2)
    qg = q.view(D, nkv, nh // nkv, hd)  # (D, nkv, g, hd): query heads grouped by KV head
    scores = torch.matmul(qg, keys.transpose(2, 3)).float() * scale  # (D, nkv, g, L)
    probs = torch.softmax(scores + meta.decode_mask, dim=-1).to(q.dtype)
    out = torch.matmul(probs, values)  # (D, nkv, g, hd)
    return out.reshape(D, nh, hd)


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
