"""Per-group block tables of a request that evicts tokens, and their pool operations (no tensors).

A request's KV is read through *groups*. A request has `num_groups` of them: 1 (its group covers
every plane, i.e. all layers and KV heads; its entries are whole blocks) or the pool's
`num_planes` = L*K (group g covers plane g = (layer g // K, KV head g % K), `plane_of_group`;
FastGen keeps different tokens per head, Ge et al. 2024, Sec. 3). Until its first eviction a
request has one table that all its groups share (`KVManager`, the dense fast path); `evict`
forks it into a `GroupTables`, one table per group, which this module owns.

Slots. Group g's table covers `num_tokens - num_removed[g]` slots (`num_tokens`: the positions
the request allocated) of which `num_computed - num_removed[g]` hold KV: kept, or evicted but
not yet compacted away (`evicted[g]`). A token computed at position p after the group's last
compaction lives at slot p - num_removed[g]; slot s is row `table[s // S] * S + s % S` of the
group's planes. `compact` packs the kept slots to the front (`kv_compaction`).

Entries. Each entry of a group's table is one of:
- a *shared* chunk: a prefix-tree chunk of the request's committed path (`path_index`), read-only;
- a *private* block: referenced once by the request, listed by every group; when one group of a
  many-group request drops it the block is split (the other groups keep their planes), a
  one-group request frees it;
- a *plane* of a split block that the group owns (many-group requests only). A group grows by
  planes: a free plane of a split block first (freed memory is reused), else a fresh block split.

Composition with prefix sharing: a shared chunk is never mutated or split by one request's
eviction. A group evicting its tokens only drops its own use (compaction copies the kept ones
out); the request holds its one reference on path chunk i while any group lists chunk i or a
deeper one (`num_path_held`, the path frontier), so a parent chunk never becomes evictable
before its child (`PrefixTree` keeps its LRU leaf-first). Adopted chunks (`KVManager`'s
duplicate rule) are held while the frontier covers their position.

Invariants (`check_integrity`; the cross-request ones are in `KVManager.check_integrity`):
- each table lists distinct blocks and has exactly ceil(slots / S) entries; evicted slots are
  computed slots;
- `path_users[i]` is the number of groups listing the request's own chunk i (0 at adopted
  positions); `num_path_held` is 1 + the deepest i with `path_users[i] > 0` (0 if none), and
  `path_index` holds exactly the own chunks above it;
- every entry is shared, private or an owned plane; a private block is listed by all groups
  and referenced once; a one-group request lists no split block.
Not thread-safe: only the engine loop calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvwise.cache.block_pool import BlockPool
from kvwise.cache.kv_compaction import Compaction, CopyPlan, plan_compaction
from kvwise.cache.prefix_tree import PrefixTree


def plane_of_group(group: int, num_kv_heads: int) -> tuple[int, int]:
    """(layer, KV head) of group `group` of a request with one group per plane."""
    return divmod(group, num_kv_heads)


@dataclass(frozen=True)
class PoolAccess:
    """What group operations use of the KV manager: the pool, dense blocks taken (free first,
    then LRU cached chunks) and references dropped (unreferenced chunks stay cached)."""

    pool: BlockPool
    block_size: int
    take_blocks: Callable[[int], list[int]]
    release: Callable[[int], None]
    release_adopted: Callable[[int], None]

    def take_plane(self, plane: int) -> int:
        """A free plane of a split block, else a free block, else an LRU cached chunk, split."""
        if self.pool.num_free_planes_of(plane) or self.pool.num_free_blocks:
            return self.pool.allocate_plane(plane)
        block_id = self.take_blocks(1)[0]
        self.pool.split(block_id, (plane,))
        return block_id


@dataclass
class GroupTables:
    """The forked state of one request: per group its table, removed and evicted slots; the
    request's committed prefix path and how far it is still held."""

    tables: list[list[int]]
    num_removed: list[int]
    evicted: list[set[int]]
    path_block_ids: list[int]  # chunk i of the committed path: own block or adopted chunk
    adopted: set[int]  # path positions whose chunk is adopted (the table has a private copy)
    path_index: dict[int, int]  # own held chunk -> its path position
    path_users: list[int]
    num_path_held: int

    @classmethod
    def fork(cls, block_ids: list[int], num_path: int, adopted: dict[int, int],
             num_groups: int, access: PoolAccess) -> GroupTables:
        """Every group starts with the shared table; the path is held up to its deepest own
        chunk (trailing adopted positions anchor nothing and are released here)."""
        path = [adopted.get(i, block_ids[i]) for i in range(num_path)]
        groups = cls(
            tables=[list(block_ids) for _ in range(num_groups)],
            num_removed=[0] * num_groups,
            evicted=[set() for _ in range(num_groups)],
            path_block_ids=path,
            adopted=set(adopted),
            path_index={block_ids[i]: i for i in range(num_path) if i not in adopted},
            path_users=[0 if i in adopted else num_groups for i in range(num_path)],
            num_path_held=num_path,
        )
        groups._release_frontier(access)
        return groups

    @property
    def num_groups(self) -> int:
        return len(self.tables)

    # -- growth ----------------------------------------------------------------------------

    def num_fresh(self, access: PoolAccess, group: int, n: int) -> int:
        """Blocks (free or evictable) that `n` new entries of one group use up."""
        if self.num_groups == 1:
            return n
        return max(n - access.pool.num_free_planes_of(group), 0)

    def num_fresh_blocks(self, access: PoolAccess, num_tokens: int) -> int:
        """Blocks growing every table to `num_tokens` positions uses up: a fresh block split
        for one group leaves a free plane for each other group, so the worst group's shortfall."""
        needs = self._needs(access.block_size, num_tokens)
        return max((self.num_fresh(access, g, n) for g, n in enumerate(needs)), default=0)

    def allocate(self, access: PoolAccess, num_tokens: int) -> list[int]:
        """Grow every table to cover `num_tokens` positions (the caller checked
        `num_fresh_blocks`); return the blocks newly listed by any group, in order taken."""
        new_ids: dict[int, None] = {}
        for g, n in enumerate(self._needs(access.block_size, num_tokens)):
            if n == 0:
                continue
            taken = (access.take_blocks(n) if self.num_groups == 1
                     else [access.take_plane(g) for _ in range(n)])
            self.tables[g].extend(taken)
            new_ids.update(dict.fromkeys(taken))
        return list(new_ids)

    def _needs(self, block_size: int, num_tokens: int) -> list[int]:
        return [max(-(-(num_tokens - r) // block_size) - len(t), 0)
                for t, r in zip(self.tables, self.num_removed)]

    # -- compaction ------------------------------------------------------------------------

    def plan(self, access: PoolAccess, group: int, num_tokens: int, num_computed: int
             ) -> Compaction:
        return plan_compaction(self.tables[group], self.evicted[group],
                               num_tokens - self.num_removed[group],
                               num_computed - self.num_removed[group], access.block_size,
                               lambda b: b not in self.path_index)

    def compact(self, access: PoolAccess, group: int, plan: Compaction, num_computed: int
                ) -> CopyPlan:
        """Carry out `plan` (the caller checked its `num_new` entries fit): take the new
        entries, drop the old ones tail first, retreat the path frontier."""
        plane = None if self.num_groups == 1 else group
        table: list[int] = []
        new_ids = []
        for b in plan.new_table:
            if b is None:
                b = access.take_blocks(1)[0] if plane is None else access.take_plane(group)
                new_ids.append(b)
            table.append(b)
        s = access.block_size
        copies = [(src, table[e] * s + offset) for src, e, offset in plan.moves]
        for b in reversed(plan.dropped):
            self._drop(access, group, b)
        self._release_frontier(access)
        self.tables[group] = table
        self.num_removed[group] += plan.num_evicted
        self.evicted[group] = set()
        return CopyPlan(group, plane, copies, list(plan.dropped), new_ids,
                        num_computed - self.num_removed[group])

    # -- release ---------------------------------------------------------------------------

    def free(self, access: PoolAccess) -> None:
        """Drop everything: planes group by group, tail first; then private blocks (tail first
        in group 0's order); then the held path, deepest first."""
        private = []
        for g, table in enumerate(self.tables):
            for block_id in reversed(table):
                if block_id in self.path_index:
                    self.path_users[self.path_index[block_id]] -= 1
                elif access.pool.is_split(block_id):
                    access.pool.release_plane(block_id, g)
                elif g == 0:
                    private.append(block_id)
        for block_id in private:
            access.release(block_id)
        self._release_frontier(access)

    def _drop(self, access: PoolAccess, group: int, block_id: int) -> None:
        """The group stops listing `block_id` (call `_release_frontier` after)."""
        if block_id in self.path_index:
            self.path_users[self.path_index[block_id]] -= 1
        elif access.pool.is_split(block_id):
            access.pool.release_plane(block_id, group)
        elif self.num_groups == 1:
            access.release(block_id)
        else:  # a private block: the other groups keep their planes
            access.pool.split(block_id, [p for p in range(access.pool.num_planes) if p != group])

    def _release_frontier(self, access: PoolAccess) -> None:
        """Retreat the held path past positions no group lists any more, deepest first. A
        released chunk leaves `path_index`: the block may come back later as a new entry."""
        while self.num_path_held and self.path_users[self.num_path_held - 1] == 0:
            i = self.num_path_held = self.num_path_held - 1
            block_id = self.path_block_ids[i]
            if i in self.adopted:
                access.release_adopted(block_id)
            else:
                del self.path_index[block_id]
                access.release(block_id)

    # -- integrity -------------------------------------------------------------------------

    def check_integrity(self, req_id: str, pool: BlockPool, tree: PrefixTree,
                        block_hashes: list[bytes], num_tokens: int, num_computed: int) -> None:
        """The per-request invariants of the module docstring; held path chunk i is the tree's
        chunk `block_hashes[i]`."""
        num_groups = self.num_groups
        block_size = tree.block_size
        private_counts: dict[int, int] = {}
        users = [0] * len(self.path_block_ids)
        for g, table in enumerate(self.tables):
            slots = num_tokens - self.num_removed[g]
            assert len(table) == -(-slots // block_size), (
                f"{req_id} group {g}: {len(table)} entries for {slots} slots"
            )
            assert len(set(table)) == len(table), f"{req_id} group {g}: repeated blocks"
            done = num_computed - self.num_removed[g]
            assert all(0 <= s < done for s in self.evicted[g]), f"{req_id} group {g}: evicted"
            for b in table:
                if b in self.path_index:
                    users[self.path_index[b]] += 1
                    assert tree.node_of_block(b) is not None, f"{req_id}: shared {b} not cached"
                elif pool.is_split(b):
                    assert num_groups > 1, f"{req_id}: one-group request lists split {b}"
                    assert g in pool.owned_planes(b), f"{req_id} group {g}: plane of {b}"
                else:
                    assert tree.node_of_block(b) is None, f"{req_id}: private {b} is cached"
                    private_counts[b] = private_counts.get(b, 0) + 1
        for b, count in private_counts.items():
            assert count == num_groups, f"{req_id}: private {b} listed by {count} groups"
            assert pool.ref_count(b) == 1, f"{req_id}: private {b} has refs {pool.ref_count(b)}"
        assert users == self.path_users, f"{req_id}: path users {self.path_users} != {users}"
        deepest = max((i + 1 for i, u in enumerate(users) if u), default=0)
        assert self.num_path_held == deepest, (
            f"{req_id}: path held to {self.num_path_held}, deepest use {deepest}"
        )
        own = {i for i in range(self.num_path_held) if i not in self.adopted}
        assert sorted(self.path_index.values()) == sorted(own), f"{req_id}: stale path index"
        assert all(self.path_block_ids[i] == b for b, i in self.path_index.items()), (
            f"{req_id}: path index names the wrong blocks"
        )
        for i in range(self.num_path_held):
            node = tree.lookup(block_hashes[i])
            assert node is not None and node.block_id == self.path_block_ids[i], (
                f"{req_id}: held chunk {i} is not block {self.path_block_ids[i]}"
            )

    def count_holdings(self, pool: BlockPool, expected_refs: list[int], adopters: dict[int, int],
                       listed_planes: dict[int, set[int]]) -> None:
        """Add this request's holdings to the manager's tallies: one reference per private
        block (whatever number of groups list it) and per held path chunk (adoptions counted
        too), and the planes its groups list of each split block."""
        private = set()
        for g, table in enumerate(self.tables):
            for b in table:
                if pool.is_split(b):
                    planes = listed_planes.setdefault(b, set())
                    assert g not in planes, f"plane {g} of block {b} listed twice"
                    planes.add(g)
                elif b not in self.path_index:
                    private.add(b)
        for b in private:
            expected_refs[b] += 1
        for i in range(self.num_path_held):
            b = self.path_block_ids[i]
            expected_refs[b] += 1
            if i in self.adopted:
                adopters[b] = adopters.get(b, 0) + 1
