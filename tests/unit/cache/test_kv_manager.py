"""KVManager bookkeeping with exact block ids, ref counts, queue order and hit lengths.

block_size is 4 throughout so chunk boundaries are easy to read: tokens [0:4] are chunk 0, etc.
"""

from __future__ import annotations

import pytest

from kvwise.cache.kv_manager import KVManager
from kvwise.errors import OutOfBlocksError

S = 4


def make(num_blocks: int, caching: bool = True) -> KVManager:
    return KVManager(num_blocks, S, enable_prefix_caching=caching)


def refs(m: KVManager) -> list[int]:
    return [m.pool.ref_count(b) for b in range(m.num_blocks)]


def snapshot(m: KVManager) -> tuple:
    tables = {r: m.block_table(r) for r in m._requests}
    return (
        tables,
        refs(m),
        m.pool.free_block_ids(),
        m.tree.evictable_block_ids(),
        m.stats(),
    )


def run_prompt(m: KVManager, req_id: str, tokens: list[int]) -> int:
    """start + allocate + commit the whole prompt in one step; return the hit length."""
    hit = m.start_request(req_id, tokens)
    m.allocate(req_id, len(tokens))
    m.commit(req_id, tokens, len(tokens))
    m.check_integrity()
    return hit


def test_prompt_ending_mid_chunk_then_decode() -> None:
    m = make(8)
    prompt = list(range(10))  # chunks [0..3], [4..7], tail [8, 9]
    assert m.start_request("a", prompt) == 0
    assert m.allocate("a", 10) == [0, 1, 2]
    m.commit("a", prompt, 10)
    m.check_integrity()
    assert m.stats()["num_blocks_used"] == 3
    assert m.match_prefix(prompt) == 8
    assert m.match_prefix(prompt[:9]) == 8
    assert m.match_prefix(prompt[:8]) == 4  # never the whole prompt: last token recomputed
    assert m.match_prefix(prompt[:5]) == 4
    assert m.match_prefix(prompt[:4]) == 0

    tokens = prompt + [100]
    assert m.allocate("a", 11) == []  # fits in the private tail block 2
    m.commit("a", tokens, 11)
    tokens += [101]
    m.commit("a", tokens, 12)  # block 2 is full: it becomes a chunk
    assert m.match_prefix(tokens + [102]) == 12
    assert m.allocate("a", 13) == [3]
    m.check_integrity()

    m.free("a")  # tail-first: 3 is private -> free queue; 2, 1, 0 -> LRU
    m.check_integrity()
    assert m.pool.free_block_ids() == [4, 5, 6, 7, 3]
    assert m.tree.evictable_block_ids() == [2, 1, 0]
    assert refs(m) == [0] * 8
    s = m.stats()
    assert (s["num_blocks_free"], s["num_blocks_cached"], s["num_blocks_used"]) == (5, 3, 0)
    assert s["peak_blocks_used"] == 4


def test_two_requests_share_a_prefix() -> None:
    m = make(10)
    a = list(range(1, 11))  # 10 tokens
    b = list(range(1, 9)) + [50, 51, 52]  # same first two chunks
    assert run_prompt(m, "a", a) == 0
    assert m.block_table("a") == [0, 1, 2]

    assert m.start_request("b", b) == 8
    assert m.block_table("b") == [0, 1]
    assert refs(m)[:3] == [2, 2, 1]
    assert m.allocate("b", 11) == [3]
    m.commit("b", b, 11)
    m.check_integrity()
    assert m.shared_block_ids() == {0, 1}
    s = m.stats()
    assert (s["num_blocks_used"], s["shared_blocks"], s["private_blocks"]) == (4, 2, 2)
    assert (s["prefix_query_tokens"], s["prefix_hit_tokens"]) == (21, 8)

    m.free("a")
    m.check_integrity()
    assert refs(m)[:4] == [1, 1, 0, 1]
    assert m.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 2]
    assert m.tree.evictable_block_ids() == []
    assert m.shared_block_ids() == set()

    m.free("b")
    m.check_integrity()
    assert m.pool.free_block_ids() == [4, 5, 6, 7, 8, 9, 2, 3]
    assert m.tree.evictable_block_ids() == [1, 0]


