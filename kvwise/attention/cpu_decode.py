"""Batched single-token (decode) attention over the paged KV cache, as one numba kernel for CPU.

Replaces gather-blocks + SDPA for decode rows on CPU (paged.decode_attention is the reference):
at batch 1 those are two index_select copies and a flash-attention call costing ~90 us per layer
for ~200 context tokens, more than the layer's int4 matmuls. The kernel reads K/V rows in place
through the block table: per (request, KV head) it scores the group of H/K query heads, takes a
softmax and sums V, in fp32.

Invariants:
- Each (request, KV head) is computed independently in a fixed order, so a request's output
  does not depend on the batch it runs in (batch invariance) or on the thread count.
- Preconditions (checked by `supported`): fp32 CPU tensors, head_dim % 16 == 0, contiguous
  caches [N*S, K, D] and q [B, H, D].
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kvwise.model.quant import runtime
from kvwise.model.quant.simd import (
    vexp,
    vfma,
    vload,
    vmul,
    vsplat,
    vstore,
    vsub,
    vsum,
    vzero,
)

runtime.preload_tbb()


_FASTMATH = set(runtime.EXACT_FASTMATH)


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def _decode_attention(q, k_cache, v_cache, block_ids, lens, block_size, scale, out):
    b_count, h_count, d = q.shape
    k_count = k_cache.shape[1]
    group = h_count // k_count
    nb = block_ids.shape[0] // b_count
    row = k_count * d  # elements per cache row (slot)
    for task in prange(b_count * k_count):
        b = task // k_count
        kh = task % k_count
        n = lens[b]
        offs = np.empty(n, np.int64)  # flat offset of (pos, kh) in the caches, looked up once
        for pos in range(n):
            slot = block_ids[b * nb + pos // block_size] * block_size + pos % block_size
            offs[pos] = slot * row + kh * d
        scores = np.empty((group, n), np.float32)
        for pos in range(n):
            ko = offs[pos]
            for g in range(group):
                qo = (b * h_count + kh * group + g) * d
                acc = vzero()
                for i in range(0, d, 16):
                    acc = vfma(vload(q, qo + i), vload(k_cache, ko + i), acc)
                scores[g, pos] = vsum(acc) * scale
        for g in range(group):
            m = scores[g, 0]
            for pos in range(1, n):
                m = max(m, scores[g, pos])
            total = np.float32(0.0)
            mv = vsplat(m)
            body = n // 16 * 16
            for pos in range(0, body, 16):  # 16 exponentials per vector op (simd.vexp)
                e = vexp(vsub(vload(scores, g * n + pos), mv))
                vstore(scores, g * n + pos, e)
                total += vsum(e)
            for pos in range(body, n):
                e = np.exp(scores[g, pos] - m)
                scores[g, pos] = e
                total += e
            inv = vsplat(np.float32(1.0) / total)
            oo = (b * h_count + kh * group + g) * d
            # one 16-lane slice of the output at a time, accumulated in a register over positions
            for i in range(0, d, 16):
                acc = vzero()
                for pos in range(n):
                    acc = vfma(vsplat(scores[g, pos]), vload(v_cache, offs[pos] + i), acc)
                vstore(out, oo + i, vmul(acc, inv))


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def decode_attention_into(q, k_cache, v_cache, block_ids, lens, block_size, scale, out):
    """The one entry both the per-op path and the fused decode step compile against, so the
    kernel is lowered in the same calling context either way (bit-identical results)."""
    _decode_attention(q, k_cache, v_cache, block_ids, lens, block_size, scale, out)


def supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32 and k_cache.dtype == torch.float32
            and q.shape[-1] % 16 == 0 and k_cache.is_contiguous())


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_ids: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                     scale: float) -> torch.Tensor:
    """q [B, H, D]; caches [N*S, K, D]; block_ids [B*nb] long; context_lens [B] long ->
    [B, H, D] fp32."""
    assert supported(q, k_cache) and v_cache.is_contiguous()
    q = q.contiguous()
    out = torch.empty_like(q)
    decode_attention_into(q.numpy(), k_cache.numpy(), v_cache.numpy(), block_ids.numpy(),
                      context_lens.numpy(), block_size, np.float32(scale), out.numpy())
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel at engine start."""
    kc = torch.zeros(16, 1, 16)
    decode_attention(torch.zeros(1, 2, 16), kc, kc, torch.zeros(1, dtype=torch.long),
                     torch.ones(1, dtype=torch.long), 16, 1.0)
