"""Compaction planning for one group's block table: which kept rows move where (pure, no state).

A group's table (`kv_groups`) lists blocks whose slots hold the group's tokens in order; evicted
slots leave holes. Compaction packs the kept slots to the front, in order, in the fewest blocks,
moving as few rows as possible, and returns the plan as plain data; `KVManager.compact` takes the
blocks it needs and hands the store a `CopyPlan`.

Invariants of a plan (tested in tests/unit/cache/test_kv_groups.py):
- kept slot j of the group (j-th surviving slot, computed or only allocated) lands at new slot j;
- a read-only entry (a shared chunk) is never a destination: it stays in place (all its slots
  survive and land on a block boundary) or is dropped, its kept rows copied out;
- each destination row is written once; sources are read before any write (one gather, one
  scatter), so a plan may write into a block whose rows it also reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class CopyPlan:
    """Row copies that compact one group, for the KV store to run (plain data).

    `copies` are (src_row, dst_row) flat rows (`block * S + offset`) of the group's plane: for
    plane p = (l, h) the store runs `k[l][dst, h] = k[l][src, h]` (and the same for v); `plane`
    None means every plane (a one-group request: `k[:, dst] = k[:, src]`). All sources are read
    before any destination is written (one gather, one scatter). Run it before the next step
    writes KV: `freed_block_ids` (entries the group no longer lists) may be handed out at once.
    """

    group: int
    plane: Optional[int]
    copies: list[tuple[int, int]]
    freed_block_ids: list[int]
    new_block_ids: list[int]  # entries compaction had to take (kept rows copied out of shared)
    num_kept_tokens: int

    @property
    def src_rows(self) -> list[int]:
        return [src for src, _ in self.copies]

    @property
    def dst_rows(self) -> list[int]:
        return [dst for _, dst in self.copies]


@dataclass
class Compaction:
    """A planned compaction: `new_table` entries (None = an entry to take), row moves
    (src_row, new entry index, offset), and the old entries dropped, in table order."""

    new_table: list[Optional[int]]
    moves: list[tuple[int, int, int]]
    dropped: list[int]
    num_evicted: int

    @property
    def num_new(self) -> int:
        return sum(1 for b in self.new_table if b is None)


def plan_compaction(table: list[int], evicted: set[int], num_slots: int, num_done: int,
                    block_size: int, writable: Callable[[int], bool]) -> Compaction:
    """Plan packing `table`'s surviving slots (`num_slots` allocated, the first `num_done`
    computed, `evicted` among those) into the fewest entries.

    An old entry whose slots all survive and land on a block boundary stays where it is (no
    copies; shared chunks too); any other new entry is written into the old writable entry
    already holding most of its rows at their offsets, else the first unused writable one, else
    a new one (None). Entries before the first evicted slot are untouched. O(entries + slots of
    the entries that move): evicting whole blocks' worth of tokens keeps the copies to the block
    that straddles the hole."""
    s = block_size
    holes = sorted(evicted)
    if not holes:
        return Compaction(list(table), [], [], 0)
    gone: dict[int, set[int]] = {}
    for slot in holes:
        gone.setdefault(slot // s, set()).add(slot % s)
    first = holes[0] // s
    in_place: dict[int, int] = {}  # new entry -> old entry
    placed: dict[int, list[tuple[int, int]]] = {}  # new entry -> [(offset, old slot)]
    cursor = first * s
    for k in range(first, len(table)):
        lo, hi = k * s, min((k + 1) * s, num_slots)
        out = gone.get(k)
        if out is None and cursor % s == 0:
            in_place[cursor // s] = k
            cursor += hi - lo
            continue
        for slot in range(lo, hi):
            if out is None or slot - lo not in out:
                e, offset = divmod(cursor, s)
                placed.setdefault(e, []).append((offset, slot))
                cursor += 1
    assert cursor == num_slots - len(holes), "compaction lost slots"
    kept_old = set(in_place.values())
    spare = _SpareEntries([k for k in range(first, len(table))
                           if k not in kept_old and writable(table[k])])
    new_table: list[Optional[int]] = list(table[:first])
    dest: dict[int, Optional[int]] = {}
    for e in range(first, -(-cursor // s)):
        if e in in_place:
            new_table.append(table[in_place[e]])
            continue
        k = spare.take(placed[e], num_done, s)
        dest[e] = k
        new_table.append(None if k is None else table[k])
    moves = []
    for e, k in dest.items():
        for offset, slot in placed[e]:
            if slot >= num_done:  # allocated, not computed yet: nothing to copy
                continue
            src_row = table[slot // s] * s + slot % s
            if k is None or src_row != table[k] * s + offset:
                moves.append((src_row, e, offset))
    dropped = [table[k] for k in range(first, len(table))
               if k not in kept_old and k not in spare.taken]
    return Compaction(new_table, moves, dropped, len(holes))


class _SpareEntries:
    """Old writable entries a compaction may write into, handed out once each."""

    def __init__(self, spare: list[int]) -> None:
        self._spare = spare
        self._spare_set = set(spare)
        self._next = 0  # first spare entry that may still be untaken
        self.taken: set[int] = set()

    def take(self, placed: list[tuple[int, int]], num_done: int, block_size: int
             ) -> Optional[int]:
        """The untaken spare entry holding most of `placed`'s computed rows at their new
        offsets (ties: the first), else the first untaken one; None if none is left."""
        hits: dict[int, int] = {}
        for offset, slot in placed:
            k, old_offset = divmod(slot, block_size)
            if (slot < num_done and old_offset == offset and k in self._spare_set
                    and k not in self.taken):
                hits[k] = hits.get(k, 0) + 1
        if hits:
            k = max(hits, key=lambda k: (hits[k], -k))
        else:
            while self._next < len(self._spare) and self._spare[self._next] in self.taken:
                self._next += 1
            if self._next == len(self._spare):
                return None
            k = self._spare[self._next]
        self.taken.add(k)
        return k
