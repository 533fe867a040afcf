"""Reference counts and the free queue of KV block ids (pure bookkeeping, no tensors).

A block is `block_size` token slots spanning every layer; its id indexes the tensor pool owned by
`kv_store`. The pool knows three kinds of block:

- free: in the free queue, reference count 0, content meaningless;
- used: reference count > 0 (held by request block tables, see `KVManager`);
- parked: reference count 0 but *not* in the free queue; the prefix tree keeps it as a cached
  chunk. The pool cannot tell parked blocks apart on its own: its owner (`KVManager`) accounts
  for them and hands them back with `incref` (reuse or eviction) or `release`.

Invariants (checked by `check_integrity`):
- every id in the free queue is in `[0, num_blocks)`, appears once and has reference count 0;
- reference counts are never negative;
- `num_used_blocks` equals the number of ids with count > 0, and `multi_ref_ids()` is exactly
  the set of ids with count > 1 (both kept incrementally, O(1) per change).

Free-queue order is deterministic: initially 0, 1, ..., num_blocks - 1; `allocate` pops from the
head and `release` appends to the tail in the order given (as vLLM v1's `FreeKVCacheBlockQueue`).
Not thread-safe: the engine loop is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvwise.errors import OutOfBlocksError


class BlockPool:
    """Free queue plus per-block reference counts for `num_blocks` block ids."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # An ordered set: O(1) pop at the head, append at the tail, removal and membership.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_used = 0
        self._multi_ref: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (cached chunks are not free)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above zero."""
        return self._num_used

    def free_block_ids(self) -> list[int]:
        """The free queue, head first (the next `allocate` takes from the left)."""
        return list(self._free)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def multi_ref_ids(self) -> set[int]:
        """Ids whose reference count is above one (a copy)."""
        return set(self._multi_ref)

    def allocate(self, n: int) -> list[int]:
        """Pop `n` blocks from the head of the free queue, each with reference count 1.

        Raises `OutOfBlocksError` (and changes nothing) when fewer than `n` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} free blocks, only {len(self._free)} are free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(n)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        self._num_used += n
        return block_ids

    def incref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block; a block may not be in the free queue."""
        for block_id in block_ids:
            assert block_id not in self._free, f"incref of free block {block_id}"
            count = self._ref_counts[block_id] + 1
            self._ref_counts[block_id] = count
            if count == 1:
                self._num_used += 1
            elif count == 2:
                self._multi_ref.add(block_id)

    def decref(self, block_ids: Iterable[int]) -> list[int]:
        """Drop one reference from each block; return the ids whose count reached 0, in order.

        Blocks reaching 0 are *not* put back in the free queue: the caller decides between
        `release` and keeping them as cached chunks.
        """
        zeroed: list[int] = []
        for block_id in block_ids:
            count = self._ref_counts[block_id] - 1
            assert count >= 0, f"decref of block {block_id} with reference count 0"
            self._ref_counts[block_id] = count
            if count == 0:
                self._num_used -= 1
                zeroed.append(block_id)
            elif count == 1:
                self._multi_ref.discard(block_id)
        return zeroed

    def release(self, block_ids: Iterable[int]) -> None:
        """Append unreferenced blocks to the tail of the free queue, in the order given."""
        for block_id in block_ids:
            assert self._ref_counts[block_id] == 0, (
                f"release of block {block_id} with reference count {self._ref_counts[block_id]}"
            )
            assert block_id not in self._free, f"double release of block {block_id}"
            self._free[block_id] = None

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first violated invariant."""
        n = self.num_blocks
        assert len(self._ref_counts) == n, "ref count table has the wrong length"
        for block_id in self._free:
            assert 0 <= block_id < n, f"free queue holds out-of-range id {block_id}"
            assert self._ref_counts[block_id] == 0, (
                f"free block {block_id} has reference count {self._ref_counts[block_id]}"
            )
        negative = [b for b, c in enumerate(self._ref_counts) if c < 0]
        assert not negative, f"negative reference counts on blocks {negative}"
        used = sum(1 for c in self._ref_counts if c > 0)
        assert used == self._num_used, f"num_used {self._num_used} != counted {used}"
        multi = {b for b, c in enumerate(self._ref_counts) if c > 1}
        assert multi == self._multi_ref, f"multi-ref set {self._multi_ref} != counted {multi}"
        assert len(self._free) + used <= n, "free + used exceeds the number of blocks"
