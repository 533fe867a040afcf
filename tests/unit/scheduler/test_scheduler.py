"""Scheduler arithmetic with exact numbers: budget split, chunking, FCFS, preemption order."""

from __future__ import annotations

from kvwise.cache.kv_manager import KVManager
from kvwise.outputs import RequestMetrics
from kvwise.request import Request, RequestStatus
from kvwise.sampling_params import SamplingParams
from kvwise.scheduler.scheduler import Scheduler


def req(rid: str, n: int, base: int = 0) -> Request:
    return Request(rid, rid, 0, list(range(base, base + n)), SamplingParams(max_tokens=8),
                   RequestMetrics(0.0), max_tokens=8)


def finish_step(sched: Scheduler, plan, sample_token: int = 7) -> None:
    """What the engine does after running a plan: advance counters, append sampled tokens."""
    for s in plan.scheduled:
        samples = s.samples
        s.request.num_computed_tokens += s.num_new_tokens
        sched.kv.commit(s.request.request_id, s.request.all_token_ids,
                        s.request.num_computed_tokens)
        if samples:
            s.request.append_token(sample_token)


def test_chunked_prefill_splits_budget_fcfs():
    kv = KVManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = req("a", 7), req("b", 9, base=100)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    got = [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]
    assert got == [("a", 7), ("b", 3)]
    assert kv.block_table("a") == [0, 1] and kv.block_table("b") == [2]
    finish_step(sched, plan)
    plan = sched.schedule()
    # a decodes (1 token, first), b continues its prompt with the remaining budget
    got = [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled]
    assert got == [("a", 1), ("b", 6)]
    assert plan.scheduled[1].samples and plan.scheduled[0].samples


def test_admission_waits_for_room_for_the_whole_prompt():
    """A request is admitted only if all its tokens (and the next) fit beside what the running
    ones still need for theirs: a first chunk alone would take their next chunks' blocks."""
    kv = KVManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=4)  # 4-token chunks
    a, b = req("a", 11), req("b", 8, base=50)  # a: 3 blocks with its next token; b: 3
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()  # a holds 1 block and promises 2: b's 3 do not fit in 5 - 2
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] == [("a", 4)]
    finish_step(sched, plan)
    plan = sched.schedule()  # a holds 2, promises 1: 3 free, 1 promised, b still waits
    assert [s.request.request_id for s in plan.scheduled] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b"]
    finish_step(sched, plan)
    plan = sched.schedule()  # a's last chunk takes its 3rd block; its next token fits there
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.scheduled] == [
        ("a", 3), ("b", 1)]
    assert not sched.waiting and sched.num_preemptions == 0


def test_max_num_seqs_and_fcfs_blocking():
    kv = KVManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    big, small = req("big", 12), req("small", 2, base=50)
    sched.add(req("first", 2, base=200))
    sched.add(big)
    sched.add(small)
    plan = sched.schedule()
    # "big" needs 3 blocks but only 2 remain: it waits, and "small" may not overtake it
    assert [s.request.request_id for s in plan.scheduled] == ["first"]
    assert [r.request_id for r in sched.waiting] == ["big", "small"]


def test_preemption_takes_newest_and_requeues_at_head():
    kv = KVManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = req("a", 3), req("b", 3, base=10)
    sched.add(a)
    sched.add(b)
    # both admitted (3 tokens + the next fit 2 blocks each) and prefilled: pool full
    finish_step(sched, sched.schedule())
    assert kv.stats()["num_blocks_free"] == 0
    finish_step(sched, sched.schedule())  # both decode their 4th token into their 2nd block
    plan = sched.schedule()  # a needs a 3rd block for its 5th token -> b is preempted
    assert plan.preempted_ids == ["b"]
    assert [s.request.request_id for s in plan.scheduled] == ["a"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert sched.waiting[0] is b and b.metrics.num_preemptions == 1
    assert sched.num_preemptions == 1
    kv.check_integrity()
