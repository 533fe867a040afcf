"""Fast paged attention: batched decode over gathered slots, SDPA per prefill span.

Invariants:
- Decode queries of all requests run as one batched SDPA over a padded gather of whole blocks
  whose ids and mask were built once per step (shared by every layer).
- A prefill span attends to its own tokens through the step's fresh K/V (the values the store
  keeps, passed in by the model, never read back through the format); earlier context is
  gathered from the store in whole blocks, with a position-based causal mask. Over a format
  that `seals_later` (KVQuant) the history is still read once per layer: queries run in
  windows of whole blocks, each a masked SDPA over the sealed rows before its blocks and the
  as-stored rows of its blocks.
- History is read only through the layer's `LayerKV` (format-independent): the CPU decode
  kernel takes `kv.kernel` (dense or int8 arrays in place), the KVQuant one `kv.kvquant` (codes
  in place, cpu_decode_kvquant), the PyTorch paths dequantized rows.
- Grouped-query attention: query head h reads KV head h // (H // K).
- Batch-invariant mode (`meta.row_context_lens` set): every row, prefill rows included, is a
  decode-kernel query over the cache, so a token's attention output is the same bits whether its
  step was a decode, a whole prompt, a chunk or a prefix-cache hit's tail.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from kvwise.attention.backend import AttentionMetadata, PrefillSpan, register_backend
from kvwise.cache.kv_store import KVStore, LayerKV


def decode_attention(q: torch.Tensor, kv: LayerKV, block_ids: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [B, H, D]; block_ids [B*nb]; mask [B, 1, 1, nb*S] -> [B, H, D] (PyTorch path: gathers
    whole blocks of every request, read through the store's format)."""
    b, h, d = q.shape
    k, v = kv.gather_blocks(block_ids)  # [B*nb*S, K, D] each
    kh = k.shape[1]
    k = k.to(q.dtype).view(b, -1, kh, d).transpose(1, 2)
    v = v.to(q.dtype).view(b, -1, kh, d).transpose(1, 2)
    # k, v [B, K, L, D]; SDPA's CPU kernel handles the GQA grouping without copying KV
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale,
                                         enable_gqa=kh != h)  # [B, H, 1, D]
    return out[:, :, 0]


