"""Hypothesis state machine over random KVManager traces (RELIABILITY.md case 9).

Besides `check_integrity()` after every rule, a shadow model simulates what the running model
writes: each slot a request computes gets the key (salt, tokens up to and including it). So we can
check that every running request still reads its own KV (nothing it holds was reused or
overwritten), that shared chunks are never written, and that a chunk's content never changes
(shadow map hash -> content).
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
MAX_RUNNING = 4  # few live requests, so blocks churn between free, cached and used


class _Req:
    def __init__(self, tokens: list[int], salt: Optional[str], num_computed: int) -> None:
        self.tokens = tokens
        self.salt = salt
        self.num_computed = num_computed

    def key(self, pos: int) -> Key:
        return (self.salt, tuple(self.tokens[: pos + 1]))


class KVManagerMachine(RuleBasedStateMachine):
    @initialize(
        num_slots=st.integers(16, 56),
        block_size=st.sampled_from([1, 2, 4]),
        caching=st.sampled_from([True, True, True, False]),
        warm=st.lists(st.integers(0, 1), max_size=16),
    )
    def setup(self, num_slots: int, block_size: int, caching: bool, warm: list[int]) -> None:
        self.m = KVManager(num_slots // block_size, block_size, enable_prefix_caching=caching)
        self.s = block_size
        self.reqs: dict[str, _Req] = {}
        self.next_id = 0
        self.content: dict[int, list[Optional[Key]]] = {}  # block id -> slot keys
        self.chunk_content: dict[bytes, list[Optional[Key]]] = {}  # shadow: hash -> content
        self.prompts: list[list[int]] = [[0, 1, 0, 1, 1, 0, 0, 1]]
        self.pins: list[tuple[list[int], Optional[str]]] = []
        if warm:  # one finished request leaves cached chunks that later prompts extend
            self._start("warm", warm, None)
            self._step("warm", len(warm))
            self.m.free("warm")
            del self.reqs["warm"]

    # -- helpers -----------------------------------------------------------------------------

    def _pick(self, index: int) -> Optional[str]:
        """A running request, or None. Rules are no-ops rather than preconditioned, which
        keeps Hypothesis from discarding traces (preconditions made most of them invalid)."""
        return sorted(self.reqs)[index % len(self.reqs)] if self.reqs else None

    def _start(self, req_id: str, tokens: list[int], salt: Optional[str]) -> None:
        expected = self.m.match_prefix(tokens, salt)
        hit = self.m.start_request(req_id, tokens, salt)
        assert hit == expected
        assert hit % self.s == 0 and hit <= max(len(tokens) - 1, 0)
        if not self.m.enable_prefix_caching:
            assert hit == 0
        assert len(self.m.block_table(req_id)) == hit // self.s
        self.reqs[req_id] = _Req(list(tokens), salt, hit)
        if hit:
            event("prefix hit")

    def _snapshot(self) -> tuple:
        return (
            {r: self.m.block_table(r) for r in self.reqs},
            [self.m.pool.ref_count(b) for b in range(self.m.num_blocks)],
            self.m.pool.free_block_ids(),
            self.m.tree.evictable_block_ids(),
            self.m.stats(),
        )

    # -- rules -------------------------------------------------------------------------------

    @rule(
        tokens=TOKENS,
        salt=SALTS,
        base=st.integers(0, 100),
        cut=st.integers(0, 30),
        num_prefill=st.integers(0, 16),
    )
    def start(
        self, tokens: list[int], salt: Optional[str], base: int, cut: int, num_prefill: int
    ) -> None:
        """Admit a request and prefill up to `num_prefill` tokens (0: it waits a step)."""
        # Two times in three, extend a prefix of an earlier prompt so prefixes collide.
        if base % 3:
            earlier = self.prompts[base % len(self.prompts)]
            tokens = earlier[:cut] + tokens
        req_id = self._admit(tokens, salt)
        self._step(req_id, num_prefill)

    @rule(index=st.integers(0, 100))
    def start_copy(self, index: int) -> None:
        """A new request with a running request's exact tokens (n > 1, or a resent prompt)."""
        req_id = self._pick(index)
        if req_id is not None:
            req = self.reqs[req_id]
            self._admit(list(req.tokens), req.salt)

    def _admit(self, tokens: list[int], salt: Optional[str]) -> str:
        """Start a request; at MAX_RUNNING the oldest one finishes first, so that any trace
        streams requests through the small pool (hits, evictions and duplicates follow)."""
        if len(self.reqs) >= MAX_RUNNING:
            oldest = min(self.reqs, key=lambda r: int(r[1:]))
            self.m.free(oldest)
            del self.reqs[oldest]
        req_id = f"r{self.next_id}"
        self.next_id += 1
        self._start(req_id, tokens, salt)
        return req_id

    @rule(index=st.integers(0, 100), n=st.integers(1, 9))
    def step(self, index: int, n: int) -> None:
        """Schedule up to n more tokens (a prefill chunk or a decode token)."""
        req_id = self._pick(index)
        if req_id is not None:
            self._step(req_id, n)

    @rule(index=st.integers(0, 100), num_tokens=st.integers(0, 3))
    def run_to_end(self, index: int, num_tokens: int) -> None:
        """Finish the prefill, then decode `num_tokens` tokens, then free the request."""
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs[req_id]
        for i in range(num_tokens + 1):
            if i:
                req.tokens.append(i % 2)
            if not self._step(req_id, len(req.tokens)):
                return
        self.free(index)

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
        others = {b for r in self.reqs if r != req_id for b in self.m.block_table(r)}
        old_table = self.m.block_table(req_id)
        num_evictions = self.m.num_evictions
        new_ids = self.m.allocate(req_id, target)
        if self.m.num_evictions > num_evictions:
            event("eviction")
        table = self.m.block_table(req_id)
        assert table == old_table + new_ids
        assert len(table) == -(-target // self.s)
        for b in new_ids:
            assert b not in others and self.m.tree.node_of_block(b) is None
            self.content[b] = [None] * self.s
        for pos in range(req.num_computed, target):  # the model writes KV into the slots
            b = table[pos // self.s]
            assert self.m.tree.node_of_block(b) is None, f"write into shared chunk {b}"
            self.content[b][pos % self.s] = req.key(pos)
        self.m.commit(req_id, req.tokens, target)
        self.prompts.append(req.tokens[:target])  # computed prefixes: later prompts reuse them
        if self.m._num_adopters:
            event("adopted duplicate chunk")
        req.num_computed = target
        return True

    @rule(index=st.integers(0, 100), token=st.integers(0, 1))
    def append_token(self, index: int, token: int) -> None:
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs[req_id]
        if req.num_computed == len(req.tokens):  # sampled from the last logits
            req.tokens.append(token)

    @rule(index=st.integers(0, 100), reset=st.booleans())
    def free(self, index: int, reset: bool = False) -> None:
        """Finish a request; optionally then try `reset_prefix_cache`."""
        req_id = self._pick(index)
        if req_id is not None:
            self.m.free(req_id)
            del self.reqs[req_id]
        if reset:
            in_use = self.m.stats()["num_blocks_used"] > 0
            assert self.m.reset_prefix_cache() == (not in_use)
            if not in_use:
                assert self.m.stats()["num_blocks_cached"] == 0

    @rule(index=st.integers(0, 100))
    def preempt_and_restart(self, index: int) -> None:
        req_id = self._pick(index)
        if req_id is None:
            return
        req = self.reqs.pop(req_id)
        self.m.free(req_id)
        self._start(req_id, req.tokens, req.salt)

    @rule(index=st.integers(0, 100), cut=st.integers(0, 30), salt=SALTS, unpin=st.booleans())
    def pin_or_unpin(self, index: int, cut: int, salt: Optional[str], unpin: bool) -> None:
        """Pin a prefix of an earlier prompt, or undo one earlier pin."""
        if unpin and self.pins:
            tokens, salt = self.pins.pop(index % len(self.pins))
            assert self.m.unpin_prefix(tokens, salt) == len(tokens)
            return
        tokens = self.prompts[index % len(self.prompts)][:cut]
        pinned = self.m.pin_prefix(tokens, salt)
        assert pinned % self.s == 0 and pinned <= len(tokens)
        if pinned:
            event("pinned")
            self.pins.append((tokens[:pinned], salt))

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def integrity(self) -> None:
        self.m.check_integrity()

    @invariant()
    def blocks_add_up(self) -> None:
        s = self.m.stats()
        accounted = s["num_blocks_free"] + s["num_blocks_cached"] + s["num_blocks_used"]
        assert accounted + s["num_blocks_pinned"] == s["num_blocks_total"]
        if not self.pins:
            assert s["num_blocks_pinned"] == 0
        assert s["shared_blocks"] + s["private_blocks"] == s["num_blocks_used"]
        assert s["prefix_hit_tokens"] <= s["prefix_query_tokens"]

    @invariant()
    def requests_read_their_own_kv(self) -> None:
        for req_id, req in self.reqs.items():
            table = self.m.block_table(req_id)
            assert len(set(table)) == len(table)
            for pos in range(req.num_computed):
                slot = self.content[table[pos // self.s]][pos % self.s]
                assert slot == req.key(pos), f"{req_id} reads stale KV at position {pos}"

    @invariant()
    def chunks_are_immutable(self) -> None:
        for b in range(self.m.num_blocks):
            node = self.m.tree.node_of_block(b)
            if node is None:
                continue
            content = self.content[b]
            assert None not in content
            assert tuple(key[1][-1] for key in content) == node.token_ids
            seen = self.chunk_content.setdefault(node.block_hash, list(content))
            assert seen == content, f"chunk in block {b} changed content"


TestKVManagerStateMachine = KVManagerMachine.TestCase
TestKVManagerStateMachine.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
