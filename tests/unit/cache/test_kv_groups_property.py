"""Hypothesis state machine over KVManager traces with per-group eviction and compaction.

Besides `check_integrity()` after every rule, a shadow store simulates the KV tensors per
(block, plane): each slot a group computes gets the key (salt, tokens up to and including it),
written only into the planes the group covers (all of them for a one-group request, plane g for
group g of a many-group one); each `CopyPlan` is executed on it (gather, then scatter). So we
check that every group of every running request reads exactly the tokens it kept, in order,
that no write or copy lands in a shared chunk or in a plane another group owns, that a chunk's
content never changes, and that a request commits nothing to the tree after its first eviction.
"""

from __future__ import annotations

from typing import Optional

import hypothesis.strategies as st
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvwise.cache.kv_manager import KVManager
from tests.unit.cache.refusals import assert_refused_unchanged

Key = tuple[Optional[str], tuple[int, ...]]

TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=14)
SALTS = st.sampled_from([None, None, "tenant"])
MAX_RUNNING = 3


class _Req:
    def __init__(self, tokens: list[int], salt: Optional[str], num_computed: int,
                 num_groups: int) -> None:
        self.tokens = tokens
        self.salt = salt
        self.num_computed = num_computed
        self.num_groups = num_groups
        # per group: the position of each computed slot (evicted ones included until compacted)
        self.slot_pos = [list(range(num_computed)) for _ in range(num_groups)]
        self.evicted: list[set[int]] = [set() for _ in range(num_groups)]
        self.forked = False

    def key(self, pos: int) -> Key:
        return (self.salt, tuple(self.tokens[: pos + 1]))


