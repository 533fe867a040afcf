"""BlockPool: exact free-queue order and reference counts."""

from __future__ import annotations

import pytest

from kvwise.cache.block_pool import BlockPool
from kvwise.errors import OutOfBlocksError


def test_initial_state() -> None:
    pool = BlockPool(4)
    assert pool.num_blocks == 4
    assert pool.num_free_blocks == 4
    assert pool.num_used_blocks == 0
    assert pool.free_block_ids() == [0, 1, 2, 3]
    pool.check_integrity()


def test_allocate_pops_head_with_refcount_one() -> None:
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(0) == []
    assert pool.allocate(1) == [2]
    assert [pool.ref_count(b) for b in range(5)] == [1, 1, 1, 0, 0]
    assert pool.free_block_ids() == [3, 4]
    assert pool.num_used_blocks == 3
    pool.check_integrity()


def test_release_appends_to_tail_in_given_order() -> None:
    pool = BlockPool(5)
    ids = pool.allocate(3)
    assert pool.decref(reversed(ids)) == [2, 1, 0]
    pool.release([2, 1, 0])
    assert pool.free_block_ids() == [3, 4, 2, 1, 0]
    assert pool.allocate(3) == [3, 4, 2]
    pool.check_integrity()


def test_incref_decref_and_shared_set() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    pool.incref([0, 0])
    assert pool.ref_count(0) == 3
    assert pool.multi_ref_ids() == {0}
    assert pool.decref([0, 1]) == [1]
    assert pool.ref_count(0) == 2 and pool.ref_count(1) == 0
    assert pool.decref([0]) == []
    assert pool.multi_ref_ids() == set()
    assert pool.decref([0]) == [0]
    assert pool.num_used_blocks == 0
    # Unreferenced but not released: "parked" (owned by the prefix tree), not free.
    assert pool.num_free_blocks == 1
    pool.incref([1])  # reuse of a parked block
    assert pool.ref_count(1) == 1
    pool.check_integrity()


def test_out_of_blocks_changes_nothing() -> None:
    pool = BlockPool(2)
    pool.allocate(1)
    with pytest.raises(OutOfBlocksError):
        pool.allocate(2)
    assert pool.free_block_ids() == [1]
    assert pool.num_used_blocks == 1
    pool.check_integrity()


def test_misuse_is_caught() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.decref([0])
    with pytest.raises(AssertionError):
        pool.incref([0])  # still in the free queue
    pool.allocate(1)
    with pytest.raises(AssertionError):
        pool.release([0])  # still referenced
    with pytest.raises(AssertionError):
        pool.release([1])  # already free
    with pytest.raises(ValueError):
        BlockPool(0)


def test_check_integrity_reports_corruption() -> None:
    pool = BlockPool(2)
    pool._ref_counts[0] = 1  # a free block with a reference
    with pytest.raises(AssertionError, match="free block 0"):
        pool.check_integrity()


def test_split_blocks_own_planes_and_return_with_the_last_one() -> None:
    pool = BlockPool(4, num_planes=3)
    assert pool.allocate(1) == [0]
    pool.split(0, [1, 2])  # its holder gave up plane 0
    assert (pool.num_used_blocks, pool.num_split_blocks, pool.num_free_planes) == (0, 1, 1)
    assert pool.owned_planes(0) == {1, 2} and pool.free_plane_block_ids(0) == [0]
    # A plane is taken from a split block first, else from a fresh block split for it.
    assert pool.allocate_plane(0) == 0
    assert pool.allocate_plane(0) == 1
    assert pool.owned_planes(1) == {0}
    assert [pool.free_plane_block_ids(p) for p in range(3)] == [[], [1], [1]]
    assert pool.allocate_plane(2) == 1
    assert pool.free_block_ids() == [2, 3]
    assert (pool.num_split_blocks, pool.num_free_planes, pool.num_owned_planes) == (2, 1, 5)
    pool.check_integrity()
    for plane in (1, 0, 2):
        pool.release_plane(0, plane)
    assert pool.free_block_ids() == [2, 3, 0]  # block 0 is free with its last plane
    assert [pool.free_plane_block_ids(p) for p in range(3)] == [[], [1], []]
    pool.release_plane(1, 2)
    assert [pool.free_plane_block_ids(p) for p in range(3)] == [[], [1], [1]]
    pool.check_integrity()
    assert pool.allocate(3) == [2, 3, 0]
    with pytest.raises(OutOfBlocksError):
        pool.allocate_plane(0)  # plane 0 of block 1 is owned and no block is free
    assert pool.allocate_plane(1) == 1
    pool.check_integrity()


def test_split_block_misuse_is_caught() -> None:
    pool = BlockPool(2, num_planes=2)
    pool.allocate(1)
    pool.incref([0])
    with pytest.raises(AssertionError, match="reference count 2"):
        pool.split(0, [1])  # a shared block is never split
    pool.decref([0])
    pool.split(0, [1])
    with pytest.raises(AssertionError):
        pool.incref([0])
    with pytest.raises(AssertionError):
        pool.release([0])
    with pytest.raises(AssertionError, match="not owned"):
        pool.release_plane(0, 0)
    pool._free_planes[0].clear()  # a free plane forgotten
    with pytest.raises(AssertionError, match="plane"):
        pool.check_integrity()
