"""Slow reference attention over gathered blocks: the test oracle for every other backend.

Invariants:
- One request at a time, plain float64 softmax(q k^T * scale + causal mask) v, read through the
  request's block table (never through the fast paths' precomputed slot tensors) and the
  format's slow dequantizing read (`LayerKV.gather_rows`).
"""

from __future__ import annotations

from typing import Optional

import torch

from kvwise.attention.backend import AttentionMetadata, register_backend
from kvwise.cache.kv_store import LayerKV


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_prior: int, scale: float) -> torch.Tensor:
    """q [Tq, H, D]; k, v [C, K, D] (C = num_prior + Tq) -> [Tq, H, D], causal by position."""
    tq, h, d = q.shape
    c, kh, _ = k.shape
    assert c == num_prior + tq, (c, num_prior, tq)
    group = h // kh
    k = k.double().repeat_interleave(group, dim=1)  # [C, H, D]
    v = v.double().repeat_interleave(group, dim=1)  # [C, H, D]
    scores = torch.einsum("thd,chd->htc", q.double(), k) * scale  # [H, Tq, C]
    q_pos = num_prior + torch.arange(tq)[:, None]  # [Tq, 1]
    allowed = torch.arange(c)[None, :] <= q_pos  # [Tq, C]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [H, Tq, C]
    out = torch.einsum("htc,chd->thd", probs, v)  # [Tq, H, D]
    return out.to(q.dtype)


def gather_context(kv: LayerKV, block_table: list[int], num_tokens: int,
                   block_size: int, sealed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The first num_tokens slots of the table's blocks -> k, v [C, K, D] (compute dtype), as
    stored or (`sealed`) as they read once their blocks are sealed."""
    rows = [b * block_size + s for b in block_table for s in range(block_size)][:num_tokens]
    t = torch.tensor(rows, dtype=torch.long, device=kv.store.device)
    return kv.store.gather_rows_sealed(kv.layer, t) if sealed else kv.gather_rows(t)


def _per_head_decode(q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata, row: int,
                     scale: float) -> torch.Tensor:
    """One decode row of a many-group request: q [H, D]; KV head h reads its own table and
    length in this layer (its new row is already written there) -> [H, D]."""
    kh = kv.store.num_kv_heads
    group = q.shape[0] // kh
    out = torch.empty_like(q)
    for h in range(kh):
        table, ctx = meta.head_table(row, h)
        k, v = gather_context(kv, table, ctx, meta.block_size)
        heads = slice(h * group, (h + 1) * group)
        out[heads] = reference_attention(q[None, heads], k[:, h:h + 1], v[:, h:h + 1],
                                         ctx - 1, scale)[0]
    return out


class ReferenceBackend:
    name = "reference"

    def forward(self, q: torch.Tensor, k_new: Optional[torch.Tensor],
                v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        spans = [(i, 1) for i in range(meta.num_decode_tokens)]
        spans += [(p.start, p.num_query_tokens) for p in meta.prefills]
        s = meta.block_size
        for r, (start, n) in enumerate(spans):
            if meta.heads is not None and meta.heads.tables[r] is not None:
                out[start] = _per_head_decode(q[start], kv, meta, r, scale)
                continue
            ctx = meta.context_lens[r]
            k, v = gather_context(kv, meta.block_tables[r], ctx, s)
            if k_new is not None and v_new is not None:  # the step's own rows, as stored
                k[ctx - n:] = k_new[start:start + n]
                v[ctx - n:] = v_new[start:start + n]
            if not kv.store.seals_later:
                out[start:start + n] = reference_attention(q[start:start + n], k, v, ctx - n,
                                                           scale)
                continue
            # a token reads its own block as stored and every earlier block sealed
            k_seal, v_seal = gather_context(kv, meta.block_tables[r], ctx, s, sealed=True)
            for p in range(ctx - n, ctx):
                own = p // s * s
                kp = torch.cat([k_seal[:own], k[own:p + 1]])
                vp = torch.cat([v_seal[:own], v[own:p + 1]])
                i = start + p - (ctx - n)
                out[i:i + 1] = reference_attention(q[i:i + 1], kp, vp, p, scale)
        return out


register_backend("reference", ReferenceBackend)
