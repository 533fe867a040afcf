"""The plain data passed from scheduler to runner and back.

Invariants:
- A `StepPlan` names requests and token counts only; it holds no tensors.
- `scheduled` is ordered decode-first (single-token continuations), then prefill chunks; the runner
  lays tokens out in exactly this order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kvwise.request import Request


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step, starting at request.num_computed_tokens
    block_table: list[int]
    # positions minus table slots (tokens a compressed request evicted and compacted away):
    # position p lives at slot p - slot_offset of `block_table`; 0 for a dense request
    slot_offset: int = 0
    # a many-group request whose groups evicted differently (per-head compression): the L*K
    # tables (group g = layer * K + KV head) and each group's slot offset; `block_table` is then
    # empty. Such a request only ever decodes (its prompt ran before its first eviction).
    group_tables: Optional[list[list[int]]] = None
    group_offsets: Optional[list[int]] = None

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the known tokens, so a token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass
class StepPlan:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled
