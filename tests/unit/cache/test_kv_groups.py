"""KV groups: exact block ids, ref counts, free-queue order and plane ownership as groups evict.

block_size is 4 throughout: slots [0:4] are entry 0 of a group's table, etc. A row is
`block * 4 + offset`.
"""

from __future__ import annotations

import pytest

from kvwise.cache.kv_compaction import CopyPlan, plan_compaction
from kvwise.cache.kv_groups import plane_of_group
from kvwise.cache.kv_manager import KVManager
from kvwise.errors import OutOfBlocksError

S = 4


def refs(m: KVManager) -> list[int]:
    return [m.pool.ref_count(b) for b in range(m.num_blocks)]


def owned(m: KVManager) -> dict[int, list[int]]:
    return {b: sorted(m.pool.owned_planes(b)) for b in range(m.num_blocks) if m.pool.is_split(b)}


def free_planes(m: KVManager) -> list[list[int]]:
    return [m.pool.free_plane_block_ids(p) for p in range(m.num_planes)]


def snapshot(m: KVManager) -> tuple:
    return ({r: m.block_tables(r) for r in m._requests}, refs(m), owned(m), free_planes(m),
            m.pool.free_block_ids(), m.tree.evictable_block_ids(), m.stats())


def test_six_groups_evict_differently_then_compact_grow_and_free() -> None:
    """L*K = 6 groups over 3 private blocks: group 0 evicts block 1's tokens, group 5 all but
    the last token; their planes are freed, reused by the next allocation, and all returns."""
    m = KVManager(8, S, enable_prefix_caching=False, num_planes=6)
    tokens = list(range(1, 11))
    assert m.start_request("a", tokens, num_groups=6) == 0
    assert m.allocate("a", 10) == [0, 1, 2]
    m.commit("a", tokens, 10)
    assert m.block_tables("a") == [[0, 1, 2]] * 6  # one shared table until the first eviction
    assert m._requests["a"].groups is None

    m.evict("a", 0, range(4, 8))
    assert m.num_slots("a", 0) == 10 and m.num_kept_tokens("a", 0) == 6
    assert m.evicted_slots("a", 0) == [4, 5, 6, 7]
    plan = m.compact("a", 0)  # block 2 moves up a whole entry: nothing to copy
    assert plan == CopyPlan(group=0, plane=0, copies=[], freed_block_ids=[1], new_block_ids=[],
                            num_kept_tokens=6)
    m.check_integrity()
    assert owned(m) == {1: [1, 2, 3, 4, 5]}  # the private block split: plane 0 is free
    assert free_planes(m) == [[1], [], [], [], [], []]

    m.evict("a", 5, range(9))
    plan = m.compact("a", 5)  # slot 9 (block 2, offset 1) -> block 0, offset 0
    assert plan == CopyPlan(group=5, plane=5, copies=[(9, 0)], freed_block_ids=[1, 2],
                            new_block_ids=[], num_kept_tokens=1)
    m.check_integrity()
    assert m.block_tables("a") == [[0, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0]]
    assert refs(m) == [1, 0, 0, 0, 0, 0, 0, 0]  # block 0 is still private; 1 and 2 are split
    assert owned(m) == {1: [1, 2, 3, 4], 2: [0, 1, 2, 3, 4]}
    assert free_planes(m) == [[1], [], [], [], [], [2, 1]]  # dropped tail first
    assert m.pool.free_block_ids() == [3, 4, 5, 6, 7]
    s = m.stats()
    assert (s["num_blocks_used"], s["num_blocks_split"], s["num_blocks_free"]) == (1, 2, 5)
    assert (s["num_planes_free"], s["num_planes_used"], s["peak_planes_used"]) == (3, 15, 18)
    assert m.num_planes_held("a") == 6 + 1 + 4 * 2 + 0
    with pytest.raises(ValueError, match="block_tables"):
        m.block_table("a")

    tokens += [11, 12, 13]
    assert m.allocate("a", 13) == [1, 3]  # group 0 reuses plane 0 of block 1; 1-4 split block 3
    m.commit("a", tokens, 13)
    m.check_integrity()
    assert [m.num_slots("a", g) for g in range(6)] == [9, 13, 13, 13, 13, 4]
    assert m.block_tables("a")[0] == [0, 2, 1] and m.block_tables("a")[5] == [0]
    assert owned(m) == {1: [0, 1, 2, 3, 4], 2: [0, 1, 2, 3, 4], 3: [1, 2, 3, 4]}
    assert free_planes(m) == [[3], [], [], [], [], [2, 1, 3]]

    m.free("a")  # planes group by group (a split block is free with its last plane), then 0
    m.check_integrity()
    assert m.pool.free_block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]
    assert (m.stats()["num_blocks_split"], m.pool.num_free_planes) == (0, 0)


