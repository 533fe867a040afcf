"""PrefixTree: chained hashes, LRU order, pins, leaf-first eviction."""

from __future__ import annotations

import pytest

from kvwise.cache.prefix_tree import PrefixTree, chunk_hash, iter_chunk_hashes, root_hash


def test_hash_chain_depends_on_prefix_tokens_and_salt() -> None:
    a = list(iter_chunk_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4, None, 2))
    b = list(iter_chunk_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4, None, 2))
    assert len(a) == 2 and all(len(h) == 32 for h in a)
    assert a[1] != b[1]  # same chunk tokens, different prefix
    assert a[0] == chunk_hash(root_hash(), [1, 2, 3, 4])
    assert a[1] == chunk_hash(a[0], [5, 6, 7, 8])
    salted = list(iter_chunk_hashes([1, 2, 3, 4], 4, "tenant-a", 1))
    assert salted[0] != a[0]
    assert salted == list(iter_chunk_hashes([1, 2, 3, 4], 4, "tenant-a", 1))
    assert root_hash("x") != root_hash("y") != root_hash(None)


def _chain(tree: PrefixTree, tokens: list[int], block_ids: list[int]) -> list[bytes]:
    hashes = list(iter_chunk_hashes(tokens, 4, None, len(block_ids)))
    parent = root_hash()
    for depth, (h, b) in enumerate(zip(hashes, block_ids, strict=True)):
        tree.insert(h, parent, tokens[depth * 4 : depth * 4 + 4], b, depth)
        parent = h
    return hashes


def test_insert_lookup_and_children() -> None:
    tree = PrefixTree(4)
    hashes = _chain(tree, list(range(12)), [5, 6, 7])
    assert len(tree) == 3
    assert tree.lookup(hashes[1]).block_id == 6
    assert tree.node_of_block(7).depth == 2
    assert tree.node_of_block(5).num_children == 1
    assert tree.node_of_block(7).num_children == 0
    tree.check_integrity()


def test_insert_needs_a_cached_parent() -> None:
    tree = PrefixTree(4)
    orphan = chunk_hash(b"\x00" * 32, [1, 2, 3, 4])
    with pytest.raises(AssertionError, match="no cached parent"):
        tree.insert(orphan, b"\x00" * 32, [1, 2, 3, 4], 0, depth=1)


def test_lru_evicts_leaves_first() -> None:
    tree = PrefixTree(4)
    _chain(tree, list(range(12)), [5, 6, 7])
    for b in (7, 6, 5):  # tail-first, as KVManager.free does
        tree.push_evictable(b)
    assert tree.evictable_block_ids() == [7, 6, 5]
    tree.check_integrity()
    assert tree.evict_lru() == 7
    assert tree.node_of_block(6).num_children == 0
    assert tree.evict_all() == [6, 5]
    assert len(tree) == 0
    tree.check_integrity()


def test_evicting_a_parent_first_is_refused() -> None:
    tree = PrefixTree(4)
    _chain(tree, list(range(8)), [0, 1])
    tree.push_evictable(0)
    tree.push_evictable(1)
    with pytest.raises(AssertionError, match="comes after its parent"):
        tree.check_integrity()
    with pytest.raises(AssertionError, match="orphan"):
        tree.evict_lru()


def test_pins_leave_lru_and_nest() -> None:
    tree = PrefixTree(4)
    _chain(tree, list(range(8)), [0, 1])
    tree.push_evictable(1)
    tree.push_evictable(0)
    node0, node1 = tree.node_of_block(0), tree.node_of_block(1)
    tree.pin(node0)
    tree.pin(node0)
    assert tree.evictable_block_ids() == [1]
    assert tree.pinned_block_ids() == {0}
    tree.check_integrity()
    tree.unpin(node0)
    assert node0.pin_count == 1
    tree.unpin(node0)
    assert tree.pinned_block_ids() == set()
    with pytest.raises(AssertionError):
        tree.unpin(node1)
    tree.pin(node1)  # a child pinned more than its parent breaks the whole-prefix rule
    with pytest.raises(AssertionError, match="pinned more than its parent"):
        tree.check_integrity()


def test_check_integrity_detects_tampered_tokens() -> None:
    tree = PrefixTree(4)
    _chain(tree, list(range(4)), [3])
    tree.node_of_block(3).token_ids = (9, 9, 9, 9)
    with pytest.raises(AssertionError, match="does not match its tokens"):
        tree.check_integrity()
