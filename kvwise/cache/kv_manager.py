"""Scheduler-facing KV bookkeeping: block tables, prefix hits, LRU retention, pins (no tensors).

Owns each request's block table (append-only list of block ids), the `BlockPool` and the
`PrefixTree`. Walk of one request:
1. `start_request` attaches the longest cached prefix of full chunks (never the whole prompt: at
   least the last token is recomputed to get its logits) and returns the cached token count.
2. `can_allocate` / `allocate` grow the table to cover the slots the next step writes, taking
   free blocks first and evicting least recently used cached chunks only when none are free.
3. `commit` after a step turns every newly full block into a chunk of the tree.
4. `free` drops the request's references tail-first; chunks nobody references stay cached
   (evictable, LRU), other blocks go back to the free queue.
A request imported from another engine (its KV bytes arrive with it) skips step 1:
`import_request` gives it fresh private blocks for its computed tokens; the engine writes their
bytes and then `commit`s, which turns the full ones into chunks (or adopts cached duplicates)
exactly as after a step.

Groups (FastGen-style compression, `kv_groups`): a request has 1 group (all L*K planes: dense,
today's cost) or `num_planes` (one per (layer, KV head)). Until its first `evict` all groups read
the one table above (no per-plane work); `evict(req, g, slots)` forks it into one table per
group, `compact(req, g)` packs group g's kept tokens into the fewest blocks and returns a
`CopyPlan` for the store, handing blocks, or single planes (`BlockPool` split blocks), back.

Composition rule with prefix sharing: a shared chunk (in the prefix tree, maybe referenced by
other requests) is never mutated or split by one request's eviction. Evicting its tokens in a
group only drops that group's use (compaction copies the kept ones out); the request keeps its
one reference while any group lists the chunk (or a deeper chunk of its prefix, so the tree's
LRU stays leaf-first) and releases it when none does. Chunks computed after a request's first
eviction are never committed to the tree (their KV saw a compressed context: no other request
may reuse it) nor sealed (compaction rewrites them); its in-flight claims end at that eviction.

Duplicate rule (two requests computed the same chunk, or a fully cached prompt recomputed its
last chunk): when a newly full block's hash is already in the tree under another block X, the
block stays private (never shared, freed to the free queue) and the request *adopts* X: it takes
one reference on X, so that its later chunks, inserted as X's children, never outlive their
parent. The table itself never changes: the running model keeps reading the private block.

Invariants (checked by `check_integrity`):
- every block is exactly one of: free (in the free queue), used (reference count > 0), cached
  (unreferenced chunk, evictable), pinned-idle (unreferenced pinned chunk) or split (planes
  owned by groups), so free + cached + pinned + used + split == total (pinned is 0 unless
  `pin_prefix` is used, split 0 unless a many-group request evicts);
- a block's reference count equals the number of requests holding it: one per request whose
  table lists it, whatever number of its groups do (after a first eviction: its private blocks
  and the chunks of its held path, `kv_groups`), plus one per request adopting it; blocks in one
  table are distinct; until its first eviction a request's table only grows and covers exactly
  ceil(num_tokens / S) blocks;
- the owned planes of split blocks are exactly the planes that some group of some request
  lists (group g of a many-group request owns plane g), each listed once;
- a request's first `len(block_hashes)` blocks are chunks of one root path of the tree (its own
  block, or the adopted chunk at duplicate positions); shared chunks are full and immutable;
- with prefix caching off the tree stays empty (and nothing is in flight);
- an in-flight chunk (a full chunk of a running request's tokens, uncached when it started) is
  owned by one live request that has not committed it yet; commit or free drops it.
Not thread-safe: only the engine loop calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Optional

from kvwise.cache import kv_integrity
from kvwise.cache.block_pool import BlockPool
from kvwise.cache.kv_compaction import CopyPlan
from kvwise.cache.kv_groups import GroupTables, PoolAccess
from kvwise.cache.prefix_tree import (
    ChunkNode,
    PrefixTree,
    chunk_hash,
    iter_chunk_hashes,
    root_hash,
)
from kvwise.errors import OutOfBlocksError


@dataclass
class _RequestBlocks:
    cache_salt: Optional[str]
    block_ids: list[int] = field(default_factory=list)  # the block table, append-only
    block_hashes: list[bytes] = field(default_factory=list)  # one per full computed block
    adopted: dict[int, int] = field(default_factory=dict)  # table position -> adopted chunk
    in_flight: list[bytes] = field(default_factory=list)  # chunk hashes this request computes
    num_sealed: int = 0  # leading table blocks already full and handed to `on_seal`
    num_groups: int = 1
    num_tokens: int = 0  # positions the table covers (the largest `allocate`)
    num_computed: int = 0  # positions with KV (the last `commit`)
    groups: Optional[GroupTables] = None  # set at the first eviction (then block_ids is empty)
    commit_limit: Optional[int] = None  # tokens whose full chunks may join the tree (None: all)


class KVManager:
    """Block tables and prefix caching over `num_blocks` blocks of `block_size` slots."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
        on_seal: Optional[Callable[[list[int]], None]] = None, num_planes: int = 1,
        on_free: Optional[Callable[[list[int]], None]] = None,
    ) -> None:
        """`on_seal(block_ids)` is called by `commit` with the blocks of a request that became
        full (immutable from then on), in table order, once per block and request: the KV
        format's hook (quantize-on-seal, offload, send). Prefix-hit blocks arrive sealed.
        `num_planes` = L*K planes per block; a request may have that many groups.
        `on_free(block_ids)` is called when blocks return to the free list (the format's hook
        to drop per-block side state)."""
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._on_seal = on_seal
        self._on_free = on_free
        self.pool = BlockPool(num_blocks, num_planes)
        self._access = PoolAccess(self.pool, block_size, self._take_blocks, self._release,
                                  self._release_adopted)
        self.tree = PrefixTree(block_size)
        self._requests: dict[str, _RequestBlocks] = {}
        self._num_adopters: dict[int, int] = {}  # block id -> requests adopting it
        # chunk hash -> the running request computing it (uncached full chunks of its tokens)
        self._in_flight: dict[bytes, str] = {}
        self.peak_blocks_used = 0  # dense used + split
        self.peak_planes_used = 0  # planes of dense used blocks + owned planes of split ones
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    # -- queries -----------------------------------------------------------------------------

    def has_request(self, req_id: str) -> bool:
        return req_id in self._requests

    @property
    def num_planes(self) -> int:
        return self.pool.num_planes

    def block_table(self, req_id: str) -> list[int]:
        """A copy of the one block table every group of the request reads: a one-group
        request's, or a many-group request's before its first `evict` (entries never change
        once assigned, until then). See `groups_differ`."""
        req = self._req(req_id)
        if req.groups is None:
            return list(req.block_ids)
        if req.num_groups != 1:
            raise ValueError(f"request {req_id!r} has {req.num_groups} groups: use block_tables")
        assert req.groups is not None
        return list(req.groups.tables[0])

    def block_tables(self, req_id: str) -> list[list[int]]:
        """A copy of each group's block table, `[num_groups][blocks]`."""
        req = self._req(req_id)
        if req.groups is None:
            return [list(req.block_ids) for _ in range(req.num_groups)]
        return [list(t) for t in req.groups.tables]

    def num_groups(self, req_id: str) -> int:
        return self._req(req_id).num_groups

    def groups_differ(self, req_id: str) -> bool:
        """Whether a many-group request's groups have their own tables (after its first
        `evict`): readers then take `block_tables`, one per (layer, KV head)."""
        req = self._req(req_id)
        return req.num_groups > 1 and req.groups is not None

    def num_slots(self, req_id: str, group: int) -> int:
        """Computed slots of the group's table, kept or evicted-not-compacted: the token at
        position `num_computed + i` goes to slot `num_slots + i`."""
        req = self._req(req_id, group)
        return req.num_computed - (req.groups.num_removed[group] if req.groups else 0)

    def num_removed_slots(self, req_id: str, group: int) -> int:
        """Positions minus slots of the group: the token at position p (computed after the
        group's last compaction) lives at slot p - num_removed_slots (0 for a dense request)."""
        req = self._req(req_id, group)
        return req.groups.num_removed[group] if req.groups else 0

    def num_kept_tokens(self, req_id: str, group: int) -> int:
        """Computed tokens whose KV the group keeps (== `num_slots` once compacted)."""
        req = self._req(req_id, group)
        evicted = len(req.groups.evicted[group]) if req.groups else 0
        return self.num_slots(req_id, group) - evicted

    def evicted_slots(self, req_id: str, group: int) -> list[int]:
        """Slots evicted from the group and not yet compacted away, ascending."""
        req = self._req(req_id, group)
        return sorted(req.groups.evicted[group]) if req.groups else []

    def num_planes_held(self, req_id: str) -> int:
        """Planes of the blocks the request's tables list: every plane of a dense block, one
        per owned plane of a split block (the KV the request really holds, shared or not)."""
        req = self._req(req_id)
        if req.groups is None:
            return len(req.block_ids) * self.num_planes
        dense = {b for t in req.groups.tables for b in t if not self.pool.is_split(b)}
        split = sum(1 for t in req.groups.tables for b in t if self.pool.is_split(b))
        return len(dense) * self.num_planes + split

    def match_prefix(self, token_ids: Sequence[int], cache_salt: Optional[str] = None) -> int:
        """Tokens a new request with this prompt would get from the cache (read-only)."""
        return len(self._match(token_ids, cache_salt)) * self.block_size

    def cached_prefix_tokens(self, token_ids: Sequence[int], cache_salt: Optional[str] = None
                             ) -> int:
        """Tokens of the longest cached run of this prefix's full chunks (read-only; unlike
        `match_prefix`, the last chunk counts even when it ends the prompt)."""
        return len(self._cached_path(token_ids, cache_salt, len(token_ids) // self.block_size)
                   ) * self.block_size

    def prefix_in_flight(self, token_ids: Sequence[int], cache_salt: Optional[str] = None
                         ) -> bool:
        """Whether the first chunk a new request with this prompt would compute (just past its
        cached prefix) is being computed right now by a running request; once that request
        commits it, the new request would hit it instead of computing it again."""
        if not self.enable_prefix_caching or not self._in_flight:
            return False
        max_chunks = max(len(token_ids) - 1, 0) // self.block_size
        for block_hash in iter_chunk_hashes(token_ids, self.block_size, cache_salt, max_chunks):
            if self.tree.lookup(block_hash) is None:
                return block_hash in self._in_flight
        return False

    def num_available_blocks(self) -> int:
        """Blocks an allocation could get now: free plus evictable."""
        return self.pool.num_free_blocks + self.tree.num_evictable

    def can_allocate(self, req_id: str, num_tokens: int) -> bool:
        """Whether the table(s) could grow to cover `num_tokens` positions right now."""
        req = self._req(req_id)
        if req.groups is not None:
            return req.groups.num_fresh_blocks(self._access, num_tokens) <= \
                self.num_available_blocks()
        return self._num_new_blocks(req, num_tokens) <= self.num_available_blocks()

    def shared_block_ids(self) -> set[int]:
        """Blocks held by more than one request table (adoptions do not count)."""
        return {
            b
            for b in self.pool.multi_ref_ids()
            if self.pool.ref_count(b) - self._num_adopters.get(b, 0) > 1
        }

    def stats(self) -> dict[str, int]:
        used = self.pool.num_used_blocks
        shared = len(self.shared_block_ids())
        pinned_idle = sum(1 for b in self.tree.pinned_block_ids() if self.pool.ref_count(b) == 0)
        return {
            "num_blocks_total": self.num_blocks,
            "num_blocks_used": used,
            "num_blocks_cached": self.tree.num_evictable,
            "num_blocks_pinned": pinned_idle,
            "num_blocks_free": self.pool.num_free_blocks,
            "num_blocks_split": self.pool.num_split_blocks,
            "num_planes_per_block": self.num_planes,
            "num_planes_free": self.pool.num_free_planes,  # free planes of split blocks
            "num_planes_used": used * self.num_planes + self.pool.num_owned_planes,
            "peak_blocks_used": self.peak_blocks_used,
            "peak_planes_used": self.peak_planes_used,
            "shared_blocks": shared,
            "private_blocks": used - shared,
            "prefix_query_tokens": self.prefix_query_tokens,
            "prefix_hit_tokens": self.prefix_hit_tokens,
            "num_evictions": self.num_evictions,
        }

    # -- request lifecycle -------------------------------------------------------------------

    def start_request(
        self, req_id: str, token_ids: Sequence[int], cache_salt: Optional[str] = None,
        num_groups: int = 1, commit_limit: Optional[int] = None,
    ) -> int:
        """Register the request, attach its longest cached prefix; return cached tokens.

        `num_groups`: 1 (dense) or `num_planes` (one group per (layer, KV head), so that its
        groups can evict different tokens). `commit_limit`: only chunks within the first that
        many tokens join the prefix tree (a compressed request shares its prompt's chunks, not
        its output's: a held path chunk keeps every chunk above it held, so output chunks
        committed before the first eviction would stay held, beyond the policy's bound, until
        the request's window moved past them)."""
        assert req_id not in self._requests, f"request {req_id!r} already started"
        if num_groups not in (1, self.num_planes):
            raise ValueError(f"num_groups must be 1 or num_planes ({self.num_planes}), "
                             f"got {num_groups}")
        nodes = self._match(token_ids, cache_salt)
        for node in nodes:
            self._acquire(node.block_id)
        num_hit_tokens = len(nodes) * self.block_size
        req = self._requests[req_id] = _RequestBlocks(
            cache_salt, [n.block_id for n in nodes], [n.block_hash for n in nodes],
            num_sealed=len(nodes), num_groups=num_groups, num_tokens=num_hit_tokens,
            num_computed=num_hit_tokens, commit_limit=commit_limit,
        )
        if self.enable_prefix_caching:
            num_shareable = len(token_ids) if commit_limit is None else min(len(token_ids),
                                                                            commit_limit)
            hashes = iter_chunk_hashes(token_ids, self.block_size, cache_salt,
                                       num_shareable // self.block_size)
            for i, block_hash in enumerate(hashes):
                if i >= len(nodes) and self._in_flight.setdefault(block_hash, req_id) == req_id:
                    req.in_flight.append(block_hash)
        self.prefix_query_tokens += len(token_ids)
        self.prefix_hit_tokens += num_hit_tokens
        self._update_peak()
        return num_hit_tokens

    def can_import(self, num_tokens: int) -> bool:
        """Whether `import_request` of a request with `num_tokens` computed tokens fits now."""
        return -(-num_tokens // self.block_size) <= self.num_available_blocks()

    def import_request(
        self, req_id: str, num_tokens: int, cache_salt: Optional[str] = None
    ) -> list[int]:
        """Register a request arriving with KV for its first `num_tokens` tokens: a table of
        fresh private blocks covering them (no prefix match; free blocks first, then LRU
        eviction), returned in table order. The caller writes their bytes, then calls `commit`
        (or `free` if the write failed). Full blocks arrive sealed (exported after their seal,
        like prefix-hit blocks), so `commit` does not seal them again. Raises `OutOfBlocksError`
        and changes nothing when they do not fit."""
        assert req_id not in self._requests, f"request {req_id!r} already started"
        if not self.can_import(num_tokens):
            raise OutOfBlocksError(
                f"request {req_id!r} needs {-(-num_tokens // self.block_size)} blocks for "
                f"{num_tokens} imported tokens; {self.pool.num_free_blocks} free + "
                f"{self.tree.num_evictable} evictable"
            )
        self._requests[req_id] = _RequestBlocks(cache_salt,
                                                num_sealed=num_tokens // self.block_size)
        return self.allocate(req_id, num_tokens)

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Grow the table to cover `num_tokens` slots; return the new block ids in table order
        (after an eviction: every group's table to `num_tokens` positions; the blocks newly
        listed by any group, in the order taken).

        Takes free blocks first, then evicts LRU cached chunks. Raises `OutOfBlocksError` and
        changes nothing when free + evictable blocks do not suffice.
        """
        req = self._req(req_id)
        groups = req.groups
        if groups is None:
            n = self._num_new_blocks(req, num_tokens)
            if n == 0:
                if num_tokens > req.num_tokens:  # within the tail block
                    req.num_tokens = num_tokens
                return []
        else:
            n = groups.num_fresh_blocks(self._access, num_tokens)
        if n > self.num_available_blocks():
            raise OutOfBlocksError(
                f"request {req_id!r} needs {n} more blocks for {num_tokens} tokens; "
                f"{self.pool.num_free_blocks} free + {self.tree.num_evictable} evictable"
            )
        if num_tokens > req.num_tokens:
            req.num_tokens = num_tokens
        if groups is not None:  # after an eviction: per group (planes or whole blocks)
            new_ids = groups.allocate(self._access, num_tokens)
            self._update_peak()
            return new_ids
        new_ids = self._take_blocks(n)
        req.block_ids.extend(new_ids)
        self._update_peak()
        return new_ids

    def commit(self, req_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Record that the first `num_computed_tokens` of `token_ids` have KV in the table.

        Every newly full block becomes a chunk of the tree, or, if its chunk is already cached
        under another block, stays private and the request adopts that chunk (module docstring).
        """
        req = self._req(req_id)
        s = self.block_size
        assert num_computed_tokens <= len(token_ids), "more computed tokens than tokens"
        if req.groups is not None:
            assert all(num_computed_tokens - r <= len(t) * s for t, r in
                       zip(req.groups.tables, req.groups.num_removed)), (
                f"request {req_id!r}: {num_computed_tokens} computed tokens exceed a table"
            )
        else:
            assert num_computed_tokens <= len(req.block_ids) * s, (
                f"request {req_id!r}: {num_computed_tokens} computed tokens exceed its "
                f"{len(req.block_ids)} blocks"
            )
        req.num_computed = num_computed_tokens
        if num_computed_tokens > req.num_tokens:  # written within the tail's capacity
            req.num_tokens = num_computed_tokens
        if req.groups is not None:  # after an eviction: never committed nor sealed
            return
        num_full = num_computed_tokens // s
        if num_full > req.num_sealed:
            if self._on_seal is not None:
                self._on_seal(req.block_ids[req.num_sealed:num_full])
            req.num_sealed = num_full
        if not self.enable_prefix_caching:
            return
        parent = req.block_hashes[-1] if req.block_hashes else root_hash(req.cache_salt)
        num_shareable = num_computed_tokens if req.commit_limit is None else min(
            num_computed_tokens, req.commit_limit)
        for i in range(len(req.block_hashes), num_shareable // s):
            chunk_tokens = token_ids[i * s : (i + 1) * s]
            block_hash = chunk_hash(parent, chunk_tokens)
            cached = self.tree.lookup(block_hash)
            if cached is None:
                self.tree.insert(block_hash, parent, chunk_tokens, req.block_ids[i], depth=i)
            else:
                self._acquire(cached.block_id)
                req.adopted[i] = cached.block_id
                self._num_adopters[cached.block_id] = self._num_adopters.get(cached.block_id, 0) + 1
                self._update_peak()  # an adoption is the only way commit adds a reference
            req.block_hashes.append(block_hash)
            if self._in_flight.get(block_hash) == req_id:
                del self._in_flight[block_hash]
            parent = block_hash

    def free(self, req_id: str) -> None:
        """Drop the request (finished, aborted or preempted) and all its references.

        Tail-first, so a prefix's root chunk becomes evictable last and is evicted last.
        """
        req = self._requests.pop(req_id)
        if req.groups is not None:
            req.groups.free(self._access)
            return
        for block_hash in req.in_flight:
            if self._in_flight.get(block_hash) == req_id:
                del self._in_flight[block_hash]
        for i in range(len(req.block_ids) - 1, -1, -1):
            self._release(req.block_ids[i])
            adopted_id = req.adopted.get(i)
            if adopted_id is not None:
                self._release_adopted(adopted_id)

    # -- eviction per group ------------------------------------------------------------------

    def evict(self, req_id: str, group: int, slots: Iterable[int]) -> None:
        """Drop computed slots of one group (indices into its slots, see `num_slots`); their
        memory comes back at `compact`. The request's first eviction forks its table into one
        per group, and from then on it commits nothing to the tree (module docstring). Raises
        ValueError, changing nothing, for a slot that is not computed or already evicted."""
        req = self._req(req_id, group)
        new = set(slots)
        num_slots = self.num_slots(req_id, group)
        evicted = req.groups.evicted[group] if req.groups else set()
        bad = sorted(s for s in new if not 0 <= s < num_slots or s in evicted)
        if bad:
            raise ValueError(f"request {req_id!r} group {group}: cannot evict slots {bad[:8]} "
                             f"(computed slots 0..{num_slots - 1}, {len(evicted)} evicted)")
        if new:
            (req.groups or self._fork(req_id, req)).evicted[group] |= new

    def can_compact(self, req_id: str, group: int) -> bool:
        """Whether `compact` would find the blocks or planes it has to take (only when kept
        tokens are copied out of shared chunks) right now."""
        req = self._req(req_id, group)
        groups = req.groups
        if groups is None:
            return True
        plan = groups.plan(self._access, group, req.num_tokens, req.num_computed)
        return groups.num_fresh(self._access, group, plan.num_new) <= self.num_available_blocks()

    def compact(self, req_id: str, group: int) -> CopyPlan:
        """Move the group's kept tokens (order kept) into the fewest blocks and shrink its
        table; return the row copies for the store to run. Blocks the group no longer lists
        are freed (one-group request), or their plane is (a private block of a many-group
        request becomes split; an owned plane is released); shared chunks only lose this
        group's use. Raises `OutOfBlocksError`, changing nothing, when `can_compact` is False.
        """
        req = self._req(req_id, group)
        groups = req.groups
        if groups is None or not groups.evicted[group]:
            plane = None if req.num_groups == 1 else group
            return CopyPlan(group, plane, [], [], [], self.num_kept_tokens(req_id, group))
        plan = groups.plan(self._access, group, req.num_tokens, req.num_computed)
        if groups.num_fresh(self._access, group, plan.num_new) > self.num_available_blocks():
            raise OutOfBlocksError(
                f"request {req_id!r} group {group}: compaction needs {plan.num_new} new "
                f"entries; {self.pool.num_free_blocks} free + {self.tree.num_evictable} evictable"
            )
        copy_plan = groups.compact(self._access, group, plan, req.num_computed)
        self._update_peak()
        return copy_plan

    # -- cache policy ------------------------------------------------------------------------

    def pin_prefix(self, token_ids: Sequence[int], cache_salt: Optional[str] = None) -> int:
        """Pin the cached full chunks of this prefix so they are never evicted; return tokens.

        Only chunks already cached are pinned (the longest cached run from the first chunk).
        Pins nest: each chunk counts its pins.
        """
        nodes = self._cached_path(token_ids, cache_salt, len(token_ids) // self.block_size)
        for node in nodes:
            self.tree.pin(node)
        return len(nodes) * self.block_size

    def unpin_prefix(self, token_ids: Sequence[int], cache_salt: Optional[str] = None) -> int:
        """Undo one `pin_prefix` of this prefix; return the tokens unpinned.

        Unpins the cached chunks of the prefix from the first one while they are pinned;
        unreferenced chunks become evictable (deepest first, keeping the LRU leaf-first).
        """
        nodes = self._cached_path(token_ids, cache_salt, len(token_ids) // self.block_size)
        pinned = []
        for node in nodes:
            if node.pin_count == 0:
                break
            pinned.append(node)
        for node in reversed(pinned):
            self.tree.unpin(node)
            if node.pin_count == 0 and self.pool.ref_count(node.block_id) == 0:
                self.tree.push_evictable(node.block_id)
        return len(pinned) * self.block_size

    def reset_peak(self) -> None:
        """Restart the peaks from the blocks and planes used now (a benchmark measures one
        run)."""
        self.peak_blocks_used = self.peak_planes_used = 0
        self._update_peak()

    def reset_prefix_cache(self) -> bool:
        """Drop every evictable chunk to the free queue; refuse (False) while any block is used
        or split.

        Pinned chunks stay.
        """
        if self.pool.num_used_blocks > 0 or self.pool.num_split_blocks > 0:
            return False
        evicted = self.tree.evict_all()
        self.pool.release(evicted)
        if self._on_free is not None:
            self._on_free(evicted)
        return True

    # -- helpers -----------------------------------------------------------------------------

    def _req(self, req_id: str, group: Optional[int] = None) -> _RequestBlocks:
        req = self._requests.get(req_id)
        if req is None:
            raise KeyError(f"unknown request {req_id!r} (not started or already freed)")
        if group is not None and not 0 <= group < req.num_groups:
            raise ValueError(f"group {group} out of range for {req.num_groups} groups")
        return req

    def _num_new_blocks(self, req: _RequestBlocks, num_tokens: int) -> int:
        return max(-(-num_tokens // self.block_size) - len(req.block_ids), 0)

    def _take_blocks(self, n: int) -> list[int]:
        """`n` blocks with reference count 1: free ones first, then LRU cached chunks."""
        num_from_free = min(n, self.pool.num_free_blocks)
        new_ids = self.pool.allocate(num_from_free)
        for _ in range(n - num_from_free):
            block_id = self.tree.evict_lru()
            self.pool.incref([block_id])
            self.num_evictions += 1
            new_ids.append(block_id)
        return new_ids

    def _fork(self, req_id: str, req: _RequestBlocks) -> GroupTables:
        """The first eviction: one table per group; in-flight claims dropped (never
        committed now)."""
        for block_hash in req.in_flight:
            if self._in_flight.get(block_hash) == req_id:
                del self._in_flight[block_hash]
        groups = req.groups = GroupTables.fork(req.block_ids, len(req.block_hashes),
                                               req.adopted, req.num_groups, self._access)
        req.in_flight, req.block_ids, req.adopted = [], [], {}
        return groups

    def _match(self, token_ids: Sequence[int], cache_salt: Optional[str]) -> list[ChunkNode]:
        # Cap at len - 1 tokens: the last prompt token is always recomputed to get logits.
        max_chunks = max(len(token_ids) - 1, 0) // self.block_size
        return self._cached_path(token_ids, cache_salt, max_chunks)

    def _cached_path(
        self, token_ids: Sequence[int], cache_salt: Optional[str], max_chunks: int
    ) -> list[ChunkNode]:
        if not self.enable_prefix_caching:
            return []
        nodes = []
        for block_hash in iter_chunk_hashes(token_ids, self.block_size, cache_salt, max_chunks):
            node = self.tree.lookup(block_hash)
            if node is None:
                break
            nodes.append(node)
        return nodes

    def _acquire(self, block_id: int) -> None:
        """Take a reference on a cached chunk (it stops being evictable)."""
        if self.pool.ref_count(block_id) == 0:
            self.tree.remove_evictable(block_id)
        self.pool.incref([block_id])

    def _release(self, block_id: int) -> None:
        """Drop a reference; an unreferenced block becomes evictable, pinned-idle or free."""
        if not self.pool.decref([block_id]):
            return
        node = self.tree.node_of_block(block_id)
        if node is None:
            self.pool.release([block_id])
            if self._on_free is not None:
                self._on_free([block_id])
        elif node.pin_count == 0:
            self.tree.push_evictable(block_id)

    def _release_adopted(self, block_id: int) -> None:
        count = self._num_adopters[block_id] - 1
        if count:
            self._num_adopters[block_id] = count
        else:
            del self._num_adopters[block_id]
        self._release(block_id)

    def _update_peak(self) -> None:
        pool = self.pool
        used = pool.num_used_blocks
        split = pool.num_split_blocks
        if used + split > self.peak_blocks_used:
            self.peak_blocks_used = used + split
        planes = used * pool.num_planes + (pool.num_owned_planes if split else 0)
        if planes > self.peak_planes_used:
            self.peak_planes_used = planes

    def check_integrity(self) -> None:
        """Raise AssertionError naming the first violated invariant (O(blocks + table sizes))."""
        self.pool.check_integrity()
        self.tree.check_integrity()
        kv_integrity.check_tables(self)
        kv_integrity.check_block_states(self)
        assert self.enable_prefix_caching or len(self.tree) == 0, "caching off, tree not empty"
        assert self.enable_prefix_caching or not self._in_flight, "caching off, chunks in flight"
        pool = self.pool
        assert self.peak_blocks_used >= pool.num_used_blocks + pool.num_split_blocks, (
            "peak below current use"
        )
        assert self.peak_planes_used >= pool.num_used_blocks * pool.num_planes + \
            pool.num_owned_planes, "plane peak below current use"
