"""Reference counts, the free queue and per-plane ownership of KV block ids (no tensors).

A block is `block_size` token slots spanning every layer and KV head; its id indexes the tensor
pool owned by `kv_store`. A *plane* of a block is its (layer, KV head) slice: the store's rows
`k[l][b*S : b*S+S, h]`; a block has `num_planes` = L*K of them (plane p = (p // K, p % K)). The
pool knows four kinds of block:

- free: in the free queue, reference count 0, content meaningless;
- used (dense): reference count > 0 (held by request block tables, see `KVManager`);
- split: reference count 0, not in the free queue, its planes individually owned: a former
  private block some of whose planes a compressed request's groups gave up (`split`), or a free
  block taken for one plane (`allocate_plane`). Each plane is owned (by exactly one group of one
  request, see `KVManager`) or free (in that plane's free queue); the block goes back to the free
  queue when its last plane is released;
- parked: reference count 0, neither free nor split; the prefix tree keeps it as a cached chunk.
  The pool cannot tell parked blocks apart on its own: its owner (`KVManager`) accounts for them
  and hands them back with `incref` (reuse or eviction) or `release`.

Invariants (checked by `check_integrity`):
- every id in the free queue is in `[0, num_blocks)`, appears once and has reference count 0;
- reference counts are never negative;
- `num_used_blocks` equals the number of ids with count > 0, and `multi_ref_ids()` is exactly
  the set of ids with count > 1 (both kept incrementally, O(1) per change);
- a split block is neither free nor referenced and owns at least one plane; each of its planes is
  either owned or in that plane's free queue, never both; the per-plane free queues hold only
  split blocks, and `num_free_planes` counts their entries;
- free + used + split <= num_blocks (the rest are parked).

Free-queue order is deterministic: initially 0, 1, ..., num_blocks - 1; `allocate` pops from the
head and `release` appends to the tail in the order given (as vLLM v1's `FreeKVCacheBlockQueue`).
Each plane's free queue is FIFO as well. Dense requests never touch the plane queues.
Not thread-safe: the engine loop is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvwise.errors import OutOfBlocksError


class BlockPool:
    """Free queue, per-block reference counts and split-block plane ownership."""

    def __init__(self, num_blocks: int, num_planes: int = 1) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if num_planes <= 0:
            raise ValueError(f"num_planes must be positive, got {num_planes}")
        self.num_blocks = num_blocks
        self.num_planes = num_planes
        self._ref_counts = [0] * num_blocks
        # An ordered set: O(1) pop at the head, append at the tail, removal and membership.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_used = 0
        self._multi_ref: set[int] = set()
        self._owned: dict[int, set[int]] = {}  # split block -> its owned planes
        self._free_planes: list[OrderedDict[int, None]] = [OrderedDict() for _ in
                                                           range(num_planes)]
        self._num_free_planes = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (cached chunks and split blocks are not free)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with a reference count above zero."""
        return self._num_used

    @property
    def num_split_blocks(self) -> int:
        return len(self._owned)

    @property
    def num_free_planes(self) -> int:
        """Free planes of split blocks (free memory a dense allocation cannot use)."""
        return self._num_free_planes

    @property
    def num_owned_planes(self) -> int:
        """Planes of split blocks that some group owns."""
        return len(self._owned) * self.num_planes - self._num_free_planes

    def num_free_planes_of(self, plane: int) -> int:
        return len(self._free_planes[plane])

    def free_block_ids(self) -> list[int]:
        """The free queue, head first (the next `allocate` takes from the left)."""
        return list(self._free)

    def free_plane_block_ids(self, plane: int) -> list[int]:
        """Split blocks whose `plane` is free, head first (the next `allocate_plane` takes it)."""
        return list(self._free_planes[plane])

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free

    def is_split(self, block_id: int) -> bool:
        return block_id in self._owned

    def owned_planes(self, block_id: int) -> set[int]:
        """The owned planes of a split block (a copy; empty for any other block)."""
        return set(self._owned.get(block_id, ()))

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def multi_ref_ids(self) -> set[int]:
        """Ids whose reference count is above one (a copy)."""
        return set(self._multi_ref)

    # -- dense blocks ----------------------------------------------------------------------

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
        """Add one reference to each block; a block may not be free or split."""
        for block_id in block_ids:
            assert block_id not in self._free, f"incref of free block {block_id}"
            assert block_id not in self._owned, f"incref of split block {block_id}"
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
            assert block_id not in self._owned, f"release of split block {block_id}"
            self._free[block_id] = None

    # -- split blocks (planes) -------------------------------------------------------------

    def split(self, block_id: int, owned_planes: Iterable[int]) -> None:
        """Turn a block held by one reference into a split block owning `owned_planes` (its
        holder's reference becomes their ownership); the other planes join their free queues
        (tail, in plane order)."""
        assert self._ref_counts[block_id] == 1, (
            f"split of block {block_id} with reference count {self._ref_counts[block_id]}"
        )
        owned = set(owned_planes)
        assert owned and all(0 <= p < self.num_planes for p in owned), (
            f"split of block {block_id}: planes {owned} out of range"
        )
        self.decref([block_id])
        self._owned[block_id] = owned
        for plane in range(self.num_planes):
            if plane not in owned:
                self._free_planes[plane][block_id] = None
                self._num_free_planes += 1

    def allocate_plane(self, plane: int) -> int:
        """Own `plane` of a block: the head of that plane's free queue (a split block's freed
        plane, so freed memory is reused first), else the head of the free queue, split.

        Raises `OutOfBlocksError` (and changes nothing) when neither exists."""
        queue = self._free_planes[plane]
        if queue:
            block_id = queue.popitem(last=False)[0]
            self._num_free_planes -= 1
            self._owned[block_id].add(plane)
            return block_id
        if not self._free:
            raise OutOfBlocksError(f"no free plane {plane} and no free block")
        block_id = self._free.popitem(last=False)[0]
        self._ref_counts[block_id] = 1
        self._num_used += 1
        self.split(block_id, (plane,))
        return block_id

    def release_plane(self, block_id: int, plane: int) -> None:
        """Free an owned plane; a split block whose last plane goes returns to the free queue
        (tail)."""
        owned = self._owned[block_id]
        assert plane in owned, f"release of plane {plane} of block {block_id}: not owned"
        owned.remove(plane)
        if owned:
            self._free_planes[plane][block_id] = None
            self._num_free_planes += 1
            return
        del self._owned[block_id]
        for p in range(self.num_planes):
            if p != plane:
                del self._free_planes[p][block_id]
        self._num_free_planes -= self.num_planes - 1
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
        self._check_split()
        assert len(self._free) + used + len(self._owned) <= n, (
            "free + used + split exceeds the number of blocks"
        )

    def _check_split(self) -> None:
        num_free_planes = 0
        for plane, queue in enumerate(self._free_planes):
            num_free_planes += len(queue)
            for block_id in queue:
                owned = self._owned.get(block_id)
                assert owned is not None, f"plane {plane} free queue holds unsplit {block_id}"
                assert plane not in owned, f"plane {plane} of block {block_id} owned and free"
        assert num_free_planes == self._num_free_planes, "free-plane count out of date"
        for block_id, owned in self._owned.items():
            assert 0 <= block_id < self.num_blocks, f"split block id {block_id} out of range"
            assert owned, f"split block {block_id} owns no plane"
            assert block_id not in self._free, f"split block {block_id} is in the free queue"
            assert self._ref_counts[block_id] == 0, f"split block {block_id} is referenced"
            for plane in range(self.num_planes):
                assert (plane in owned) != (block_id in self._free_planes[plane]), (
                    f"plane {plane} of split block {block_id} is neither owned nor free"
                )
