"""Hidden states -> one vector per text: pooling, Matryoshka truncation, unit length.

Every embedding model ends the same way; only the pooling differs by model:

- ``mean``: the average of every token's hidden state, special tokens included
  (sentence-transformers' ``pooling_mode_mean_tokens``, llama.cpp's ``MEAN``);
- ``cls``: the first token's (BERT's [CLS]; bge);
- ``last``: the last token's (decoder models, which see the whole text only there).

Sequences arrive packed, as the encoder computes them: the tokens of B texts in one (N, H)
tensor, text i in rows ``[cu_seqlens[i], cu_seqlens[i + 1])``::

    rows   [0 ...... n0) [n0 ...... n0+n1) ... [cu[B-1] ...... N)
            text 0         text 1                text B-1
    cls row of text i  = cu_seqlens[i]
    last row of text i = cu_seqlens[i + 1] - 1
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

from pagedserve.embedding_inputs import check_dimensions

PoolingType = Literal["mean", "cls", "last"]
POOLING_TYPES: tuple[str, ...] = get_args(PoolingType)

# llama.cpp's `<arch>.pooling_type` values (gguf.PoolingType); NONE (per-token) and RANK
# (rerankers) give no single embedding per text and are not served here
GGUF_POOLING = {1: "mean", 2: "cls", 3: "last"}


def check_pooling(pooling: str) -> PoolingType:
    if pooling not in POOLING_TYPES:
        raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}, got {pooling!r}")
    return pooling  # type: ignore[return-value]


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, pooling: PoolingType) -> torch.Tensor:
    """hidden (N, H) packed rows, cu_seqlens (B + 1,) int64 -> (B, H) float32."""
    cu_seqlens = cu_seqlens.to(hidden.device)
    starts, ends = cu_seqlens[:-1], cu_seqlens[1:]
    if pooling == "cls":
        return hidden.index_select(0, starts).float()
    if pooling == "last":
        return hidden.index_select(0, ends - 1).float()
    lengths = ends - starts  # (B,)
    # (N,) the text of each row
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    sums = torch.zeros(len(lengths), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, owner, hidden.float())
    return sums / lengths.float().unsqueeze(1)


def finish(embeddings: torch.Tensor, normalize: bool, dimensions: int | None = None
           ) -> torch.Tensor:
    """(B, H) -> (B, dimensions or H): the first `dimensions` components (Matryoshka models
    such as nomic-embed-text v1.5 are trained so that a prefix is itself an embedding), then
    unit length when `normalize` (after the cut, so that a truncated vector is unit length
    too, as Ollama's /api/embed returns it)."""
    if dimensions is not None:
        check_dimensions(dimensions, embeddings.shape[1])
        embeddings = embeddings[:, :dimensions]
    if normalize:
        embeddings = F.normalize(embeddings, p=2.0, dim=1)
    return embeddings