def test_prefix_hit_request_compresses_without_touching_the_shared_chunks() -> None:
    m = KVManager(8, S, num_planes=2)
    a = list(range(1, 10))  # chunks in blocks 0, 1; private tail 2
    m.start_request("a", a)
    m.allocate("a", 9)
    m.commit("a", a, 9)
    b = list(range(1, 9)) + [50, 51, 52]
    assert m.start_request("b", b, num_groups=2) == 8
    assert m.allocate("b", 11) == [3]
    m.commit("b", b, 11)
    assert refs(m)[:4] == [2, 2, 1, 1] and m.shared_block_ids() == {0, 1}

    m.evict("b", 0, range(4))  # group 0 drops chunk 0: chunk 1 and the tail shift by an entry
    assert m.compact("b", 0) == CopyPlan(0, 0, [], [0], [], 7)
    m.evict("b", 1, range(4))
    assert m.compact("b", 1) == CopyPlan(1, 1, [], [0], [], 7)
    m.check_integrity()
    assert m.block_tables("b") == [[1, 3], [1, 3]]
    # No group lists chunk 0 any more, but chunk 1 (its child) is used: b keeps both.
    assert refs(m)[:4] == [2, 2, 1, 1]

    m.evict("b", 0, [1])  # a token of shared chunk 1: the kept ones are copied out, not moved
    assert m.can_compact("b", 0)
    assert m.compact("b", 0) == CopyPlan(
        group=0, plane=0, copies=[(4, 12), (6, 13), (7, 14), (12, 15), (13, 16), (14, 17)],
        freed_block_ids=[1], new_block_ids=[4], num_kept_tokens=6)
    m.check_integrity()
    assert m.block_tables("b") == [[3, 4], [1, 3]]
    assert owned(m) == {4: [0]} and free_planes(m) == [[], [4]]
    assert refs(m)[:4] == [2, 2, 1, 1]

    m.evict("b", 1, range(4))  # the last use of chunk 1: b releases 1, then 0
    assert m.compact("b", 1) == CopyPlan(1, 1, [], [1], [], 3)
    m.check_integrity()
    assert refs(m)[:4] == [1, 1, 1, 1] and m.shared_block_ids() == set()
    assert m.tree.evictable_block_ids() == []  # a still holds them

    b += [53, 54]
    assert m.allocate("b", 13) == [4]  # group 1 takes the free plane 1 of block 4
    m.commit("b", b, 13)
    assert len(m.tree) == 2  # nothing committed after the first eviction
    assert m.match_prefix(b + [1]) == 8
    m.free("b")
    m.check_integrity()
    assert refs(m) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert m.pool.free_block_ids() == [5, 6, 7, 4, 3]
    m.free("a")
    m.check_integrity()
    assert m.tree.evictable_block_ids() == [1, 0]
    assert m.pool.free_block_ids() == [5, 6, 7, 4, 3, 2]


def test_one_group_request_streams_and_frees_whole_blocks() -> None:
    """A dense (one-group) request evicting like StreamingLLM: 2 sinks + a window of 4."""
    m = KVManager(6, S, enable_prefix_caching=False, num_planes=6)
    tokens = list(range(1, 15))
    m.start_request("a", tokens)
    assert m.allocate("a", 14) == [0, 1, 2, 3]
    m.commit("a", tokens, 14)
    m.evict("a", 0, range(2, 10))
    # New slots 0-3 are old 0, 1, 10, 11: block 0 keeps the sinks in place and takes rows 10,
    # 11 of block 2; block 3 (old slots 12, 13) moves up a whole entry untouched.
    assert m.compact("a", 0) == CopyPlan(0, None, [(10, 2), (11, 3)], [1, 2], [], 6)
    m.check_integrity()
    assert m.block_table("a") == [0, 3]
    assert m.pool.free_block_ids() == [4, 5, 2, 1]
    assert refs(m) == [1, 0, 0, 1, 0, 0]
    assert (m.num_slots("a", 0), m.stats()["num_blocks_split"]) == (6, 0)
    assert m.allocate("a", 16) == []  # slots 6, 7 fit block 3
    assert m.allocate("a", 17) == [4]
    m.commit("a", tokens + [15, 16, 17], 17)
    m.check_integrity()
    assert m.block_table("a") == [0, 3, 4]
    m.free("a")
    assert m.pool.free_block_ids() == [5, 2, 1, 4, 3, 0]
    m.check_integrity()


def test_first_eviction_ends_the_requests_in_flight_claims() -> None:
    m = KVManager(8, S, num_planes=2)
    p = list(range(1, 14))  # 3 full chunks + 1
    m.start_request("a", p, num_groups=2)
    m.allocate("a", 4)
    m.commit("a", p, 4)  # chunk 0 committed; chunks 1, 2 in flight
    assert m.prefix_in_flight(p)
    m.evict("a", 1, [0])
    m.check_integrity()
    assert not m.prefix_in_flight(p)  # a never commits them now: nobody waits for it
    m.allocate("a", 13)
    m.commit("a", p, 13)
    assert len(m.tree) == 1
    assert m.match_prefix(p) == 4


