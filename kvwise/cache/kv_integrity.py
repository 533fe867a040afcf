"""The costly invariants of `KVManager` (kvwise.cache.kv_manager), checked by its
`check_integrity`: reference counts against the tables and adoptions, hash chains against the
tree, plane ownership of split blocks, and the state of every block. Split out of the manager so
that it holds the bookkeeping and this module its audit; these functions read the manager's
private state and change nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvwise.cache.prefix_tree import root_hash

if TYPE_CHECKING:
    from kvwise.cache.kv_manager import KVManager


def check_tables(kv: KVManager) -> None:
    """Reference counts match the tables and adoptions; hash chains follow the tree."""
    expected_refs = [0] * kv.num_blocks
    adopters: dict[int, int] = {}
    listed_planes: dict[int, set[int]] = {}  # split block -> planes that groups list
    for req_id, req in kv._requests.items():
        assert req.num_computed <= req.num_tokens, f"{req_id}: computed past allocated"
        if req.groups is not None:
            assert not req.block_ids and not req.in_flight, f"{req_id}: stale dense state"
            req.groups.check_integrity(req_id, kv.pool, kv.tree, req.block_hashes,
                                       req.num_tokens, req.num_computed)
            req.groups.count_holdings(kv.pool, expected_refs, adopters, listed_planes)
            continue
        assert len(req.block_ids) == -(-req.num_tokens // kv.block_size), (
            f"{req_id}: {len(req.block_ids)} blocks for {req.num_tokens} tokens"
        )
        assert len(set(req.block_ids)) == len(req.block_ids), f"{req_id}: repeated blocks"
        assert len(req.block_hashes) <= len(req.block_ids), f"{req_id}: hashes past table"
        for b in req.block_ids:
            expected_refs[b] += 1
        for i, b in req.adopted.items():
            expected_refs[b] += 1
            adopters[b] = adopters.get(b, 0) + 1
            assert b != req.block_ids[i], f"{req_id}: adopted its own block {b}"
            assert kv.tree.node_of_block(req.block_ids[i]) is None, (
                f"{req_id}: duplicate block {req.block_ids[i]} is in the tree"
            )
        parent = root_hash(req.cache_salt)
        for i, block_hash in enumerate(req.block_hashes):
            node = kv.tree.lookup(block_hash)
            assert node is not None, f"{req_id}: chunk {i} is not cached"
            assert node.parent_hash == parent and node.depth == i, f"{req_id}: chunk {i} path"
            assert node.block_id == req.adopted.get(i, req.block_ids[i]), (
                f"{req_id}: chunk {i} is block {node.block_id}, not the request's"
            )
            parent = block_hash
    for b, expected in enumerate(expected_refs):
        assert kv.pool.ref_count(b) == expected, (
            f"block {b}: ref count {kv.pool.ref_count(b)} != holders {expected}"
        )
    assert adopters == kv._num_adopters, "adopter counts out of date"
    for b in range(kv.num_blocks):
        assert kv.pool.owned_planes(b) == listed_planes.get(b, set()), (
            f"block {b}: owned planes {kv.pool.owned_planes(b)} != listed "
            f"{listed_planes.get(b, set())}"
        )
    for block_hash, owner in kv._in_flight.items():
        req = kv._requests.get(owner)
        assert req is not None, f"in-flight chunk owned by unknown request {owner!r}"
        assert block_hash in req.in_flight, f"{owner}: in-flight chunk not in its list"
        assert block_hash not in req.block_hashes, f"{owner}: committed chunk in flight"


def check_block_states(kv: KVManager) -> None:
    """Each block is exactly one of free, used, cached (evictable), pinned-idle or split."""
    num_pinned_idle = 0
    for b in range(kv.num_blocks):
        node = kv.tree.node_of_block(b)
        if kv.pool.is_free(b):
            assert node is None, f"free block {b} is still a cached chunk"
        elif kv.pool.is_split(b):
            assert node is None, f"split block {b} is a cached chunk"
        elif kv.pool.ref_count(b) == 0:
            assert node is not None, f"block {b} is unreferenced, not free and not cached"
            if node.pin_count:
                num_pinned_idle += 1
                assert not kv.tree.is_evictable(b), f"pinned block {b} is evictable"
            else:
                assert kv.tree.is_evictable(b), f"cached block {b} is not evictable"
        else:
            assert not kv.tree.is_evictable(b), f"referenced block {b} is evictable"
    total = (
        kv.pool.num_free_blocks
        + kv.tree.num_evictable
        + num_pinned_idle
        + kv.pool.num_used_blocks
        + kv.pool.num_split_blocks
    )
    assert total == kv.num_blocks, (
        f"free + cached + pinned + used + split = {total} != {kv.num_blocks} blocks"
    )