def decode_attention_heads(q: torch.Tensor, kv: LayerKV, block_ids: torch.Tensor,
                           context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor:
    """Per-head tables (a layer view of a step with many-group rows): q [B, H, D]; block_ids
    [B*K*nb] (row b, KV head h: table b*K + h); context_lens [B*K] -> [B, H, D] (PyTorch
    path: gathers every head's blocks and keeps each table's own head)."""
    b, h, d = q.shape
    kh = kv.store.num_kv_heads
    k, v = kv.gather_blocks(block_ids)  # [B*K*nb*S, K, D]
    k = k.view(b, kh, -1, kh, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [B, K, L, D]
    v = v.view(b, kh, -1, kh, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    length = k.shape[2]
    mask = torch.arange(length, device=q.device)[None, :] < context_lens[:, None]  # [B*K, L]
    mask = mask.view(b, kh, 1, length).repeat_interleave(h // kh, dim=1)  # [B, H, 1, L]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k.to(q.dtype), v.to(q.dtype),
                                         attn_mask=mask, scale=scale, enable_gqa=kh != h)
    return out[:, :, 0]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_prior: int,
                      scale: float) -> torch.Tensor:
    """q [Tq, H, D]; k, v [C, K, D] with C >= num_prior + Tq (extra rows are masked) ->
    [Tq, H, D]."""
    tq, h, _ = q.shape
    c, kh, _ = k.shape
    if num_prior == 0 and c == tq:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=kh != h)  # [1, H, Tq, D]
        return out[0].transpose(0, 1)
    q_pos = num_prior + torch.arange(tq, device=q.device)[:, None]  # [Tq, 1]
    allowed = torch.arange(c, device=q.device)[None, :] <= q_pos  # [Tq, C]
    return masked_attention(q, k, v, allowed, scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [Tq, H, D]; k, v [C, K, D]; mask [Tq, C] bool (True = attend) -> [Tq, H, D]."""
    h, kh = q.shape[1], k.shape[1]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                         enable_gqa=kh != h)
    return out[0].transpose(0, 1)


def step_rows(k_new: Optional[torch.Tensor], v_new: Optional[torch.Tensor], kv: LayerKV,
              meta: AttentionMetadata, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V [n, K, D] of the step's tokens in `rows`: the fresh rows the model passed, or (None:
    the rope kernel wrote them straight into a dense cache) the same values read back."""
    if k_new is not None and v_new is not None:
        return k_new[rows], v_new[rows]
    return kv.gather_rows(meta.slot_mapping[rows])


def prefill_spans_attention(q: torch.Tensor, k_new: Optional[torch.Tensor],
                            v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                            scale: float, out: torch.Tensor) -> None:
    """Write every prefill span's attention into `out` [T, H, D] (q [T, H, D]; k_new, v_new
    [T, K, D] or None). A span's own tokens come from the step's fresh rows, its earlier
    context from the store. Shared by every backend whose prefill is the paged one."""
    if kv.store.seals_later:
        for span in meta.prefills:
            _span_by_block(q, k_new, v_new, kv, meta, span, scale, out)
        return
    for span in meta.prefills:
        rows = slice(span.start, span.start + span.num_query_tokens)
        k_own, v_own = step_rows(k_new, v_new, kv, meta, rows)  # [Tq, K, D]
        if span.context_block_ids is None:
            k, v = k_own, v_own
        else:
            k, v = kv.gather_blocks(span.context_block_ids)  # [C', K, D], C' >= C
            own = slice(span.num_prior_tokens, span.num_context_tokens)
            k[own] = k_own
            v[own] = v_own
        out[rows] = prefill_attention(q[rows], k.to(q.dtype), v.to(q.dtype),
                                      span.num_prior_tokens, scale)


def _span_by_block(q: torch.Tensor, k_new: Optional[torch.Tensor],
                   v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                   span: PrefillSpan, scale: float, out: torch.Tensor) -> None:
    """One prefill span over a format whose rows read differently once sealed (KVQuant's
    open tail): a query attends to the rows of its own block as stored (the step's fresh rows,
    and earlier rows of an open block as the store keeps them) and to every earlier block
    sealed, exactly what a decode token or a later chunk at the same position reads, so the
    output does not depend on where a chunk ends.

    History is read once per layer (sealed view up to the last query's block, as-stored view
    from the first query's block on); queries run in windows of whole blocks, each one masked
    SDPA over [sealed rows before its last block ; as-stored rows of its blocks]."""
    s = meta.block_size
    rows = slice(span.start, span.start + span.num_query_tokens)
    k_own, v_own = step_rows(k_new, v_new, kv, meta, rows)  # [Tq, K, D] as stored
    prior, ctx = span.num_prior_tokens, span.num_context_tokens
    b0 = prior // s * s  # first position of the first query's block
    sealed_end = (ctx - 1) // s * s  # first position of the last query's block
    ids = span.context_block_ids
    if ids is None:  # prior == 0: the span's own rows are its whole context
        own_rows = meta.slot_mapping[rows]
        k_seal, v_seal = kv.store.gather_rows_sealed(kv.layer, own_rows[:sealed_end])
        k_as, v_as = k_own, v_own
    else:
        k_seal, v_seal = kv.gather_blocks_sealed(ids[:sealed_end // s])
        if prior > b0:  # earlier rows of the open block the span starts in, as stored
            head = ids[b0 // s] * s + torch.arange(prior - b0, device=ids.device)
            k_head, v_head = kv.gather_rows(head)
            k_as, v_as = torch.cat([k_head, k_own]), torch.cat([v_head, v_own])
        else:
            k_as, v_as = k_own, v_own
    a = prior
    while a < ctx:
        e = min(ctx, a // s * s + _WINDOW * s)  # queries a..e-1, whole blocks but the last
        ba, be = a // s * s, (e - 1) // s * s
        pos = torch.arange(a, e, device=q.device)[:, None]  # [nq, 1]
        own_start = pos // s * s
        as_pos = torch.arange(ba, e, device=q.device)[None, :]
        mask = torch.cat([torch.arange(be, device=q.device)[None, :] < own_start,
                          (as_pos >= own_start) & (as_pos <= pos)], dim=1)  # [nq, be + e - ba]
        k = torch.cat([k_seal[:be], k_as[ba - b0:e - b0]]).to(q.dtype)
        v = torch.cat([v_seal[:be], v_as[ba - b0:e - b0]]).to(q.dtype)
        qr = slice(span.start + a - prior, span.start + e - prior)
        out[qr] = masked_attention(q[qr], k, v, mask, scale)
        a = e


_WINDOW = 16  # blocks of queries per masked SDPA in _span_by_block


class PagedBackend:
    name = "paged"

    def __init__(self) -> None:
        # CPU decode rows go through one numba kernel reading the cache in place (cpu_decode.py:
        # ~90 -> ~35 us per layer at batch 1, 25x faster than the padded gather at batch 4).
        from kvwise.attention import cpu_decode, cpu_decode_kvquant

        cpu_decode.warmup()
        self._cpu_decode = cpu_decode
        self._cpu_kvquant = cpu_decode_kvquant  # KVQuant codes read in place, RoPE on the fly

    def warm(self, store: KVStore) -> None:
        """Compile (or load from numba's cache) the kernels decode will run on this store: the
        KVQuant kernel (a cold compile takes ~20-40 s, so it happens here, at engine start, and
        only for an engine that stores a KVQuant format in fp32 compute)."""
        arrays = store.layer(0).kvquant
        if arrays is not None and store.compute_dtype == torch.float32:
            self._cpu_kvquant.warmup(arrays.bits)

    def _decode(self, q: torch.Tensor, kv: LayerKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        kern = kv.kernel
        if kern is not None and self._cpu_decode.supported(q):
            return self._cpu_decode.decode_attention(q, kern, meta.decode_block_ids,
                                                     meta.decode_context_lens, meta.block_size,
                                                     scale)
        if kern is None and self._cpu_kvquant.supported(q):
            arrays = kv.kvquant
            if arrays is not None:
                return self._cpu_kvquant.decode_attention_kvquant(
                    q, arrays, meta.decode_block_ids, meta.decode_context_lens,
                    meta.block_size, scale)
        if meta.slot_mapping_heads is not None:  # per-head tables (many-group rows)
            return decode_attention_heads(q, kv, meta.decode_block_ids,
                                          meta.decode_context_lens, meta.block_size, scale)
        return decode_attention(q, kv, meta.decode_block_ids, meta.decode_mask, scale)

    def forward(self, q: torch.Tensor, k_new: Optional[torch.Tensor],
                v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        if meta.row_context_lens is not None:  # batch-invariant mode: rows as decode queries
            kern = kv.kernel
            if kern is None or not self._cpu_decode.supported(q):
                raise RuntimeError("batch-invariant attention needs the CPU decode kernel "
                                   "(fp32 queries, a float32/float16/int8 KV cache)")
            return self._cpu_decode.decode_attention(q, kern, meta.row_block_ids,
                                                     meta.row_context_lens, meta.block_size,
                                                     scale)
        bd = meta.num_decode_tokens
        if not meta.prefills:
            return self._decode(q, kv, meta, scale)
        out = torch.empty_like(q)
        if bd:
            out[:bd] = self._decode(q[:bd], kv, meta, scale)
        prefill_spans_attention(q, k_new, v_new, kv, meta, scale, out)
        return out


register_backend("paged", PagedBackend)