def test_trailing_adopted_chunk_is_released_at_the_first_eviction() -> None:
    m = KVManager(6, S, num_planes=2)
    p = list(range(1, 9))  # two chunks
    m.start_request("a", p)
    m.allocate("a", 8)
    m.commit("a", p, 8)
    m.free("a")
    assert m.start_request("b", p, num_groups=2) == 4  # chunk 1 recomputed into block 2
    assert m.allocate("b", 8) == [2]
    m.commit("b", p, 8)  # b adopts block 1
    assert refs(m)[:3] == [1, 1, 1]
    m.evict("b", 0, [4])  # nothing deeper anchors the adopted chunk: b lets it go
    m.check_integrity()
    assert refs(m)[:3] == [1, 0, 1] and m.tree.evictable_block_ids() == [1]
    # slot 4 is row 8 of the private copy (block 2): rows 9-11 move down by one
    assert m.compact("b", 0) == CopyPlan(0, 0, [(9, 8), (10, 9), (11, 10)], [], [], 7)
    m.check_integrity()
    m.free("b")
    m.check_integrity()
    assert m.tree.evictable_block_ids() == [1, 0]


def test_compaction_that_finds_no_block_changes_nothing() -> None:
    m = KVManager(3, S, num_planes=2)
    a = list(range(1, 9))
    m.start_request("a", a)
    m.allocate("a", 8)
    m.commit("a", a, 8)
    m.start_request("b", a + [9], num_groups=2)
    assert m.allocate("b", 9) == [2]
    m.commit("b", a + [9], 9)
    m.evict("b", 0, [0])  # copies 8 tokens out of the shared chunks: needs a second entry
    before = snapshot(m)
    assert not m.can_compact("b", 0)
    with pytest.raises(OutOfBlocksError):
        m.compact("b", 0)
    assert snapshot(m) == before
    m.check_integrity()
    m.free("a")  # nothing frees: b holds both chunks
    assert not m.can_compact("b", 0)
    m.free("b")
    m.check_integrity()


def test_dense_requests_never_fork_and_compact_without_evictions_is_empty() -> None:
    m = KVManager(8, S, num_planes=6)
    t = list(range(1, 10))
    m.start_request("a", t)
    m.allocate("a", 9)
    m.commit("a", t, 9)
    assert m.compact("a", 0) == CopyPlan(0, None, [], [], [], 9)
    m.evict("a", 0, [])
    assert m._requests["a"].groups is None and m.block_tables("a") == [[0, 1, 2]]
    assert m.stats()["num_planes_used"] == 18 and m.num_planes_held("a") == 18


def test_bad_eviction_and_groups_are_refused_without_change() -> None:
    m = KVManager(8, S, num_planes=6)
    t = list(range(1, 6))
    with pytest.raises(ValueError, match="num_groups"):
        m.start_request("x", t, num_groups=3)
    m.start_request("a", t, num_groups=6)
    m.allocate("a", 5)
    m.commit("a", t, 4)  # slot 4 allocated, not computed
    for slots in ([4], [-1], [0, 9]):
        with pytest.raises(ValueError, match="cannot evict"):
            m.evict("a", 2, slots)
    assert m._requests["a"].groups is None  # nothing forked
    with pytest.raises(ValueError, match="group 6"):
        m.evict("a", 6, [0])
    m.evict("a", 2, [0])
    with pytest.raises(ValueError, match="cannot evict"):
        m.evict("a", 2, [0])  # already evicted
    m.check_integrity()
    assert plane_of_group(5, num_kv_heads=3) == (1, 2)


def test_plan_keeps_pending_slots_and_prefers_blocks_already_holding_the_rows() -> None:
    # Slots 0-9 computed, 10 and 11 only allocated; slots 1, 2 evicted. New slot 0 <- 0,
    # 1..7 <- 3..9, 8 and 9 pending. Entry 0 stays in block 5 (it holds slot 0 at offset 0
    # already); entries 1, 2 take the next writable blocks; pending slots need no copy.
    plan = plan_compaction([5, 7, 9], {1, 2}, num_slots=12, num_done=10, block_size=S,
                           writable=lambda b: True)
    assert plan.new_table == [5, 7, 9]
    assert plan.moves == [(23, 0, 1), (28, 0, 2), (29, 0, 3), (30, 1, 0), (31, 1, 1),
                          (36, 1, 2), (37, 1, 3)]
    assert plan.dropped == [] and plan.num_evicted == 2
    # A shared (read-only) first entry whose kept rows shift is copied out, never written.
    plan = plan_compaction([5, 7], {0}, num_slots=8, num_done=8, block_size=S,
                           writable=lambda b: b != 5)
    assert plan.new_table == [7, None] and plan.num_new == 1
    assert plan.moves == [(21, 0, 0), (22, 0, 1), (23, 0, 2), (28, 0, 3), (29, 1, 0),
                          (30, 1, 1), (31, 1, 2)]
    assert plan.dropped == [5]


def test_check_integrity_catches_a_leaked_plane() -> None:
    m = KVManager(4, S, enable_prefix_caching=False, num_planes=2)
    t = list(range(1, 6))
    m.start_request("a", t, num_groups=2)
    m.allocate("a", 5)
    m.commit("a", t, 5)
    m.evict("a", 0, [4])
    m.compact("a", 0)  # block 1 split: group 1 owns plane 1
    m.check_integrity()
    m._requests["a"].groups.tables[1].pop()  # a group forgets a plane it owns
    with pytest.raises(AssertionError):
        m.check_integrity()