def test_preempt_then_restart_finds_its_own_chunks() -> None:
    m = make(6)
    prompt = [10, 11, 12, 13, 14, 15]
    assert run_prompt(m, "a", prompt) == 0
    assert m.block_table("a") == [0, 1]
    tokens = prompt + [20, 21]
    m.commit("a", tokens, 8)  # two decode steps fill block 1
    tokens += [22]
    assert m.allocate("a", 9) == [2]
    m.commit("a", tokens, 9)

    m.free("a")  # preempted (recompute)
    m.check_integrity()
    assert m.pool.free_block_ids() == [3, 4, 5, 2]
    assert m.tree.evictable_block_ids() == [1, 0]

    assert m.start_request("a", tokens) == 8  # prompt + generated tokens
    assert m.block_table("a") == [0, 1]
    assert m.tree.evictable_block_ids() == []
    assert m.allocate("a", 9) == [3]
    m.commit("a", tokens, 9)
    m.check_integrity()
    assert m.stats()["prefix_hit_tokens"] == 8


def test_fully_cached_prompt_recomputes_last_chunk_and_adopts_it() -> None:
    m = make(6)
    p = list(range(1, 9))  # exactly two chunks
    run_prompt(m, "a", p)
    m.free("a")
    assert m.tree.evictable_block_ids() == [1, 0]

    assert m.start_request("b", p) == 4  # capped: chunk 1 is recomputed for the logits
    assert m.block_table("b") == [0]
    assert m.allocate("b", 8) == [2]
    m.commit("b", p, 8)  # chunk 1 already cached as block 1: block 2 stays private
    m.check_integrity()
    assert m.block_table("b") == [0, 2]
    assert refs(m) == [1, 1, 1, 0, 0, 0]  # block 1 is adopted by b
    assert m.tree.evictable_block_ids() == []
    assert m.tree.node_of_block(2) is None

    tokens = p + [9, 10, 11, 12]
    assert m.allocate("b", 12) == [3]
    m.commit("b", tokens, 12)  # chunk 2 hangs off the adopted chunk (block 1)
    m.check_integrity()
    assert m.tree.node_of_block(3).parent_hash == m.tree.node_of_block(1).block_hash

    assert m.start_request("c", tokens + [13]) == 12
    assert m.block_table("c") == [0, 1, 3]
    assert refs(m) == [2, 2, 1, 2, 0, 0]
    assert m.shared_block_ids() == {0, 3}  # block 1: one table + one adoption
    m.check_integrity()

    m.free("b")
    m.check_integrity()
    assert refs(m) == [1, 1, 0, 1, 0, 0]
    assert m.pool.free_block_ids() == [4, 5, 2]
    m.free("c")
    m.check_integrity()
    assert m.tree.evictable_block_ids() == [3, 1, 0]


def test_same_prefix_computed_twice_in_one_step() -> None:
    m = make(8)
    p = list(range(1, 10))  # 9 tokens: two chunks + 1
    assert m.start_request("a", p) == 0
    assert m.start_request("b", p) == 0  # neither is cached yet
    assert m.allocate("a", 9) == [0, 1, 2]
    assert m.allocate("b", 9) == [3, 4, 5]
    m.commit("a", p, 9)
    m.commit("b", p, 9)  # duplicates: b keeps 3, 4 private and adopts 0, 1
    m.check_integrity()
    assert refs(m) == [2, 2, 1, 1, 1, 1, 0, 0]
    assert m.shared_block_ids() == set()
    s = m.stats()
    assert (s["num_blocks_used"], s["shared_blocks"], s["private_blocks"]) == (6, 0, 6)

    tokens = p + [10, 11, 12]
    m.commit("b", tokens, 12)  # block 5 fills: child of block 1
    m.check_integrity()
    m.free("a")
    m.check_integrity()
    assert refs(m) == [1, 1, 0, 1, 1, 1, 0, 0]
    assert m.pool.free_block_ids() == [6, 7, 2]
    m.free("b")
    m.check_integrity()
    assert m.pool.free_block_ids() == [6, 7, 2, 4, 3]
    assert m.tree.evictable_block_ids() == [5, 1, 0]
    assert m.start_request("c", tokens + [13]) == 12
    assert m.block_table("c") == [0, 1, 5]