class KVGroupsMachine(RuleBasedStateMachine):
    @initialize(
        num_slots=st.integers(16, 48),
        block_size=st.sampled_from([1, 2, 4]),
        num_planes=st.sampled_from([2, 3, 4]),
        caching=st.sampled_from([True, False]),
        warm=st.lists(st.integers(0, 1), max_size=12),
    )
    def setup(self, num_slots: int, block_size: int, num_planes: int, caching: bool,
              warm: list[int]) -> None:
        self.m = KVManager(num_slots // block_size, block_size, enable_prefix_caching=caching,
                           num_planes=num_planes)
        self.s = block_size
        self.p = num_planes
        self.reqs: dict[str, _Req] = {}
        self.next_id = 0
        self.store: dict[tuple[int, int], list[Optional[Key]]] = {}  # (block, plane) -> slots
        self.chunk_content: dict[bytes, list[list[Optional[Key]]]] = {}
        self.prompts: list[list[int]] = [[0, 1, 0, 1, 1, 0, 0, 1]]
        self.pins: list[tuple[list[int], Optional[str]]] = []
        if warm:  # a finished request leaves cached chunks that later prompts hit
            self._start("warm", warm, None, 1)
            self._step("warm", len(warm))
            self.m.free("warm")
            del self.reqs["warm"]
        for grouped in (True, False):  # two running requests from the start
            self._step(self._admit(warm + [1, 0, 0, 1], None, grouped), 16)

    # -- helpers -----------------------------------------------------------------------------

    def _pick(self, index: int) -> Optional[str]:
        return sorted(self.reqs)[index % len(self.reqs)] if self.reqs else None

    def _planes(self, req: _Req, group: int) -> list[int]:
        return list(range(self.p)) if req.num_groups == 1 else [group]

    def _rows(self, block_id: int, plane: int) -> list[Optional[Key]]:
        return self.store.setdefault((block_id, plane), [None] * self.s)

    def _start(self, req_id: str, tokens: list[int], salt: Optional[str], num_groups: int) -> None:
        hit = self.m.start_request(req_id, tokens, salt, num_groups=num_groups)
        assert hit % self.s == 0 and hit <= max(len(tokens) - 1, 0)
        self.reqs[req_id] = _Req(list(tokens), salt, hit, num_groups)
        if hit:
            event("prefix hit")

    def _admit(self, tokens: list[int], salt: Optional[str], grouped: bool) -> str:
        if len(self.reqs) >= MAX_RUNNING:
            oldest = min(self.reqs, key=lambda r: int(r[1:]))
            self.m.free(oldest)
            del self.reqs[oldest]
        req_id = f"r{self.next_id}"
        self.next_id += 1
        self._start(req_id, tokens, salt, self.p if grouped else 1)
        return req_id

    def _snapshot(self) -> tuple:
        m = self.m
        return (
            {r: m.block_tables(r) for r in self.reqs},
            [m.pool.ref_count(b) for b in range(m.num_blocks)],
            [sorted(m.pool.owned_planes(b)) for b in range(m.num_blocks)],
            m.pool.free_block_ids(),
            [m.pool.free_plane_block_ids(p) for p in range(self.p)],
            m.tree.evictable_block_ids(),
            m.stats(),
        )

    def _check_writable(self, req: _Req, group: int, block_id: int) -> None:
        """A group writes only private blocks or planes it owns, never a shared chunk."""
        assert self.m.tree.node_of_block(block_id) is None, f"write into shared chunk {block_id}"
        if self.m.pool.is_split(block_id):
            assert req.num_groups > 1 and group in self.m.pool.owned_planes(block_id)
        else:
            assert self.m.pool.ref_count(block_id) == 1, f"write into shared block {block_id}"

    def _step(self, req_id: str, n: int) -> bool:
        """Compute up to n more tokens of the request; False if the pool was too small."""
        req = self.reqs[req_id]
        target = min(req.num_computed + n, len(req.tokens))
        if target == req.num_computed:
            return True
        if not self.m.can_allocate(req_id, target):
            assert_refused_unchanged(self._snapshot, lambda: self.m.allocate(req_id, target),
                                     "allocate")
            event("out of blocks")
            return False
        free_planes = self.m.pool.num_free_planes
        self.m.allocate(req_id, target)
        if self.m.pool.num_free_planes < free_planes:
            event("allocation reused a freed plane")
        tables = self.m.block_tables(req_id)
        for g in range(req.num_groups):
            assert self.m.num_slots(req_id, g) == len(req.slot_pos[g])
            for pos in range(req.num_computed, target):  # the model writes the new KV
                slot = len(req.slot_pos[g])
                block_id = tables[g][slot // self.s]
                self._check_writable(req, g, block_id)
                for plane in self._planes(req, g):
                    self._rows(block_id, plane)[slot % self.s] = req.key(pos)
                req.slot_pos[g].append(pos)
        num_chunks = len(self.m.tree)
        self.m.commit(req_id, req.tokens, target)
        if req.forked:
            assert len(self.m.tree) == num_chunks, "a compressed request committed a chunk"
        else:
            self.prompts.append(req.tokens[:target])
        req.num_computed = target
        return True

    def _evict(self, req_id: str, group: int, slots: set[int]) -> None:
        req = self.reqs[req_id]
        self.m.evict(req_id, group, slots)
        req.evicted[group] |= slots
        if slots:
            req.forked = True
            event("evict")

    def _compact(self, req_id: str, group: int) -> None:
        req = self.reqs[req_id]
        if not self.m.can_compact(req_id, group):
            assert_refused_unchanged(self._snapshot, lambda: self.m.compact(req_id, group),
                                     "compact")
            event("compaction out of blocks")
            return
        plan = self.m.compact(req_id, group)
        if plan.new_block_ids:
            event("compaction copied out of a shared chunk")
        s = self.s
        dst_blocks = {dst // s for _, dst in plan.copies}
        for block_id in dst_blocks:
            self._check_writable(req, group, block_id)
        assert len(plan.dst_rows) == len(set(plan.dst_rows)), "a row written twice"
        for plane in self._planes(req, group):  # gather, then scatter
            values = [self._rows(src // s, plane)[src % s] for src in plan.src_rows]
            for dst, value in zip(plan.dst_rows, values):
                self._rows(dst // s, plane)[dst % s] = value
        kept = [p for i, p in enumerate(req.slot_pos[group]) if i not in req.evicted[group]]
        req.slot_pos[group] = kept
        req.evicted[group] = set()
        assert plan.num_kept_tokens == len(kept)
        # every step here allocates exactly what it computes: the fewest blocks for `kept`
        assert len(self.m.block_tables(req_id)[group]) == -(-len(kept) // s)

    # -- rules -------------------------------------------------------------------------------

    @rule(tokens=TOKENS, salt=SALTS, base=st.integers(0, 100), cut=st.integers(0, 30),
          num_prefill=st.integers(0, 16), grouped=st.booleans())
    def start(self, tokens: list[int], salt: Optional[str], base: int, cut: int,
              num_prefill: int, grouped: bool) -> None:
        """Admit a request (2 in 3 extend an earlier prompt, so prefixes hit) and prefill."""
        if base % 3:
            tokens = self.prompts[base % len(self.prompts)][:cut] + tokens
        req_id = self._admit(tokens, salt, grouped)
        self._step(req_id, num_prefill)

    @rule(index=st.integers(0, 100), grouped=st.booleans())
    def start_copy(self, index: int, grouped: bool) -> None:
        """A new request with a running request's tokens (its computed chunks may hit)."""
        req_id = self._pick(index)
        if req_id is not None:
            req = self.reqs[req_id]
            self._step(self._admit(list(req.tokens), req.salt, grouped), 16)

    @rule(index=st.integers(0, 100), n=st.integers(1, 9))
    def step(self, index: int, n: int) -> None:
        req_id = self._pick(index)
        if req_id is not None:
            self._step(req_id, n)

    @rule(index=st.integers(0, 100), token=st.integers(0, 1))
    def append_token(self, index: int, token: int) -> None:
        req_id = self._pick(index)
        if req_id is not None and self.reqs[req_id].num_computed == len(self.reqs[req_id].tokens):
            self.reqs[req_id].tokens.append(token)

    @rule(index=st.integers(0, 100), group=st.integers(0, 7), picks=st.lists(st.integers(0, 60),
          max_size=8), pattern=st.sampled_from(["random", "window", "all_but_last"]),
          sink=st.integers(0, 3), window=st.integers(0, 6), compact=st.booleans())
    def evict(self, index: int, group: int, picks: list[int], pattern: str, sink: int,
              window: int, compact: bool) -> None:
        """Evict slots of one group (random ones, a sink + window pattern, or all but the
        last), then maybe compact it."""
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs[req_id]
        g = group % req.num_groups
        live = [i for i in range(len(req.slot_pos[g])) if i not in req.evicted[g]]
        if not live:
            return
        if pattern == "random":
            slots = {live[i % len(live)] for i in picks}
        elif pattern == "window":
            slots = set(live[sink:max(len(live) - window, sink)])
        else:
            slots = set(live[:-1])
        self._evict(req_id, g, slots)
        if compact:
            self._compact(req_id, g)

    @rule(index=st.integers(0, 100), sink=st.integers(0, 3), window=st.integers(1, 6))
    def stream_all_groups(self, index: int, sink: int, window: int) -> None:
        """The streaming policy: every group keeps `sink` first and `window` last tokens."""
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs[req_id]
        for g in range(req.num_groups):
            live = [i for i in range(len(req.slot_pos[g])) if i not in req.evicted[g]]
            self._evict(req_id, g, set(live[sink:max(len(live) - window, sink)]))
            self._compact(req_id, g)

    @rule(index=st.integers(0, 100), group=st.integers(0, 7), num_evicted=st.integers(1, 8),
          num_decoded=st.integers(1, 6))
    def evict_then_decode(self, index: int, group: int, num_evicted: int,
                          num_decoded: int) -> None:
        """One group drops its oldest tokens and compacts, then the request decodes (so the
        groups' tables cross block boundaries at different times and reuse freed planes)."""
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs[req_id]
        g = group % req.num_groups
        live = [i for i in range(len(req.slot_pos[g])) if i not in req.evicted[g]]
        self._evict(req_id, g, set(live[:num_evicted]))
        self._compact(req_id, g)
        self._step(req_id, len(req.tokens))  # finish the prefill first
        for i in range(num_decoded):
            if req.num_computed < len(req.tokens):
                return
            req.tokens.append(i % 2)
            if not self._step(req_id, 1):
                return

    @rule(index=st.integers(0, 100), group=st.integers(0, 7))
    def compact(self, index: int, group: int) -> None:
        req_id = self._pick(index)
        if req_id is not None:
            self._compact(req_id, group % self.reqs[req_id].num_groups)

    @rule(index=st.integers(0, 100), reset=st.booleans())
    def free(self, index: int, reset: bool) -> None:
        """Finish a request (one keeps running: admission frees the oldest anyway), then maybe
        try `reset_prefix_cache`."""
        req_id = self._pick(index)
        if req_id is not None and len(self.reqs) > 1:
            self.m.free(req_id)
            del self.reqs[req_id]
        if reset:
            in_use = self.m.pool.num_used_blocks + self.m.pool.num_split_blocks > 0
            assert self.m.reset_prefix_cache() == (not in_use)

    @rule(index=st.integers(0, 100))
    def preempt_and_restart(self, index: int) -> None:
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs.pop(req_id)
        self.m.free(req_id)
        self._start(req_id, req.tokens, req.salt, req.num_groups)

    @rule(index=st.integers(0, 100), cut=st.integers(0, 30), salt=SALTS, unpin=st.booleans())
    def pin_or_unpin(self, index: int, cut: int, salt: Optional[str], unpin: bool) -> None:
        if unpin and self.pins:
            tokens, salt = self.pins.pop(index % len(self.pins))
            assert self.m.unpin_prefix(tokens, salt) == len(tokens)
            return
        tokens = self.prompts[index % len(self.prompts)][:cut]
        pinned = self.m.pin_prefix(tokens, salt)
        if pinned:
            self.pins.append((tokens[:pinned], salt))

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def integrity(self) -> None:
        self.m.check_integrity()

    @invariant()
    def planes_add_up(self) -> None:
        s = self.m.stats()
        p = s["num_planes_per_block"]
        blocks = (s["num_blocks_free"] + s["num_blocks_cached"] + s["num_blocks_pinned"]
                  + s["num_blocks_used"] + s["num_blocks_split"])
        assert blocks == s["num_blocks_total"]
        idle = s["num_blocks_free"] + s["num_blocks_cached"] + s["num_blocks_pinned"]
        assert s["num_planes_used"] + s["num_planes_free"] + idle * p == s["num_blocks_total"] * p
        assert s["peak_planes_used"] >= s["num_planes_used"]
        if s["num_blocks_split"]:
            event("split blocks")
        if s["num_planes_free"]:
            event("free planes")

    @invariant()
    def groups_read_what_they_kept(self) -> None:
        for req_id, req in self.reqs.items():
            tables = self.m.block_tables(req_id)
            assert len(tables) == req.num_groups
            for g in range(req.num_groups):
                assert self.m.num_slots(req_id, g) == len(req.slot_pos[g])
                assert self.m.num_kept_tokens(req_id, g) == \
                    len(req.slot_pos[g]) - len(req.evicted[g])
                assert self.m.evicted_slots(req_id, g) == sorted(req.evicted[g])
                for slot, pos in enumerate(req.slot_pos[g]):
                    if slot in req.evicted[g]:
                        continue
                    block_id = tables[g][slot // self.s]
                    for plane in self._planes(req, g):
                        got = self._rows(block_id, plane)[slot % self.s]
                        assert got == req.key(pos), f"{req_id} group {g} slot {slot} is stale"

    @invariant()
    def chunks_are_immutable(self) -> None:
        for b in range(self.m.num_blocks):
            node = self.m.tree.node_of_block(b)
            if node is None:
                continue
            content = [list(self._rows(b, p)) for p in range(self.p)]
            for rows in content:
                assert None not in rows
                assert tuple(key[1][-1] for key in rows) == node.token_ids
            seen = self.chunk_content.setdefault(node.block_hash, content)
            assert seen == content, f"chunk in block {b} changed content"


TestKVGroupsStateMachine = KVGroupsMachine.TestCase
TestKVGroupsStateMachine.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
