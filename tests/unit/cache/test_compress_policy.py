"""The streaming eviction policy (kvwise.cache.compress): exact slots and its block bound."""

from __future__ import annotations

import pytest

from kvwise.cache.compress import StreamingPolicy, make_policy
from kvwise.cache.kv_manager import KVManager


def test_streaming_evicts_only_when_a_block_frees():
    p = StreamingPolicy(sink_tokens=4, window_tokens=64, block_size=16)
    assert p.evict_slots(83) is None  # 4 + 64 + 15: not a whole block yet
    assert p.evict_slots(84) == range(4, 20)  # keep slots 0..3 and the last 64
    assert p.evict_slots(100) == range(4, 36)
    assert p.max_blocks() == 6  # ceil(68 / 16) + 1
    assert StreamingPolicy(0, 16, 16).evict_slots(32) == range(0, 16)
    assert make_policy("none", 4, None, 16) is None
    with pytest.raises(ValueError, match="kv_compression"):
        make_policy("h2o", 4, 8, 16)


def test_streaming_through_the_kv_manager_stays_within_its_bound():
    """Decode 500 tokens one at a time: after each step evict what the policy names and
    compact; the request's blocks never exceed max_blocks and the kept slots are exactly the
    sink and the most recent tokens (tracked by position)."""
    s = 4
    policy = StreamingPolicy(sink_tokens=3, window_tokens=10, block_size=s)
    kv = KVManager(num_blocks=40, block_size=s)
    tokens = list(range(5))
    # a compressed request shares its prompt's chunks only (else its committed output chunks
    # stay held above the window: see KVManager.start_request)
    kv.start_request("r", tokens, commit_limit=len(tokens))
    kept: list[int] = []  # positions held, in slot order
    peak = 0
    for n in range(5, 505):
        kv.allocate("r", n)
        peak = max(peak, kv.stats()["num_blocks_used"])
        kept += range(kept[-1] + 1 if kept else 0, n)  # this step computed them
        kv.commit("r", list(range(n)), n)
        slots = policy.evict_slots(kv.num_kept_tokens("r", 0))
        if slots is not None:
            kv.evict("r", 0, slots)
            plan = kv.compact("r", 0)
            assert plan.plane is None
            kept = [p for i, p in enumerate(kept) if i not in slots]
        assert kv.num_kept_tokens("r", 0) == len(kept) == kv.num_slots("r", 0)
        assert kv.num_removed_slots("r", 0) == n - len(kept)
    assert peak <= policy.max_blocks()
    assert kept[:3] == [0, 1, 2] and kept[3:] == list(range(504 - (len(kept) - 3), 504))
    assert 10 <= len(kept) - 3 < 10 + s
    kv.check_integrity()
    kv.free("r")
    assert kv.stats()["num_blocks_used"] == 0
