"""The prefix tree of full KV chunks: chained hashes, the evictable LRU and pin counts.

A chunk is one full block (`block_size` tokens) whose tokens and all preceding tokens are known.
It is named by a chained sha256 hash, h_i = sha256(h_{i-1} || tokens_i), where h_{-1} is a root
digest that mixes in an optional per-request cache salt (so tenants with different salts never
share, and cannot probe each other's prompts by timing; RELIABILITY.md). Equal prefixes therefore
map to the same chunk, and a node's hash names its whole path from the root, as in
ChunkAttention's prefix-aware KV cache (Ye et al. 2024, Sec. 3.1), which we extend with retention
of finished prefixes: unreferenced chunks stay cached and are evicted least recently used first.

This module knows nothing about reference counts; `KVManager` tells it when a chunk becomes
unreferenced (`push_evictable`) or referenced again (`remove_evictable`).

Invariants (checked by `check_integrity`):
- one node per hash and one node per block id; `_by_hash` and `_by_block` agree;
- each node's hash equals `chunk_hash(parent_hash, token_ids)`; a node at `depth > 0` has its
  parent (at `depth - 1`) in the tree, so a cached chunk's parent is cached; `num_children`
  counts the node's children exactly;
- the evictable LRU holds only unpinned nodes; pin counts never grow from parent to child
  (pins cover whole prefixes), so a pinned chunk's ancestors are pinned;
- an evictable node comes before its parent in the LRU whenever the parent is evictable too, so
  the head of the LRU is always a leaf and evicting it never orphans a child. `KVManager`
  keeps this by freeing a request's blocks tail-first (a request holding a chunk holds all its
  ancestors, so a parent never loses its last reference before its children).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

_ROOT_TAG = b"kvwise/prefix-root\x00"
_UNSALTED_ROOT = hashlib.sha256(_ROOT_TAG).digest()


def root_hash(cache_salt: Optional[str] = None) -> bytes:
    """The digest that plays the parent of every first chunk for this salt."""
    if cache_salt is None:
        return _UNSALTED_ROOT
    return hashlib.sha256(_ROOT_TAG + cache_salt.encode("utf-8")).digest()


def chunk_hash(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """sha256(parent digest || tokens as little-endian int64)."""
    return hashlib.sha256(parent_hash + struct.pack(f"<{len(token_ids)}q", *token_ids)).digest()


def iter_chunk_hashes(
    token_ids: Sequence[int], block_size: int, cache_salt: Optional[str], num_chunks: int
) -> Iterator[bytes]:
    """Hashes of the first `num_chunks` full chunks of `token_ids`, computed lazily."""
    parent = root_hash(cache_salt)
    for i in range(num_chunks):
        parent = chunk_hash(parent, token_ids[i * block_size : (i + 1) * block_size])
        yield parent


@dataclass(eq=False)
class ChunkNode:
    """One cached full block: chunk number `depth` of its prefix (0 = first chunk, whose
    `parent_hash` is a root digest)."""

    block_hash: bytes
    parent_hash: bytes
    token_ids: tuple[int, ...]
    block_id: int
    depth: int
    num_children: int = 0
    pin_count: int = 0


class PrefixTree:
    """Hash -> chunk map with an LRU of evictable chunks and per-chunk pin counts."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._by_hash: dict[bytes, ChunkNode] = {}
        self._by_block: dict[int, ChunkNode] = {}
        # Block ids of unreferenced, unpinned chunks: head = least recently used.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()  # block ids with pin_count > 0

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    def lookup(self, block_hash: bytes) -> Optional[ChunkNode]:
        return self._by_hash.get(block_hash)

    def node_of_block(self, block_id: int) -> Optional[ChunkNode]:
        return self._by_block.get(block_id)

    def evictable_block_ids(self) -> list[int]:
        """The LRU, least recently used first (the next eviction takes from the left)."""
        return list(self._lru)

    def pinned_block_ids(self) -> set[int]:
        return set(self._pinned)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._lru

    def insert(
        self,
        block_hash: bytes,
        parent_hash: bytes,
        token_ids: Sequence[int],
        block_id: int,
        depth: int,
    ) -> ChunkNode:
        """Add a chunk for a block that a request holds (so it starts out not evictable).

        A chunk with `depth > 0` needs its parent cached.
        """
        assert block_hash not in self._by_hash, "chunk already cached"
        assert block_id not in self._by_block, f"block {block_id} already holds a chunk"
        assert len(token_ids) == self.block_size, "only full blocks become chunks"
        if depth > 0:
            parent = self._by_hash.get(parent_hash)
            assert parent is not None, f"chunk for block {block_id} has no cached parent"
            assert parent.depth == depth - 1, "parent chunk at the wrong depth"
            parent.num_children += 1
        node = ChunkNode(block_hash, parent_hash, tuple(token_ids), block_id, depth)
        self._by_hash[block_hash] = node
        self._by_block[block_id] = node
        return node

    def push_evictable(self, block_id: int) -> None:
        """The chunk lost its last reference: it becomes the most recently used evictable."""
        node = self._by_block[block_id]
        assert node.pin_count == 0, f"pinned chunk {block_id} cannot be evictable"
        assert block_id not in self._lru, f"chunk {block_id} already evictable"
        self._lru[block_id] = None

    def remove_evictable(self, block_id: int) -> None:
        """The chunk is referenced or pinned again; a no-op if it was not evictable."""
        self._lru.pop(block_id, None)

    def evict_lru(self) -> int:
        """Remove the least recently used evictable chunk from the tree; return its block id."""
        block_id, _ = self._lru.popitem(last=False)
        node = self._by_block[block_id]
        assert node.num_children == 0, f"evicting chunk {block_id} would orphan its children"
        self._remove(node)
        return block_id

    def evict_all(self) -> list[int]:
        """Remove every evictable chunk (LRU order); return their block ids."""
        return [self.evict_lru() for _ in range(len(self._lru))]

    def pin(self, node: ChunkNode) -> None:
        """Add one pin; a pinned chunk is never evictable."""
        node.pin_count += 1
        self._pinned.add(node.block_id)
        self._lru.pop(node.block_id, None)

    def unpin(self, node: ChunkNode) -> None:
        """Drop one pin; the caller decides whether the chunk becomes evictable."""
        assert node.pin_count > 0, f"unpin of unpinned chunk {node.block_id}"
        node.pin_count -= 1
        if node.pin_count == 0:
            self._pinned.discard(node.block_id)

    def _remove(self, node: ChunkNode) -> None:
        del self._by_hash[node.block_hash]
        del self._by_block[node.block_id]
        if node.depth > 0:
            self._by_hash[node.parent_hash].num_children -= 1

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first violated invariant (O(chunks))."""
        assert len(self._by_hash) == len(self._by_block), "hash and block maps differ in size"
        children: dict[bytes, int] = {}
        for block_hash, node in self._by_hash.items():
            assert node.block_hash == block_hash, f"chunk {node.block_id} filed under wrong hash"
            assert self._by_block.get(node.block_id) is node, f"block map misses {node.block_id}"
            assert len(node.token_ids) == self.block_size, f"chunk {node.block_id} not full"
            assert chunk_hash(node.parent_hash, node.token_ids) == block_hash, (
                f"chunk {node.block_id}: hash does not match its tokens"
            )
            if node.depth == 0:
                continue
            parent = self._by_hash.get(node.parent_hash)
            assert parent is not None, f"chunk {node.block_id} has no cached parent"
            assert parent.depth == node.depth - 1, f"chunk {node.block_id}: parent depth"
            children[parent.block_hash] = children.get(parent.block_hash, 0) + 1
            assert node.pin_count <= parent.pin_count, (
                f"chunk {node.block_id} pinned more than its parent {parent.block_id}"
            )
        for block_hash, node in self._by_hash.items():
            assert node.num_children == children.get(block_hash, 0), (
                f"chunk {node.block_id}: num_children {node.num_children} != "
                f"{children.get(block_hash, 0)}"
            )
        pinned = {b for b, node in self._by_block.items() if node.pin_count > 0}
        assert pinned == self._pinned, f"pinned set {self._pinned} != counted {pinned}"
        position = {block_id: i for i, block_id in enumerate(self._lru)}
        for block_id, i in position.items():
            node = self._by_block.get(block_id)
            assert node is not None, f"evictable block {block_id} is not a cached chunk"
            assert node.pin_count == 0, f"evictable chunk {block_id} is pinned"
            if node.depth > 0:
                parent_id = self._by_hash[node.parent_hash].block_id
                assert position.get(parent_id, len(position)) > i, (
                    f"evictable chunk {block_id} comes after its parent {parent_id} in the LRU"
                )
