"""The contract between the scheduler and a KV cache layout: which token slots a request may write
and read, and what is held. Integers only.

Two layouts implement it: :class:`~pagedserve.core.block_manager.BlockManager` (vLLM's paged blocks,
shared prefixes) and :class:`~pagedserve.core.static_slots.StaticSlotManager` (Ollama's and
llama.cpp's slot per request). The scheduler, the model runner and the attention kernels see only
this, so a benchmark of the two measures the layout alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class KVUsage:
    """Occupancy of a KV cache, in token slots."""

    num_blocks: int
    num_free_blocks: int
    reserved_tokens: int  # slots set aside for running requests
    used_tokens: int  # slots that hold a computed token

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0

    @property
    def waste_tokens(self) -> int:
        return self.reserved_tokens - self.used_tokens

    @property
    def waste_perc(self) -> float:
        """Reserved-but-unused slots as a percentage of the used ones (vLLM's '<4%' figure)."""
        return 100.0 * self.waste_tokens / self.used_tokens if self.used_tokens else 0.0


class KVCacheManager(Protocol):
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool
    prefix_queries: int  # prompt tokens looked up in the prefix cache
    prefix_hits: int  # of those, tokens found

    @property
    def capacity_tokens(self) -> int:
        """Token positions the cache can ever hold at once."""

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds now."""

    def can_ever_fit(self, num_tokens: int) -> bool:
        """Whether a request of `num_tokens` could be admitted on an otherwise empty cache."""

    def block_table(self, request_id: str) -> list[int]:
        """The blocks a request reads and writes, in position order ([] if it holds none)."""

    def usage(self) -> KVUsage:
        """Occupancy now, for metrics; safe to read from another thread."""

    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Blocks already holding a prefix of `token_ids` (full blocks only), to share."""

    def allocate(self, request_id: str, num_tokens: int,
                 cached_blocks: Sequence[int] = ()) -> bool:
        """Hold room for the request's first `num_tokens` positions (taking `cached_blocks`
        for its prefix); False, holding nothing new, when there is no room."""

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admission's prefix-cache lookup (the hit rate's numerator and
        denominator)."""

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """The first `num_computed_tokens` of `token_ids` now have K and V written: full blocks
        may be offered to later requests."""

    def free(self, request_id: str) -> None:
        """Release everything the request holds; a no-op if it holds nothing."""

    def check_integrity(self) -> None:
        """Assert the bookkeeping is consistent (tests, and the soak's end)."""

    def all_free(self) -> bool:
        """Whether no request holds anything (a drained engine leaks nothing)."""
