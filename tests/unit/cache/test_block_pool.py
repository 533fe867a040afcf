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