def test_eviction_is_lru_and_a_hit_refreshes() -> None:
    m = make(6)
    a = list(range(1, 10))  # 9 tokens: chunks in blocks 0, 1
    b = list(range(11, 20))
    run_prompt(m, "a", a)
    m.free("a")
    assert m.pool.free_block_ids() == [3, 4, 5, 2]
    assert m.tree.evictable_block_ids() == [1, 0]
    run_prompt(m, "b", b)
    assert m.block_table("b") == [3, 4, 5]
    m.free("b")
    assert m.pool.free_block_ids() == [2, 5]
    assert m.tree.evictable_block_ids() == [1, 0, 4, 3]

    assert m.start_request("d", a) == 8  # a's chunks are used again: most recent now
    m.free("d")
    m.check_integrity()
    assert m.tree.evictable_block_ids() == [4, 3, 1, 0]

    c = list(range(21, 34))  # 13 tokens: 4 blocks
    assert m.start_request("c", c) == 0
    assert m.allocate("c", 13) == [2, 5, 4, 3]  # free first, then LRU: b's chunks go
    m.check_integrity()
    assert m.stats()["num_evictions"] == 2
    assert m.tree.evictable_block_ids() == [1, 0]
    assert m.match_prefix(b) == 0
    assert m.match_prefix(a) == 8
    assert m.can_allocate("c", 20)
    assert not m.can_allocate("c", 25)


def test_out_of_blocks_leaves_state_unchanged() -> None:
    m = make(4)
    run_prompt(m, "a", list(range(1, 10)))
    m.free("a")
    m.start_request("b", list(range(50, 70)))
    m.allocate("b", 4)
    before = snapshot(m)
    assert not m.can_allocate("b", 17)
    with pytest.raises(OutOfBlocksError):
        m.allocate("b", 17)
    assert snapshot(m) == before
    m.check_integrity()
    assert m.can_allocate("b", 16)
    assert m.allocate("b", 16) == [2, 1, 0]


def test_pinned_prefix_is_never_evicted() -> None:
    m = make(4)
    a = list(range(1, 10))
    run_prompt(m, "a", a)
    m.free("a")
    assert m.pool.free_block_ids() == [3, 2]
    assert m.pin_prefix(a[:8]) == 8
    assert m.pin_prefix([99] * 8) == 0  # nothing cached: nothing pinned
    m.check_integrity()
    assert m.tree.evictable_block_ids() == []
    s = m.stats()
    assert (s["num_blocks_free"], s["num_blocks_cached"], s["num_blocks_pinned"]) == (2, 0, 2)

    m.start_request("b", list(range(50, 66)))
    assert not m.can_allocate("b", 9)
    with pytest.raises(OutOfBlocksError):
        m.allocate("b", 16)
    assert m.allocate("b", 8) == [3, 2]
    m.check_integrity()

    # A pinned chunk can be hit; when released it goes back to pinned, not to the LRU.
    assert m.start_request("c", a) == 8
    assert refs(m) == [1, 1, 1, 1]
    m.free("c")
    assert m.tree.evictable_block_ids() == []
    m.check_integrity()

    assert m.unpin_prefix(a[:8]) == 8
    assert m.unpin_prefix(a[:8]) == 0  # nothing left pinned
    m.check_integrity()
    assert m.tree.evictable_block_ids() == [1, 0]  # deepest first
    assert m.allocate("b", 12) == [1]
    assert m.stats()["num_evictions"] == 1
    m.check_integrity()


def test_pins_nest() -> None:
    m = make(4)
    a = list(range(1, 10))
    run_prompt(m, "a", a)
    m.free("a")
    assert m.pin_prefix(a[:4]) == 4
    assert m.pin_prefix(a) == 8
    assert m.tree.evictable_block_ids() == []
    assert m.unpin_prefix(a) == 8  # chunk 0 still pinned once
    assert m.tree.evictable_block_ids() == [1]
    m.check_integrity()
    assert m.unpin_prefix(a[:4]) == 4
    assert m.tree.evictable_block_ids() == [1, 0]
    m.check_integrity()


