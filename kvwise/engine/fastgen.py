"""FastGen in the engine (`--kv-compression fastgen`): each request profiles its (layer, KV
head) groups on its prompt inside the batched step, then every group keeps what its policy
keeps while decoding, through the per-head KV groups of the KV seam. The rules themselves
(policies, profiling, decode bookkeeping) are in kvwise.cache.compress.fastgen; this module
feeds them from the step and turns their decisions into evictions.

Per request (one `FastGenPolicy` each, `per_head = True`, so its KV has L*K groups):
- **Profiling** uses the queries of the prompt's last PROFILE_ROWS positions (they see the
  whole prompt; O(rows * n) per layer instead of O(n^2)) and every key of the prompt as
  stored. The model calls the step's observer after every layer's attention: each prefill
  step keeps the queries of its tokens that fall in that tail (so a chunked prompt collects
  the same rows as a whole one), and the step that reaches the end of the known tokens reads
  the keys back from the cache (chunks and prefix-cache hits give the keys the request
  attends to) and profiles the layer. Positions a prefix-cache hit skipped have no queries:
  such a request profiles on the tail rows it computed.
- **Eviction.** After that step the engine asks each group which slots to drop
  (`evict_group_slots`): the prompt positions its policy did not keep. On every later (decode)
  step the observer gives each group's bookkeeping the new token and, for groups whose policy
  has heavy hitters, the attention of the token's query over the group's slots (mean over
  the KV head's query heads, read back from the cache as stored); the positions it rejects are
  evicted after the step. Compaction (the engine's) then frees whole blocks or planes.
- Slots: a group's slot i holds the token at `slot_pos[g][i]`; evicted slots stay (and are
  attended) until the engine compacts the group (`on_compacted`), as for every policy.
- Preemption restarts the request from scratch (`reset`): its KV is recomputed, its prompt
  profiled again.

Invariants:
- A group's kept positions (FastGenGroup) are exactly its live slots, in slot order; a "full"
  group keeps every slot and its bookkeeping is not run (only its length advances).
- The neutral setting `recovery_threshold=1.0` makes every group "full" (no policy but full
  reaches 1.0 unless it keeps every key it sees): nothing is evicted, and once profiled such a
  request needs no observer, so its decode steps may run the fused step again.
- Composition: KV formats that write per head (dense, int8) compose; KVQuant formats are
  refused at the config. Shared prefix chunks are never mutated by an eviction (the KV
  manager copies kept rows out of them); steps with per-head rows run the paged path
  (two-phase routes them there), steps with an observer the per-op path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from kvwise.attention.backend import AttentionMetadata
from kvwise.cache.compress.fastgen import (
    FastGenGroup,
    LayerProfile,
    TokenClasses,
    components,
    profile_layer,
)
from kvwise.cache.kv_store import LayerKV
from kvwise.request import Request
from kvwise.scheduler.plan import StepPlan

PROFILE_ROWS = 256  # query rows profiled per layer (the step's last ones)
NO_BOUND = 2**31 - 1  # blocks: a FastGen request may keep everything (full heads)


class FastGenPolicy:
    name = "fastgen"
    per_head = True

    def __init__(self, threshold: float, local_ratio: float, frequent_ratio: float,
                 classes: TokenClasses, num_layers: int, num_kv_heads: int) -> None:
        self.threshold = threshold
        self.local_ratio = local_ratio
        self.frequent_ratio = frequent_ratio
        self.classes = classes
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.reset()

    def reset(self) -> None:
        """Forget everything (the request starts over: its KV is recomputed from scratch)."""
        self.groups: Optional[list[FastGenGroup]] = None
        # [L, K, P] every candidate's recovery per group, once profiled (for maps and tests)
        self.recoveries: Optional[torch.Tensor] = None
        self.candidates: tuple[str, ...] = ()
        self.profiles: dict[int, LayerProfile] = {}
        self._queries: dict[int, list[torch.Tensor]] = {}  # layer -> tail query rows so far
        self._prompt: list[int] = []  # token ids the profile covers
        self._slot_pos: list[list[int]] = []  # per group: position of each slot
        self._dead: list[set[int]] = []  # per group: evicted slots not compacted yet
        self._pending: list[list[int]] = []  # per group: slots to evict after this step

    # -- what the engine asks -----------------------------------------------------------------

    def max_blocks(self) -> int:
        return NO_BOUND

    def evict_group_slots(self, group: int, num_kept: int) -> Optional[list[int]]:
        """Slots of `group` to evict after this step (None: nothing)."""
        self._finish_profile()
        if self.groups is None or not self._pending[group]:
            return None
        slots, self._pending[group] = self._pending[group], []
        return slots

    def on_compacted(self, group: int) -> None:
        """The engine compacted `group`: its evicted slots are gone, the rest moved up."""
        if self.groups is None or not self._dead[group]:
            return
        dead = self._dead[group]
        self._slot_pos[group] = [p for i, p in enumerate(self._slot_pos[group]) if i not in dead]
        self._dead[group] = set()

    @property
    def inert(self) -> bool:
        """Profiled and every group keeps everything: decoding needs no bookkeeping."""
        return self.groups is not None and all(g.policy == "full" for g in self.groups)

    @property
    def policies(self) -> Optional[list[str]]:
        """The chosen policy of each group (layer * K + KV head), once profiled."""
        return None if self.groups is None else [g.policy for g in self.groups]

    # -- what the step's observer feeds -------------------------------------------------------

    def tail_rows(self, req: Request, num_new: int) -> Optional[range]:
        """Which of this step's `num_new` tokens (offsets) are tail rows to keep (None: none,
        or the request is profiled already)."""
        if self.groups is not None:
            return None
        first = max(req.num_computed_tokens, req.num_tokens - PROFILE_ROWS)
        end = min(req.num_computed_tokens + num_new, req.num_tokens)
        if first >= end:
            return None
        return range(first - req.num_computed_tokens, end - req.num_computed_tokens)

    def needs_profile(self, req: Request, num_new: int) -> bool:
        return self.groups is None and req.num_computed_tokens + num_new >= req.num_tokens

    def keep_queries(self, layer: int, q: torch.Tensor) -> None:
        self._queries.setdefault(layer, []).append(q.detach().clone())

    def profile(self, layer: int, k: torch.Tensor, token_ids: list[int], scale: float) -> None:
        """Profile `layer` from its kept tail queries and k [n, K, D], every key of the
        context as stored (the queries are the last positions of it)."""
        q = torch.cat(self._queries.pop(layer))  # [m, H, D]
        n, m = k.shape[0], q.shape[0]
        q_full = q.new_zeros((n, *q.shape[1:]))
        q_full[n - m:] = q
        self.profiles[layer] = profile_layer(
            q_full, k, torch.tensor(token_ids), self.classes, self.threshold, self.local_ratio,
            self.frequent_ratio, scale, rows=m)
        self._prompt = token_ids

    def _finish_profile(self) -> None:
        """After the profiling step: build every group's bookkeeping and its first evictions."""
        if self.groups is not None or len(self.profiles) < self.num_layers:
            return
        ids = torch.tensor(self._prompt)
        n = len(self._prompt)
        self.recoveries = torch.stack([self.profiles[i].recoveries.cpu()
                                       for i in range(self.num_layers)])
        self.candidates = self.profiles[0].candidates
        self.groups, self._slot_pos, self._dead, self._pending = [], [], [], []
        for layer in range(self.num_layers):
            prof = self.profiles[layer]
            for h in range(self.num_kv_heads):
                self.groups.append(FastGenGroup.from_profile(prof, h, ids, self.classes))
                drop = (~prof.keep[h]).nonzero().squeeze(1).tolist()
                self._slot_pos.append(list(range(n)))
                self._dead.append(set(drop))
                self._pending.append(drop)
        self.profiles = {}

    def needs_mass(self, group: int) -> bool:
        assert self.groups is not None
        return "frequent" in components(self.groups[group].policy)

    def live_slots(self, group: int) -> list[int]:
        """Slots holding kept tokens, in order (the evicted ones awaiting compaction left out)."""
        dead = self._dead[group]
        return [i for i in range(len(self._slot_pos[group])) if i not in dead]

    def on_token(self, group: int, position: int, token_id: int,
                 mass: Optional[torch.Tensor]) -> None:
        """The decode step wrote `position` into the group's next slot; mass [kept + 1]: its
        query's attention on the group's kept tokens then itself (None: the policy needs none)."""
        assert self.groups is not None
        grp = self.groups[group]
        self._slot_pos[group].append(position)
        if grp.policy == "full":  # keeps everything: no bookkeeping to run
            grp.length = position + 1
            return
        if mass is None:
            mass = torch.zeros(grp.positions.shape[0] + 1)
        step = grp.on_token(position, token_id, mass)
        if step.evict:
            where = {p: i for i, p in enumerate(self._slot_pos[group])}
            slots = [where[p] for p in step.evict]
            self._dead[group].update(slots)
            self._pending[group].extend(slots)


