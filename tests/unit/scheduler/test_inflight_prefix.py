"""A shared prefix arriving in one burst is prefilled once: a waiting request whose next chunk is
being computed by a running request waits for that chunk's commit, then hits it.

block_size 4: tokens [0:4] are chunk 0, [4:8] chunk 1, ...
"""

from __future__ import annotations

from kvwise.cache.kv_manager import KVManager
from kvwise.outputs import RequestMetrics
from kvwise.request import Request
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.plan import StepPlan
from kvwise.scheduler.scheduler import Scheduler

S = 4
PREFIX = list(range(1, 11))  # 10 tokens: chunks 0 and 1 are full, chunk 2 starts with 9, 10


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, rid, 0, tokens, SamplingParams(max_tokens=4),
                   RequestMetrics(arrival_time=0.0), max_tokens=4)


def _run(kv: KVManager, plan: StepPlan) -> None:
    """What the engine does after the model ran: advance counters, commit, sample a token."""
    for sch in plan.scheduled:
        req = sch.request
        req.num_computed_tokens += sch.num_new_tokens
        kv.commit(req.request_id, req.all_token_ids, req.num_computed_tokens)
        if req.num_computed_tokens == req.num_tokens:
            req.append_token(7)
    kv.check_integrity()


def _scheduled(plan: StepPlan) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in plan.scheduled}


def test_burst_sharing_a_prefix_prefills_it_once() -> None:
    kv = KVManager(64, S)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    a = _request("a", PREFIX + [100, 101, 102, 103, 104, 105])
    b = _request("b", PREFIX + [200, 201, 202, 203, 204, 205])
    c = _request("c", list(range(300, 316)))
    for r in (a, b, c):
        sched.add(r)

    plan = sched.schedule()
    # b's chunk 0 is being computed by a: b waits, and c behind it (FCFS)
    assert _scheduled(plan) == {"a": 16}
    assert kv.prefix_in_flight(b.all_token_ids)
    _run(kv, plan)
    assert not kv.prefix_in_flight(b.all_token_ids)

    plan = sched.schedule()
    # b hits a's two full chunks (its chunk 2 differs), c shares nothing
    assert _scheduled(plan) == {"a": 1, "b": 8, "c": 16}
    assert kv.block_table("b")[:2] == kv.block_table("a")[:2]
    assert kv.stats()["prefix_hit_tokens"] == 8
    _run(kv, plan)


def test_owner_leaving_releases_the_waiters() -> None:
    kv = KVManager(64, S)
    kv.start_request("a", PREFIX + [100, 101])
    kv.allocate("a", 12)
    assert kv.prefix_in_flight(PREFIX + [200])
    assert kv.prefix_in_flight(PREFIX[:6])  # its only matchable chunk is a's chunk 0
    assert not kv.prefix_in_flight([9] + PREFIX)
    kv.commit("a", PREFIX + [100, 101], 4)  # chunk 0 committed, chunk 1 still in flight
    assert kv.prefix_in_flight(PREFIX + [200])
    assert not kv.prefix_in_flight(PREFIX[:6])
    kv.free("a")  # finished, aborted or preempted
    assert not kv.prefix_in_flight(PREFIX + [200])
    kv.check_integrity()


def test_nothing_in_flight_without_prefix_caching() -> None:
    kv = KVManager(64, S, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = _request("a", PREFIX + [100]), _request("b", PREFIX + [200])
    sched.add(a)
    sched.add(b)
    assert _scheduled(sched.schedule()) == {"a": 11, "b": 11}
    kv.check_integrity()
