"""The paged allocator and the static slots, with exact block ids; no model, no torch."""

import pytest

from pagedserve.core.block_manager import BlockManager
from pagedserve.core.static_slots import StaticSlotManager


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def test_allocate_hands_out_blocks_in_order_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    assert bm.allocate("a", 6)  # 2 blocks
    assert bm.block_table("a") == [0, 1]
    assert bm.allocate("b", 4)
    assert bm.block_table("b") == [2]
    assert bm.allocate("a", 9)  # grows by one block
    assert bm.block_table("a") == [0, 1, 3]
    assert bm.num_free_blocks == 4
    bm.check_integrity()
    bm.free("a")
    bm.free("b")
    assert bm.all_free()
    bm.check_integrity()


def test_allocation_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.allocate("a", 8)
    assert not bm.allocate("b", 8)  # needs 2, 1 free
    assert bm.block_table("b") == []
    assert bm.num_free_blocks == 1
    bm.check_integrity()


def test_only_the_last_block_is_partial_and_waste_is_reported():
    bm = BlockManager(num_blocks=16, block_size=16)
    assert bm.allocate("a", 40)
    bm.commit("a", tokens(40), 40)
    usage = bm.usage()
    assert usage.reserved_tokens == 48
    assert usage.used_tokens == 40
    assert usage.waste_tokens == 8
    assert usage.waste_perc == pytest.approx(20.0)


def test_prefix_hit_shares_full_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    prompt = tokens(10)
    assert bm.allocate("a", 10)
    bm.commit("a", prompt, 10)  # blocks 0, 1 full and hashed; block 2 holds 2 tokens
    hit = bm.find_cached_prefix(prompt + [99])
    assert hit == [0, 1]
    assert bm.allocate("b", 11, hit)
    bm.record_prefix_lookup(11, 8)
    assert bm.block_table("b") == [0, 1, 3]
    assert (bm.prefix_queries, bm.prefix_hits) == (11, 8)
    bm.check_integrity()
    bm.free("a")
    bm.check_integrity()
    assert bm.num_free_blocks == 10 - 3  # 0, 1 still held by b; 3 by b


def test_a_prefix_hit_always_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate("a", 8)
    bm.commit("a", tokens(8), 8)
    assert bm.find_cached_prefix(tokens(8)) == [0]  # not [0, 1]: the last token is recomputed


def test_different_prefixes_do_not_match_and_chains_depend_on_parents():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate("a", 9)
    bm.commit("a", tokens(9), 9)
    # same second block, different first block: no hit at all
    other = [100, 101, 102, 103] + tokens(5, 4)
    assert bm.find_cached_prefix(other) == []


def test_freed_blocks_stay_cached_until_evicted_lru_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    assert bm.allocate("a", 4)  # blocks 0, 1
    bm.commit("a", [1, 2, 3, 4], 4)
    assert bm.allocate("b", 4)  # blocks 2, 3
    bm.commit("b", [5, 6, 7, 8], 4)
    bm.free("a")  # free queue: 4, 5, then a's blocks tail first: 1, 0
    bm.free("b")  # then 3, 2
    bm.check_integrity()
    # a still hits its cached blocks after being freed
    assert bm.find_cached_prefix([1, 2, 3, 4, 0]) == [0, 1]
    # three new blocks: the two never-used ones first, then a's tail block (freed first)
    assert bm.allocate("c", 6)
    assert bm.block_table("c") == [4, 5, 1]
    assert bm.find_cached_prefix([1, 2, 3, 4, 0]) == [0]  # block 1 was evicted
    assert bm.find_cached_prefix([5, 6, 7, 8, 0]) == [2, 3]  # b's survive
    bm.check_integrity()


def test_reviving_a_cached_free_block_takes_it_off_the_free_queue():
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.allocate("a", 3)
    bm.commit("a", [1, 2, 3], 3)
    bm.free("a")
    hit = bm.find_cached_prefix([1, 2, 3])
    assert hit == [0]
    assert bm.allocate("b", 3, hit)
    assert bm.block_table("b")[0] == 0
    bm.check_integrity()
    bm.free("b")
    assert bm.all_free()


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    assert bm.allocate("a", 4)
    bm.commit("a", [1, 2, 3, 4], 4)  # blocks 0, 1 cached
    assert bm.allocate("b", 1)  # block 2, never full
    bm.free("a")
    bm.free("b")
    assert bm.allocate("c", 4)
    assert bm.block_table("c") == [2, 3]  # not the cached 1, 0


def test_static_slots_reserve_whole_slots():
    sm = StaticSlotManager(num_slots=2, slot_tokens=32, block_size=16)
    assert sm.num_blocks == 4
    assert sm.allocate("a", 5)
    assert sm.block_table("a") == [0, 1]
    assert sm.allocate("b", 1)
    assert sm.block_table("b") == [2, 3]
    assert not sm.allocate("c", 1)  # both slots taken
    assert not sm.can_ever_fit(33)
    sm.commit("a", tokens(5), 5)
    sm.commit("b", tokens(1), 1)
    usage = sm.usage()
    assert usage.reserved_tokens == 64  # both slots, reserved up front
    assert usage.used_tokens == 6
    sm.free("a")
    assert sm.allocate("c", 3)
    assert sm.block_table("c") == [0, 1]
    sm.check_integrity()
    sm.free("b")
    sm.free("c")
    assert sm.all_free()


def test_slots_being_written_this_step_count_as_used_not_wasted():
    bm = BlockManager(num_blocks=8, block_size=16)
    assert bm.allocate("a", 17)  # a 17-token prefill chunk is being computed
    usage = bm.usage()  # as a metrics scrape sees it mid-step, before commit
    assert (usage.reserved_tokens, usage.used_tokens) == (32, 17)
    bm.commit("a", tokens(17), 17)
    assert bm.usage().used_tokens == 17
    assert bm.allocate("a", 18)  # the next decode step: one more slot, no new block
    assert (bm.usage().reserved_tokens, bm.usage().used_tokens) == (32, 18)
    bm.free("a")
    assert bm.usage().used_tokens == 0
