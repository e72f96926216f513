"""One rank's share of a model under tensor parallelism: which rows or columns of each weight.

Megatron's split, as vLLM does it, for ``world_size`` ranks (rank r of N)::

    tensor                  split along        rank r holds
    q_proj (w, b)           rows (out)         query heads [r*nh/N, (r+1)*nh/N)
    k_proj, v_proj (w, b)   rows (out)         KV heads [r*nkv/N, (r+1)*nkv/N); when nkv < N,
                                               the one head r*nkv//N (replicated N/nkv times)
    o_proj                  columns (in)       the query heads' columns: its output is partial,
                                               summed over ranks (one all-reduce)
    gate_proj, up_proj      rows (out)         [r*I/N, (r+1)*I/N) of the intermediate size I
    down_proj               columns (in)       the same range: partial output, one all-reduce
    embed_tokens, lm_head   rows (vocab)       [r*ceil(V/N), min(V, (r+1)*ceil(V/N)))
    norms                   --                 everything (replicated)

Query head h reads KV head h // (nh/nkv); a rank's query heads all read its own KV heads
because nh/N query heads lie inside one group of nh/nkv when nkv < N (N a multiple of nkv),
and are exactly the groups of its nkv/N KV heads otherwise. So each rank's attention is whole
for its heads, and its paged KV cache holds only those heads, under the same block tables.

This module deals in integers and views; loaders slice each tensor as they read it (never the
whole model first), the model runs on the local shapes (:meth:`TensorShard.local_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pagedserve.config import EngineConfig, ModelConfig


@dataclass(frozen=True, slots=True)
class TensorShard:
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")

    def check(self, config: ModelConfig) -> None:
        """ValueError naming tensor_parallel_size where the model's shapes do not split."""
        n = self.world_size
        problems = []
        if config.num_heads % n:
            problems.append(f"{config.num_heads} attention heads")
        if config.num_kv_heads % n and n % config.num_kv_heads:
            problems.append(f"{config.num_kv_heads} KV heads (nor divides it)")
        if config.intermediate_size % n:
            problems.append(f"an intermediate size of {config.intermediate_size}")
        if problems:
            raise ValueError(f"tensor_parallel_size {n} does not divide the model's "
                             f"{', '.join(problems)}")

    # -- ranges, half-open -------------------------------------------------------------------
    def _split(self, total: int) -> tuple[int, int]:
        per = total // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def q_heads(self, config: ModelConfig) -> tuple[int, int]:
        return self._split(config.num_heads)

    def kv_heads(self, config: ModelConfig) -> tuple[int, int]:
        if config.num_kv_heads >= self.world_size:
            return self._split(config.num_kv_heads)
        head = self.rank * config.num_kv_heads // self.world_size
        return head, head + 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        per = self.vocab_per_rank(vocab_size)
        return min(vocab_size, self.rank * per), min(vocab_size, (self.rank + 1) * per)

    def vocab_per_rank(self, vocab_size: int) -> int:
        """Rows of the embedding each rank is sized for (the last may hold fewer)."""
        return -(-vocab_size // self.world_size)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shapes this rank computes with: its heads and intermediate columns (the vocab
        stays the model's: the LM head's gathered logits span it)."""
        q, kv = self.q_heads(config), self.kv_heads(config)
        return dataclasses.replace(config, num_heads=q[1] - q[0], num_kv_heads=kv[1] - kv[0],
                                   intermediate_size=config.intermediate_size // self.world_size)

    # -- tensors -----------------------------------------------------------------------------
    def slice_of(self, name: str, config: ModelConfig) -> tuple[int, int, int] | None:
        """(dim, start, stop) of weight `name` (a Hugging Face name) on this rank; None where
        every rank holds all of it."""
        hd = config.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return (0, *self.vocab(config.vocab_size))
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if module == "q_proj":
            lo, hi = self.q_heads(config)
            return 0, lo * hd, hi * hd
        if module in ("k_proj", "v_proj"):
            lo, hi = self.kv_heads(config)
            return 0, lo * hd, hi * hd
        if module == "o_proj":
            lo, hi = self.q_heads(config)
            return 1, lo * hd, hi * hd
        if module in ("gate_proj", "up_proj"):
            return (0, *self._split(config.intermediate_size))
        if module == "down_proj":
            return (1, *self._split(config.intermediate_size))
        return None

    def take(self, name: str, tensor: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """This rank's part of a whole tensor (a contiguous copy, so the whole can be freed)."""
        where = self.slice_of(name, config)
        if where is None:
            return tensor
        dim, lo, hi = where
        return tensor.narrow(dim, lo, hi - lo).contiguous()

    def shape_of(self, name: str, shape: tuple[int, ...], config: ModelConfig
                 ) -> tuple[int, ...]:
        where = self.slice_of(name, config)
        if where is None:
            return shape
        dim, lo, hi = where
        return (*shape[:dim], hi - lo, *shape[dim + 1:])


def tensor_parallel_config(config: EngineConfig) -> EngineConfig:
    """What an engine of several ranks runs: the torch path (the CPU kernels' native decoder and
    low-bit copies are single-process), eager (no CUDA graph captures the all-reduce yet),
    and no overlapped steps (a worker has no sampled ids on its device to feed from)."""
    if config.tensor_parallel_size == 1:
        return config
    return dataclasses.replace(config, native_kernels=False, low_bit_small_steps=False,
                               enforce_eager=True, async_scheduling=False)