class StepObserver:
    """The observer of one step with FastGen requests (`AttentionMetadata.observer`): per
    layer, profiles the requests whose prompt ends in this step and feeds the decode rows'
    groups."""

    def __init__(self, collecting: list[tuple[int, int, range, bool, Request]],
                 decoding: list[tuple[int, Request]]) -> None:
        # (plan row, flat start, its tail rows, profile now, request): prefill rows keeping
        # their tail queries
        self.collecting = collecting
        self.decoding = decoding  # (decode row, request)

    def __call__(self, layer: int, q: torch.Tensor, k_new: Optional[torch.Tensor],
                 v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                 scale: float) -> None:
        for row, start, rows, profile_now, req in self.collecting:
            policy: FastGenPolicy = req.kv_policy  # type: ignore[assignment]
            policy.keep_queries(layer, q[start + rows.start:start + rows.stop])
            if profile_now:
                table, ctx = meta.block_tables[row], meta.context_lens[row]
                keys, _ = kv.gather_rows(_table_rows(table, ctx, meta.block_size, q.device))
                policy.profile(layer, keys, req.all_token_ids[:ctx], scale)
        for row, req in self.decoding:
            self._decode_row(layer, row, req, q, kv, meta, scale)

    @staticmethod
    def _decode_row(layer: int, row: int, req: Request, q: torch.Tensor, kv: LayerKV,
                    meta: AttentionMetadata, scale: float) -> None:
        policy: FastGenPolicy = req.kv_policy  # type: ignore[assignment]
        kh = policy.num_kv_heads
        group_size = q.shape[1] // kh
        position = req.num_computed_tokens  # the row's one new token
        token_id = req.all_token_ids[position]
        for h in range(kh):
            g = layer * kh + h
            mass = None
            if policy.needs_mass(g):
                table, ctx = meta.head_table(row, h)
                keys = kv.gather_head_keys(_table_rows(table, ctx, meta.block_size, q.device), h)
                heads = slice(h * group_size, (h + 1) * group_size)
                probs = torch.softmax((q[row, heads].float() @ keys.float().T) * scale,
                                      dim=-1).mean(dim=0)  # [ctx] over the group's slots
                live = policy.live_slots(g)
                mass = probs[torch.tensor(live + [ctx - 1], dtype=torch.long)]
            policy.on_token(g, position, token_id, mass)


def _table_rows(table: Sequence[int], n: int, block_size: int, device: Any) -> torch.Tensor:
    """The flat cache rows of a table's first n slots."""
    t = torch.tensor(table, dtype=torch.long, device=device)
    slots = torch.arange(n, device=device)
    return t[slots // block_size] * block_size + slots % block_size


def step_observer(plan: StepPlan, num_decode: int,
                  starts: Sequence[int]) -> Optional[StepObserver]:
    """The observer for this step, or None when no FastGen request needs one. `starts`: the
    flat index of each plan row's first token."""
    collecting: list[tuple[int, int, range, bool, Request]] = []
    decoding: list[tuple[int, Request]] = []
    for row, sch in enumerate(plan.scheduled):
        req, n = sch.request, sch.num_new_tokens
        policy = req.kv_policy
        if not isinstance(policy, FastGenPolicy):
            continue
        rows = policy.tail_rows(req, n)
        if rows is not None:
            collecting.append((row, starts[row], rows, policy.needs_profile(req, n), req))
        elif policy.groups is not None and not policy.inert:
            assert row < num_decode and n == 1, (row, sch)
            decoding.append((row, req))
    if not collecting and not decoding:
        return None
    return StepObserver(collecting, decoding)
