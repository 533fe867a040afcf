"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute.

Each step: running requests first (FCFS), each asking for `num_tokens - num_computed_tokens`
tokens (1 for a decode, the rest of the prompt for a prefill) capped by the remaining budget; when
the pool cannot hold a request's new slots, the most recently admitted running request is
preempted (its blocks freed, its counters reset, put back at the head of the queue) and the
allocation retried. Then waiting requests are admitted in arrival order while budget, sequence
slots and blocks last; admission first attaches any cached prefix. A waiting request whose next
uncached chunk is being computed by a running request (an in-flight shared prefix, e.g. many
requests with one system prompt arriving together) waits until that chunk is committed, so a
shared prefix is prefilled once.

Requests also leave and enter between steps (export/import, see kvwise.engine.transfer): `hold`
parks a prefilled request in `held` (blocks kept, never scheduled, never preempted) until the
engine exports or expires it; `admit_imported` puts a request whose KV the engine has just
written into `running`, as admission does after a prefix hit, so the next step decodes it.

Invariants:
- The scheduler touches no tensors; it returns a `StepPlan` and reads back counters.
- A request is in exactly one of `waiting`, `running`, `held`, or none (finished/aborted/gone).
- FCFS: a waiting request is never admitted ahead of an earlier one that does not fit.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from kvwise.cache.kv_manager import KVManager
from kvwise.request import Request, RequestStatus
from kvwise.scheduler.plan import ScheduledRequest, StepPlan


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.held: dict[str, Request] = {}  # request id -> HELD request (keeps its blocks)
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a finished or aborted request from the queues and free its blocks."""
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self.kv.free(request.request_id)
        elif request.status == RequestStatus.HELD:
            del self.held[request.request_id]
            self.kv.free(request.request_id)
        elif request in self.waiting:
            self.waiting.remove(request)

    def hold(self, request: Request) -> None:
        """Park a running request: it keeps its blocks and counters but is not scheduled (nor
        preempted) until `remove`d."""
        self.running.remove(request)
        request.status = RequestStatus.HELD
        self.held[request.request_id] = request

    def can_admit_imported(self) -> bool:
        """Whether a sequence slot is free for `admit_imported` (max_num_seqs)."""
        return len(self.running) < self.max_num_seqs

    def admit_imported(self, request: Request) -> None:
        """Run a request whose table already covers its `num_computed_tokens` (its KV was just
        imported); from here it is scheduled like any running request."""
        assert self.kv.has_request(request.request_id), request.request_id
        assert 0 < request.num_computed_tokens < request.num_tokens, request.request_id
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.held)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(plan, budget)
        if not plan.preempted_ids:
            self._schedule_waiting(plan, budget)
        # decode-first layout for the runner
        plan.scheduled.sort(key=lambda s: s.num_new_tokens != 1 or not s.samples)
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._num_new_tokens(req, budget)
            if num_new == 0:
                i += 1
                continue
            if not self._make_room(req, num_new, plan):
                break  # req itself was preempted; everything after it is gone too
            plan.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new
            i += 1
        return budget

    def _make_room(self, req: Request, num_new: int, plan: StepPlan) -> bool:
        """Allocate req's slots, preempting the newest running requests while needed."""
        target = req.num_computed_tokens + num_new
        while not self.kv.can_allocate(req.request_id, target):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is req:
                return False
        self.kv.allocate(req.request_id, target)
        return True

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        reset = getattr(req.kv_policy, "reset", None)  # a stateful policy starts over (FastGen)
        if reset is not None:
            reset()
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        plan.preempted_ids.append(req.request_id)
        # a request scheduled earlier in this step cannot be the victim: victims are taken from
        # the tail and scheduling walks from the head, so the tail is not yet scheduled.
        assert all(s.request is not req for s in plan.scheduled)

    def _schedule_waiting(self, plan: StepPlan, budget: int) -> None:
        s = self.kv.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            # A request scoring its prompt needs the logits of every prompt position, and a
            # prefix hit skips computing the cached positions: it matches nothing (an empty
            # match) and computes its whole prompt; its chunks still join the cache at commit.
            match_ids = [] if scores_prompt(req) else req.all_token_ids
            if self.kv.prefix_in_flight(match_ids, req.cache_salt):
                # A running request is computing this prompt's next chunk: wait for its commit
                # and hit it, instead of computing the same prefix twice (FCFS: stop here).
                break
            hit = self.kv.match_prefix(match_ids, req.cache_salt)  # read-only
            req.num_computed_tokens = hit
            num_new = self._num_new_tokens(req, budget)
            # Conservative fit check before touching any state: the hit chunks may be
            # evictable (counted as available) and stop being so once attached.
            need = (hit + num_new + s - 1) // s
            avail = self.kv.num_available_blocks()
            # Admission: its whole known tokens and its next one must fit beside what the
            # running requests still need to reach theirs; a request admitted only for its
            # first chunk would take the blocks the others' next chunks need, and be preempted
            # and recomputed over and over when the pool is the bound (long prompts)
            whole = (req.num_tokens + s) // s - hit // s
            if num_new == 0 or need > avail or whole + self._promised() > avail:
                req.num_computed_tokens = 0
                break
            # a compressed request shares its prompt's chunks only (KVManager.start_request)
            limit = req.num_prompt_tokens if req.kv_policy is not None else None
            groups = self.kv.num_planes if getattr(req.kv_policy, "per_head", False) else 1
            cached = self.kv.start_request(req.request_id, match_ids, req.cache_salt,
                                           num_groups=groups, commit_limit=limit)
            assert cached == hit, (cached, hit)
            self.kv.allocate(req.request_id, hit + num_new)
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            plan.scheduled.append(self._scheduled(req, num_new))
            budget -= num_new

    def _promised(self) -> int:
        """Blocks the running requests still need to hold all their known tokens and one
        more (prompt chunks not computed yet, the next decode slot); 0 for requests whose
        groups differ (they grow by planes, a decode row at a time)."""
        s, total = self.kv.block_size, 0
        for r in self.running:
            rid = r.request_id
            if self.kv.groups_differ(rid):
                continue
            slots = r.num_tokens + 1 - self.kv.num_removed_slots(rid, 0)
            total += max(0, -(-slots // s) - len(self.kv.block_table(rid)))
        return total

    def _scheduled(self, req: Request, num_new: int) -> ScheduledRequest:
        return scheduled_request(self.kv, req, num_new)

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if remaining <= budget:
            return remaining
        if self.enable_chunked_prefill:
            return budget
        # Without chunking a prompt runs whole; one larger than the budget runs alone.
        return remaining if budget == self.max_num_batched_tokens else 0

    def find(self, request_id: str) -> Optional[Request]:
        for r in self.running:
            if r.request_id == request_id:
                return r
        for r in self.waiting:
            if r.request_id == request_id:
                return r
        return self.held.get(request_id)


def scores_prompt(req: Request) -> bool:
    """Whether `req` still needs the logits of its prompt positions (prompt logprobs): only the
    first sibling of a request scores the shared prompt, and only until it has sampled (after
    that the prompt logprobs are complete; a recompute after preemption need not redo them)."""
    return req.params.prompt_logprobs is not None and req.index == 0 \
        and req.num_output_tokens == 0


def scheduled_request(kv: KVManager, req: Request, num_new: int) -> ScheduledRequest:
    """The plan entry of `num_new` tokens of `req` (its KV already allocated): its one table,
    or (a per-head compressed request whose groups differ) its table per (layer, KV head)."""
    rid = req.request_id
    if kv.groups_differ(rid):
        assert num_new == 1, (rid, num_new)
        n = kv.num_groups(rid)
        return ScheduledRequest(req, num_new, [], 0, kv.block_tables(rid),
                                [kv.num_removed_slots(rid, g) for g in range(n)])
    return ScheduledRequest(req, num_new, kv.block_table(rid), kv.num_removed_slots(rid, 0))
