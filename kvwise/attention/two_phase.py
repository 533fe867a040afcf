"""ChunkAttention's two-phase partition (TPP) decode (Ye et al., ACL 2024, arXiv 2402.15220).

A step's decode queries are split by the blocks they read:
1. chunk-first: every block held by more than one decode request (a shared prefix-tree chunk) is
   read once for all its sharers. Blocks with the same sharer set form one group, and a group is
   one matrix-matrix attention of all its sharers' queries (`[K, R*G, D]`: the G query heads of
   a KV head and the R requests stacked as query rows) against the group's keys, giving partial
   outputs and their log-sum-exp, instead of R matrix-vector products over the same keys.
2. sequence-first: each request's private blocks (its tail and anything unshared) in one batched
   attention like paged decode, then the partials are merged with the online-softmax rule
   lse = log(e^lse_a + e^lse_b), o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b (the paper's
   m/n/O merge, written with log-sum-exp).
Prefill spans go through the paged prefill path (the paper also prefills with an ordinary kernel).

The shared structure is rebuilt only when the batch or the tree changes, as the paper rebuilds
its kernel context only when the tree changes: `prepare` keeps the last structure and reuses it
while every decode table only grew by fresh blocks (see `_SharedStructure.extend`).

Invariants:
- Each position of a decode request's table is read exactly once: in its sharer group's
  chunk-first product or in the request's sequence-first pass.
- Tails are never shared (as in the paper): a request's last block is always private, so every
  request has at least one private token and the merge never sees an empty partial. A shared
  block is therefore full for every sharer and needs no mask.
- Grouped-query attention: query head h reads KV head h // (H // K), as in paged.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kvwise.attention.backend import AttentionMetadata, register_backend
from kvwise.attention.paged import PagedBackend, prefill_spans_attention
from kvwise.cache.kv_store import LayerKV

# PyTorch's CPU flash-attention kernel, the one SDPA dispatches to, also returns the log-sum-exp;
# public SDPA drops it. Elsewhere (or if a PyTorch lacks it) the math fallback below is used.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# -- kernels (pure functions) --------------------------------------------------------------------
def attention_lse_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: Optional[torch.Tensor], scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attention with its log-sum-exp, in fp32 math.

    q [B, K, Lq, D]; k, v [B, K, L, D]; bias None or additive [B, 1, 1, L] (0 or -inf)
    -> out [B, K, Lq, D] fp32 (normalised over these L keys), lse [B, K, Lq] fp32.
    """
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, K, Lq, L]
    if bias is not None:
        s = s + bias.float()
    lse = torch.logsumexp(s, dim=-1)  # [B, K, Lq]
    p = torch.exp(s - lse[..., None])  # [B, K, Lq, L]
    return torch.matmul(p, v.float()), lse  # [B, K, Lq, D], [B, K, Lq]


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: Optional[torch.Tensor], scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """As `attention_lse_math` (same shapes) through the fused CPU kernel when available;
    out is in q's dtype, lse fp32."""
    b, kh, _, d = q.shape
    assert k.shape[:2] == (b, kh) and k.shape[-1] == d and v.shape == k.shape, (q.shape, k.shape)
    if _FLASH_CPU is None or q.device.type != "cpu":
        return attention_lse_math(q, k, v, bias, scale)
    if bias is not None:
        bias = bias.to(q.dtype)  # the kernel wants the mask in q's dtype
    return _FLASH_CPU(q, k, v, attn_mask=bias, scale=scale)


