"""Fast paged attention: batched decode over gathered slots, SDPA per prefill span.

Invariants:
- Decode queries of all requests run as one batched product over a padded [Bd, Lmax] gather
  whose slot indices and mask were built once per step (shared by every layer).
- A prefill span with no earlier context attends to the cache rows it just wrote (no gather);
  otherwise it gathers its context slots and uses a position-based causal mask.
- Grouped-query attention: query head h reads KV head h // (H // K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvwise.attention.backend import AttentionMetadata, register_backend


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [N*S, K, D]; slots [B, L]; mask [B, 1, 1, L] -> [B, H, D]."""
    b, h, d = q.shape
    kh = k_cache.shape[1]
    k = k_cache[slots].transpose(1, 2)  # [B, K, L, D]
    v = v_cache[slots].transpose(1, 2)  # [B, K, L, D]
    qg = q.view(b, kh, h // kh, d)  # [B, K, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B, K, G, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # [B, K, G, D]
    return out.reshape(b, h, d)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prior: int,
                      scale: float) -> torch.Tensor:
    """q [Tq, H, D]; k, v [C, K, D] with C = num_prior + Tq -> [Tq, H, D]."""
    tq, h, d = q.shape
    c, kh, _ = k.shape
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, H, Tq, D]
    kt = k.transpose(0, 1).unsqueeze(0)  # [1, K, C, D]
    vt = v.transpose(0, 1).unsqueeze(0)  # [1, K, C, D]
    if kh != h:
        kt = kt.repeat_interleave(h // kh, dim=1)  # [1, H, C, D]
        vt = vt.repeat_interleave(h // kh, dim=1)
    if num_prior == 0:
        out = F.scaled_dot_product_attention(qh, kt, vt, is_causal=True, scale=scale)
    else:
        q_pos = num_prior + torch.arange(tq, device=q.device)[:, None]  # [Tq, 1]
        allowed = torch.arange(c, device=q.device)[None, :] <= q_pos  # [Tq, C]
        out = F.scaled_dot_product_attention(qh, kt, vt, attn_mask=allowed, scale=scale)
    return out[0].transpose(0, 1)  # [Tq, H, D]


class PagedBackend:
    name = "paged"

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        bd = meta.num_decode_tokens
        if not meta.prefills:
            return decode_attention(q, k_cache, v_cache, meta.decode_slots, meta.decode_mask, scale)
        out = torch.empty_like(q)
        if bd:
            out[:bd] = decode_attention(q[:bd], k_cache, v_cache, meta.decode_slots,
                                        meta.decode_mask, scale)
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.num_query_tokens)
            if span.context_slots is None:
                own = meta.slot_mapping[rows]
                k, v = k_cache[own], v_cache[own]  # [Tq, K, D]
            else:
                k, v = k_cache[span.context_slots], v_cache[span.context_slots]  # [C, K, D]
            out[rows] = prefill_attention(q[rows], k, v, span.num_prior_tokens, scale)
        return out


register_backend("paged", PagedBackend)
