"""The paged KV cache's allocator: fixed-size blocks, reference counts, prefix hashes, LRU eviction.

Integers only. The model runner owns the tensors; this module decides which block ids a request
writes to and reads from (its *block table*). Block ``b`` holds token slots
``[b * block_size, (b + 1) * block_size)`` of the pool, and position ``p`` of a request lives in
slot ``table[p // block_size] * block_size + p % block_size``.

A request's table covers its tokens in order; only its last block may be partly filled::

    positions   [0 ... 15] [16 ... 31] [32 ... 40)          block_size = 16
    table        b7         b2          b9 (9 of 16 used)

Prefix caching: when a block is full and its K/V written, it gets a hash chained from the hash of
the block before it and its own token ids, so equal hashes mean equal prefixes. A new request
walks its prompt's chain and shares every cached block (ref count + 1) instead of recomputing it.
A freed block keeps its hash and waits in the free queue; blocks are reused least-recently-freed
first, so popular prefixes survive. The free queue is an ordered dict: O(1) removal from the
middle when a cached block is hit again, O(1) pop of the oldest.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pagedserve.core.kv_cache_manager import KVUsage


def chain_hash(parent: int | None, tokens: Sequence[int]) -> int:
    return hash((parent, tuple(tokens)))


class BlockManager:
    """Paged KV allocator: blocks are handed out one at a time, wherever they are free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_cnt = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int]] = {}
        self._hashes: dict[str, list[int]] = {}  # chain hashes of the request's full blocks
        # positions the request's table was sized for: computed tokens plus this step's
        self._held: dict[str, int] = {}
        # Running totals, so usage() is O(1) and safe to read from another thread.
        self._table_slots = 0  # sum over requests of len(table) * block_size
        self._held_total = 0  # sum of _held
        self.prefix_queries = 0  # tokens looked up, cumulative
        self.prefix_hits = 0  # tokens found cached, cumulative

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def usage(self) -> KVUsage:
        num_free = len(self._free)
        reserved = (self.num_blocks - num_free) * self.block_size
        # Shared blocks are full, so all waste sits in each request's own tail blocks. (Read
        # from another thread mid-allocation the totals can lag the free count for a moment.)
        waste = max(0, min(reserved, self._table_slots - self._held_total))
        return KVUsage(self.num_blocks, num_free, reserved, reserved - waste)

    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids holding the longest cached prefix of ``token_ids``.

        At least one token is always left to compute: its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent: int | None = None
        for i in range((len(token_ids) - 1) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(parent, tokens)
            block = self._cached.get(h)
            if block is None or self._tokens[block] != tokens:
                break
            hits.append(block)
            parent = h
        return hits

    # -- changes -------------------------------------------------------------------------
    def allocate(
        self,
        request_id: str,
        num_tokens: int,
        cached_blocks: Sequence[int] = (),
    ) -> bool:
        """Make the request's table cover ``num_tokens`` positions; all or nothing.

        For a request without a table, ``cached_blocks`` (from :meth:`find_cached_prefix`)
        become its first blocks, shared with whoever else holds them.
        """
        table = self._tables.get(request_id)
        is_new = table is None
        if is_new:
            table = []
        elif cached_blocks:
            raise ValueError("cached_blocks are only for a request's first allocation")
        num_new = self.blocks_needed(num_tokens) - len(table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self._ref_cnt[b] == 0)
        if max(num_new, 0) + revived > len(self._free):
            return False
        for block in cached_blocks:
            if self._ref_cnt[block] == 0:
                del self._free[block]
            self._ref_cnt[block] += 1
            table.append(block)
        for _ in range(num_new):
            block, _ = self._free.popitem(last=False)
            self._evict(block)
            self._ref_cnt[block] = 1
            table.append(block)
        self._table_slots += (len(cached_blocks) + max(num_new, 0)) * self.block_size
        if is_new:
            self._tables[request_id] = table
            self._hashes[request_id] = []
            self._held[request_id] = 0
        # Slots being written in this step count as used: waste is what no token will fill.
        self._held_total += num_tokens - self._held[request_id]
        self._held[request_id] = num_tokens
        if is_new:
            if self.enable_prefix_caching:
                self._hashes[request_id] = [self._hash[b] for b in cached_blocks]  # type: ignore[misc]
        return True

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """The K/V of ``token_ids[:num_computed_tokens]`` are written: hash newly full blocks."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes[request_id]
        table = self._tables[request_id]
        bs = self.block_size
        for i in range(len(hashes), num_computed_tokens // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = chain_hash(hashes[-1] if hashes else None, tokens)
            hashes.append(h)
            block = table[i]
            if self._hash[block] is None and h not in self._cached:
                self._hash[block] = h
                self._tokens[block] = tokens
                self._cached[h] = block

    def free(self, request_id: str) -> None:
        """Release a finished, aborted or preempted request's blocks; a no-op if it has none.

        Blocks go to the free queue tail-first, so a request's last blocks (the least likely
        to be shared) are evicted before its first ones. Blocks with no hash go to the front:
        they cache nothing.
        """
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table is None:
            return
        self._held_total -= self._held.pop(request_id)
        self._table_slots -= len(table) * self.block_size
        for block in reversed(table):
            self._ref_cnt[block] -= 1
            if self._ref_cnt[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def _evict(self, block: int) -> None:
        h = self._hash[block]
        if h is not None:
            if self._cached.get(h) == block:
                del self._cached[h]
            self._hash[block] = None
            self._tokens[block] = None

    # -- checks --------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Every block is free or owned; ref counts equal the number of tables holding it."""
        owners = [0] * self.num_blocks
        for rid, table in self._tables.items():
            assert len(table) == len(set(table)), f"{rid} holds a block twice: {table}"
            for block in table:
                owners[block] += 1
        for block in range(self.num_blocks):
            assert self._ref_cnt[block] == owners[block], (
                f"block {block}: ref count {self._ref_cnt[block]} but {owners[block]} owners"
            )
            assert (block in self._free) == (owners[block] == 0), (
                f"block {block}: in free queue={block in self._free}, owners={owners[block]}"
            )
        assert self._table_slots == sum(len(t) for t in self._tables.values()) * self.block_size
        assert self._held_total == sum(self._held.values())
        for h, block in self._cached.items():
            assert self._hash[block] == h, f"cache maps hash to block {block} with another hash"
        for block, h in enumerate(self._hash):
            if h is not None:
                assert self._cached.get(h) == block, f"block {block} hashed but not in the map"

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and not self._tables