def merge_partials(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial attentions over disjoint key sets.

    o_* [..., D] fp32, lse_* [...] fp32 -> the attention over the union: o [..., D], lse [...].
    """
    lse = torch.logaddexp(lse_a, lse_b)  # [...]
    o = o_a * torch.exp(lse_a - lse)[..., None] + o_b * torch.exp(lse_b - lse)[..., None]
    return o, lse


def chunk_first_attention(q: torch.Tensor, kv: LayerKV, rows: Optional[torch.Tensor],
                          block_ids: torch.Tensor, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1 for one sharer group: all sharers' queries against the group's blocks at once.

    q [B, K, G, D] (decode queries, heads split by KV head); rows [R] long (None: all B rows);
    kv one layer's store; block_ids [M] -> out [R, K, G, D], lse [R, K, G] fp32.
    """
    qs = q if rows is None else q.index_select(0, rows)  # [R, K, G, D]
    r, kh, g, d = qs.shape
    qs = qs.transpose(0, 1).reshape(1, kh, r * g, d)  # [1, K, R*G, D]
    # read once for all sharers through the format (widened / dequantized, --kv-cache-dtype)
    k, v = kv.gather_blocks(block_ids)  # [M*S, K, D] each
    k = k.to(qs.dtype).transpose(0, 1)[None]  # [1, K, M*S, D]
    v = v.to(qs.dtype).transpose(0, 1)[None]
    out, lse = attention_lse(qs, k, v, None, scale)  # [1, K, R*G, D], [1, K, R*G]
    out = out[0].reshape(kh, r, g, d).transpose(0, 1)  # [R, K, G, D]
    lse = lse[0].reshape(kh, r, g).transpose(0, 1)  # [R, K, G]
    return out, lse


def two_phase_decode(q: torch.Tensor, kv: LayerKV, plan: TwoPhasePlan, scale: float
                     ) -> torch.Tensor:
    """q [B, H, D] decode queries; kv one layer's store -> [B, H, D]."""
    b, h, d = q.shape
    k, v = kv.gather_blocks(plan.private_block_ids)  # [B*nbp*S, K, D] each
    kh = k.shape[1]
    assert h % kh == 0, (h, kh)
    qg = q.reshape(b, kh, h // kh, d)  # [B, K, G, D]: query head h reads KV head h // G
    k, v = k.to(q.dtype), v.to(q.dtype)
    k = k.view(b, -1, kh, d).transpose(1, 2)  # [B, K, nbp*S, D]
    v = v.view(b, -1, kh, d).transpose(1, 2)  # [B, K, nbp*S, D]
    if not plan.groups:  # nothing shared: plain batched decode, no log-sum-exp needed
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=plan.private_mask, scale=scale)
        return out.reshape(b, h, d)  # [B, H, D]
    # phase 2 (sequence-first) partials of every request, then fold in each group's phase 1
    o, lse = attention_lse(qg, k, v, plan.private_bias, scale)  # [B, K, G, D], [B, K, G]
    o = o.float()
    for group in plan.groups:
        o_g, lse_g = chunk_first_attention(qg, kv, group.rows, group.block_ids,
                                           scale)  # [R, K, G, D], [R, K, G]
        if group.rows is None:
            o, lse = merge_partials(o, lse, o_g.float(), lse_g)
        else:
            o_m, lse_m = merge_partials(o.index_select(0, group.rows),
                                        lse.index_select(0, group.rows), o_g.float(), lse_g)
            o = o.index_copy(0, group.rows, o_m)
            lse = lse.index_copy(0, group.rows, lse_m)
    return o.reshape(b, h, d).to(q.dtype)  # [B, H, D]


# -- the per-step plan -----------------------------------------------------------------------
@dataclass(frozen=True)
class SharedGroup:
    """Blocks read by exactly the same set (>= 2) of decode rows."""

    rows: Optional[torch.Tensor]  # [R] long decode rows; None when the group is every row
    block_ids: torch.Tensor  # [M] long


@dataclass(frozen=True)
class TwoPhasePlan:
    groups: list[SharedGroup]  # chunk-first work; empty when nothing is shared
    private_block_ids: torch.Tensor  # [B * nbp] long: private blocks per row, padded (block 0)
    private_mask: torch.Tensor  # [B, 1, 1, nbp * S] bool, True = attend
    # [B, 1, 1, nbp * S] fp32 additive form of the mask (0 / -inf); None when nothing is shared
    private_bias: Optional[torch.Tensor]


class _SharedStructure:
    """CPU-side shared-chunk structure of a decode batch: the part of the plan that changes only
    when the batch or the tree changes.

    Invariants:
    - `holders` of a block are the rows holding it at a non-tail position; a block with >= 2
      holders is shared and in exactly one group; every other position is private.
    - `reusable` is False when some block appears at a row's tail and also elsewhere; then a
      later step could turn it into a shared block, so the structure is rebuilt every step.
    """

    def __init__(self, tables: list[list[int]], ctx_lens: list[int], device: torch.device
                 ) -> None:
        self.tables = tables  # each row's table truncated to its context, when last seen
        self.ctx_lens = list(ctx_lens)
        holders: dict[int, list[int]] = {}
        for i, table in enumerate(tables):
            assert len(set(table)) == len(table), f"decode row {i}: repeated blocks"
            for block in table[:-1]:  # tails are never shared
                holders.setdefault(block, []).append(i)
        tails = [t[-1] for t in tables]
        self.reusable = len(set(tails)) == len(tails) and not any(b in holders for b in tails)
        by_rows: dict[tuple[int, ...], list[int]] = {}
        for block, rows in holders.items():
            if len(rows) > 1:
                by_rows.setdefault(tuple(rows), []).append(block)
        shared = {b for blocks in by_rows.values() for b in blocks}
        every_row = tuple(range(len(tables)))
        self.groups = [
            SharedGroup(None if rows == every_row else torch.tensor(rows, device=device),
                        torch.tensor(blocks, dtype=torch.long, device=device))
            for rows, blocks in by_rows.items()]
        self.private_positions = [[j for j, b in enumerate(t) if b not in shared or j == len(t) - 1]
                                  for t in tables]
        self.num_shared = [len(t) - len(p) for t, p in zip(tables, self.private_positions)]
        self.block_set = set(holders) | set(tails)

    def extend(self, tables: list[list[int]], ctx_lens: list[int]) -> bool:
        """Advance to this step's tables if the shared structure is unchanged; False if not.

        It is unchanged when the rows are the same in number, each row's table starts with its
        previous table and its context did not shrink, and every appended block is fresh (in no
        previous table and appended once): then no block gained or lost a holder, and the
        previous tails and the new blocks are private.
        """
        if not self.reusable or len(tables) != len(self.tables):
            return False
        fresh: set[int] = set()
        for new, old, c_new, c_old in zip(tables, self.tables, ctx_lens, self.ctx_lens):
            if c_new < c_old or len(new) < len(old) or new[:len(old)] != old:
                return False
            for block in new[len(old):]:
                if block in self.block_set or block in fresh:
                    return False
                fresh.add(block)
        for i, (new, old) in enumerate(zip(tables, self.tables)):
            self.private_positions[i].extend(range(len(old), len(new)))
        self.block_set |= fresh
        self.tables = tables
        self.ctx_lens = list(ctx_lens)
        return True


class TwoPhaseBackend:
    name = "two_phase"

    def __init__(self) -> None:
        self._structure: Optional[_SharedStructure] = None
        self._paged: Optional[PagedBackend] = None  # made on the first per-head step

    def prepare(self, meta: AttentionMetadata) -> Optional[TwoPhasePlan]:
        """The step's plan (None without decode rows, or with per-head tables: such steps run
        the paged path); the runner calls this once per step."""
        bd = meta.num_decode_tokens
        if bd == 0 or meta.heads is not None:
            return None
        s = meta.block_size
        ctx_lens = meta.context_lens[:bd]
        tables = [t[:(c + s - 1) // s] for t, c in zip(meta.block_tables[:bd], ctx_lens)]
        st = self._structure
        if st is None or not st.extend(tables, ctx_lens):
            st = self._structure = _SharedStructure(tables, ctx_lens, meta.slot_mapping.device)
        if not st.groups and meta.decode_block_ids is not None:  # the runner's gather is ours
            ids, mask = meta.decode_block_ids, meta.decode_mask
        else:
            ids, mask = self._private_rows(st, tables, ctx_lens, s, meta.slot_mapping.device)
        bias = None
        if st.groups:
            bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        return TwoPhasePlan(st.groups, ids, mask, bias)

    @staticmethod
    def _private_rows(st: _SharedStructure, tables: list[list[int]], ctx_lens: list[int],
                      s: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> private block ids [B * nbp] (padded with block 0), mask [B, 1, 1, nbp * S]."""
        private = [[t[j] for j in pos] for t, pos in zip(tables, st.private_positions)]
        nbp = max(len(p) for p in private)
        ids = torch.tensor([b for p in private for b in p + [0] * (nbp - len(p))],
                           dtype=torch.long, device=device)  # [B * nbp]
        # all private blocks but the last (the tail) are full
        lens = torch.tensor([c - s * n for c, n in zip(ctx_lens, st.num_shared)], device=device)
        mask = torch.arange(nbp * s, device=device)[None, :] < lens[:, None]  # [B, nbp * S]
        return ids, mask[:, None, None, :]

    def forward(self, q: torch.Tensor, k_new: Optional[torch.Tensor],
                v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [T, H, D]; k_new, v_new [T, K, D] or None; kv one layer's store -> [T, H, D]. A
        step with per-head (many-group) rows runs the paged backend's path: their heads share
        no chunk as a whole."""
        if meta.heads is not None:
            if self._paged is None:
                self._paged = PagedBackend()
            return self._paged.forward(q, k_new, v_new, kv, meta, scale)
        bd = meta.num_decode_tokens
        plan = meta.backend_data
        if bd and not isinstance(plan, TwoPhasePlan):  # called without the runner's hook
            plan = self.prepare(meta)
        if not meta.prefills:
            return two_phase_decode(q, kv, plan, scale)
        out = torch.empty_like(q)
        if bd:
            out[:bd] = two_phase_decode(q[:bd], kv, plan, scale)
        prefill_spans_attention(q, k_new, v_new, kv, meta, scale, out)
        return out


register_backend("two_phase", TwoPhaseBackend)
