"""The static KV layout of Ollama and llama.cpp, as a second allocation policy.

``num_slots`` slots each reserve ``slot_tokens`` contiguous token positions up front, whatever
the request will use. A request takes a whole slot or waits; nothing is shared. It speaks the
same interface as :class:`~pagedserve.core.block_manager.BlockManager`, so the scheduler, the model
runner and the attention kernel are identical and a benchmark measures the layout alone::

    slot 0: blocks [0, B)   slot 1: blocks [B, 2B)   ...     B = ceil(slot_tokens / block_size)
"""

from __future__ import annotations

from collections.abc import Sequence

from pagedserve.core.kv_cache_manager import KVUsage


class StaticSlotManager:
    """A :class:`~pagedserve.core.kv_cache_manager.KVCacheManager` with one slot per request."""

    enable_prefix_caching = False  # a slot belongs to one request: nothing to share

    def __init__(self, num_slots: int, slot_tokens: int, block_size: int):
        if num_slots < 1 or slot_tokens < 1 or block_size < 1:
            raise ValueError("num_slots, slot_tokens and block_size must be >= 1")
        self.num_slots = num_slots
        self.slot_tokens = slot_tokens
        self.block_size = block_size
        self.blocks_per_slot = -(-slot_tokens // block_size)
        self.num_blocks = num_slots * self.blocks_per_slot
        self._free_slots = list(range(num_slots))
        self._slot: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._held_total = 0  # sum of _held: usage() stays O(1) and safe from another thread
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots * self.slot_tokens

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_slots) * self.blocks_per_slot

    def can_ever_fit(self, num_tokens: int) -> bool:
        return num_tokens <= self.slot_tokens

    def block_table(self, request_id: str) -> list[int]:
        slot = self._slot.get(request_id)
        if slot is None:
            return []
        first = slot * self.blocks_per_slot
        return list(range(first, first + self.blocks_per_slot))

    def usage(self) -> KVUsage:
        # Every slot's positions are reserved from start-up, busy or idle.
        return KVUsage(self.num_blocks, self.num_free_blocks, self.capacity_tokens,
                       self._held_total)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Nothing: a slot is never shared, so every prompt is computed whole."""
        return []

    def allocate(self, request_id: str, num_tokens: int, cached_blocks: Sequence[int] = ()) -> bool:
        if num_tokens > self.slot_tokens:
            return False
        if request_id not in self._slot:
            if not self._free_slots:
                return False
            self._slot[request_id] = self._free_slots.pop(0)
            self._held[request_id] = 0
        # positions in use: computed tokens plus those being written in this step
        self._held_total += num_tokens - self._held[request_id]
        self._held[request_id] = num_tokens
        return True

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Counted as the paged layout counts them, so the hit rate reads 0%, not "no data"."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Nothing to record: written positions are offered to no other request."""

    def free(self, request_id: str) -> None:
        slot = self._slot.pop(request_id, None)
        self._held_total -= self._held.pop(request_id, 0)
        if slot is not None:
            self._free_slots.append(slot)
            self._free_slots.sort()

    def check_integrity(self) -> None:
        taken = sorted(self._slot.values())
        assert len(taken) == len(set(taken)), f"a slot is held twice: {taken}"
        assert sorted(taken + self._free_slots) == list(range(self.num_slots)), (
            f"slots lost or duplicated: taken={taken} free={self._free_slots}"
        )
        assert self._held_total == sum(self._held.values())

    def all_free(self) -> bool:
        return len(self._free_slots) == self.num_slots