def test_reset_prefix_cache() -> None:
    m = make(6)
    a = list(range(1, 10))
    run_prompt(m, "a", a)
    assert not m.reset_prefix_cache()  # blocks in use
    m.free("a")
    run_prompt(m, "b", list(range(20, 29)))
    m.free("b")
    m.pin_prefix(a[:4])
    assert m.tree.evictable_block_ids() == [1, 4, 3]
    assert m.reset_prefix_cache()
    m.check_integrity()
    assert m.tree.evictable_block_ids() == []
    assert m.pool.free_block_ids() == [2, 5, 1, 4, 3]
    assert m.match_prefix(a) == 4  # the pinned chunk stays
    assert m.match_prefix(list(range(20, 29))) == 0


def test_cache_salt_isolates_tenants() -> None:
    m = make(8)
    a = list(range(1, 10))
    assert m.start_request("a", a, cache_salt="t1") == 0
    m.allocate("a", 9)
    m.commit("a", a, 9)
    m.free("a")
    assert m.match_prefix(a, "t1") == 8
    assert m.match_prefix(a, "t2") == 0
    assert m.match_prefix(a) == 0
    assert m.start_request("b", a, cache_salt="t1") == 8
    m.check_integrity()


def test_caching_off() -> None:
    m = make(4, caching=False)
    a = list(range(1, 10))
    assert run_prompt(m, "a", a) == 0
    assert m.block_table("a") == [0, 1, 2]
    assert m.match_prefix(a) == 0
    assert m.pin_prefix(a) == 0
    m.free("a")
    m.check_integrity()
    assert m.pool.free_block_ids() == [3, 2, 1, 0]
    assert len(m.tree) == 0
    assert run_prompt(m, "b", a) == 0
    assert m.block_table("b") == [3, 2, 1]
    s = m.stats()
    assert (s["prefix_query_tokens"], s["prefix_hit_tokens"], s["num_blocks_cached"]) == (18, 0, 0)
    assert m.reset_prefix_cache() is False
    m.free("b")
    assert m.reset_prefix_cache() is True


def test_tables_only_grow() -> None:
    m = make(16)
    m.start_request("a", [1] * 3)
    history = []
    for n in range(1, 40, 3):
        m.allocate("a", n)
        table = m.block_table("a")
        assert table[: len(history)] == history
        history = table
    assert len(history) == 10
    assert m.allocate("a", 5) == []


def test_short_and_empty_prompts_and_misuse() -> None:
    m = make(4)
    assert m.match_prefix([]) == 0
    assert m.match_prefix([7]) == 0
    assert m.start_request("e", []) == 0
    assert m.allocate("e", 0) == []
    m.free("e")
    with pytest.raises(KeyError):
        m.allocate("nope", 4)
    with pytest.raises(KeyError):
        m.free("e")
    m.start_request("x", [1, 2])
    with pytest.raises(AssertionError):
        m.start_request("x", [1, 2])
    with pytest.raises(AssertionError):
        m.commit("x", [1, 2], 2)  # no block allocated for those tokens
    m.check_integrity()


def test_check_integrity_catches_a_leak() -> None:
    m = make(4)
    run_prompt(m, "a", [1, 2, 3, 4, 5])
    del m._requests["a"]  # a request forgotten without free()
    with pytest.raises(AssertionError, match="ref count"):
        m.check_integrity()


@pytest.mark.parametrize("caching", [True, False])
def test_commit_seals_each_full_block_once(caching: bool) -> None:
    """The format's `seal` hook sees every block when it fills, once, in table order; prefix
    hits arrive sealed (their writer sealed them)."""
    sealed: list[list[int]] = []
    m = KVManager(num_blocks=8, block_size=4, enable_prefix_caching=caching,
                  on_seal=sealed.append)
    tokens = list(range(10))
    m.start_request("a", tokens)
    assert m.allocate("a", 10) == [0, 1, 2]
    m.commit("a", tokens, 6)  # block 0 full
    m.commit("a", tokens, 10)  # block 1 full, block 2 holds 2 of 4
    m.commit("a", tokens + [10, 11], 12)  # block 2 full
    assert sealed == [[0], [1], [2]]
    hit = m.start_request("b", tokens[:9])
    assert hit == (8 if caching else 0)
    m.allocate("b", 9)
    m.commit("b", tokens[:9], 9)
    assert sealed == [[0], [1], [2]] + ([] if caching else [[3, 4]])
