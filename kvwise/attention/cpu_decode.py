"""Batched single-token (decode) attention over the paged KV cache, as one numba kernel for CPU.

Replaces gather-blocks + SDPA for decode rows on CPU (paged.decode_attention is the reference):
at batch 1 those are two index_select copies and a flash-attention call costing ~90 us per layer
for ~200 context tokens, more than the layer's int4 matmuls. The kernel reads K/V rows in place
through the block table, one request per task (its KV heads split over tasks when there are
fewer than 4 requests); fp32 math over an fp32 or fp16 cache. Per query head: scores 16
positions at a time, their dot products reduced together (simd.vsum16: 30 shuffles instead of
16 horizontal sums), a softmax, then P.V with four running sums per 64 lanes in registers (a
KV head's three GQA query heads share each V load). Per-position horizontal sums and the sums
kept in memory were most of the time before (64 requests x 192 positions x 30 layers: 2.4 ms
per layer in the engine; isolated, with the cache out of L3: 1.67 -> 1.24 ms). The cache is
read once per step, from DRAM, so with many requests each task prefetches the next request's
rows while it computes (fp16 cache: 0.86 -> 0.70 ms per layer).

Invariants:
- Each request is computed independently, in a fixed order per (head, lane), so a request's output
  does not depend on the batch it runs in (batch invariance) or on the thread count.
- Per-head groups (FastGen): with K tables per request each KV head reads its own blocks and
  length; a head's outputs are the bits of a one-table call over its table (tested). The next
  request's rows are prefetched only with one table per request.
- Preconditions (checked by `supported`): fp32 q [B, H, D] on CPU, head_dim % 16 == 0,
  contiguous caches [N*S, K, D] in fp32 or fp16 (`--kv-cache-dtype float16`: widened to fp32 as
  they are loaded, half the bytes read; all arithmetic stays fp32), or int8 codes with an fp16
  scale per (position, KV head) (`--kv-cache-dtype int8`: the key scale multiplies the score,
  the value scale the softmax weight, so codes are read as they are, a quarter of fp32's
  bytes).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kvwise.cache.kv_store import KERNEL_KV_DTYPES, KernelKV, kernel_view
from kvwise.kernels.cpu import runtime
from kvwise.kernels.cpu.simd import (
    load_f16,
    prefetch,
    vexp,
    vfma,
    vload,
    vload_kv,
    vmul,
    vsplat,
    vstore,
    vsub,
    vsum,
    vsum16,
    vzero,
)

runtime.preload_tbb()


_FASTMATH = set(runtime.EXACT_FASTMATH)


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def _dot(q, qo, k_cache, ko, d):
    """Lane-wise partial dot product of q[qo:qo+d] and k_cache[ko:ko+d] (sum with vsum)."""
    acc = vzero()
    for i in range(0, d, 16):
        acc = vfma(vload(q, qo + i), vload_kv(k_cache, ko + i), acc)
    return acc


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def _pv3(scores, v_cache, base, n, j, vo0, inv, out, oo, d):
    """P.V of query heads j, j+1, j+2 (one KV head) over lanes vo0 .. vo0+63 of every
    position's V row -> out[oo + h*d ...] for h = 0, 1, 2: each V vector is loaded once for
    the three heads (twelve running sums in registers); per head the same FMA order as the
    one-head loop."""
    a00 = vzero()
    a01 = vzero()
    a02 = vzero()
    a03 = vzero()
    a10 = vzero()
    a11 = vzero()
    a12 = vzero()
    a13 = vzero()
    a20 = vzero()
    a21 = vzero()
    a22 = vzero()
    a23 = vzero()
    for pos in range(n):
        vo = base[pos] + vo0
        v0 = vload_kv(v_cache, vo)
        v1 = vload_kv(v_cache, vo + 16)
        v2 = vload_kv(v_cache, vo + 32)
        v3 = vload_kv(v_cache, vo + 48)
        p0 = vsplat(scores[j, pos])
        p1 = vsplat(scores[j + 1, pos])
        p2 = vsplat(scores[j + 2, pos])
        a00 = vfma(p0, v0, a00)
        a01 = vfma(p0, v1, a01)
        a02 = vfma(p0, v2, a02)
        a03 = vfma(p0, v3, a03)
        a10 = vfma(p1, v0, a10)
        a11 = vfma(p1, v1, a11)
        a12 = vfma(p1, v2, a12)
        a13 = vfma(p1, v3, a13)
        a20 = vfma(p2, v0, a20)
        a21 = vfma(p2, v1, a21)
        a22 = vfma(p2, v2, a22)
        a23 = vfma(p2, v3, a23)
    s0 = vsplat(inv[j])
    s1 = vsplat(inv[j + 1])
    s2 = vsplat(inv[j + 2])
    vstore(out, oo, vmul(a00, s0))
    vstore(out, oo + 16, vmul(a01, s0))
    vstore(out, oo + 32, vmul(a02, s0))
    vstore(out, oo + 48, vmul(a03, s0))
    vstore(out, oo + d, vmul(a10, s1))
    vstore(out, oo + d + 16, vmul(a11, s1))
    vstore(out, oo + d + 32, vmul(a12, s1))
    vstore(out, oo + d + 48, vmul(a13, s1))
    vstore(out, oo + 2 * d, vmul(a20, s2))
    vstore(out, oo + 2 * d + 16, vmul(a21, s2))
    vstore(out, oo + 2 * d + 32, vmul(a22, s2))
    vstore(out, oo + 2 * d + 48, vmul(a23, s2))


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def _prefetch_lines(k_cache, v_cache, block_ids, blk0, n, block_size, row, line, blk, off,
                    count):
    """Prefetch `count` more cache lines of one request's K rows, then its V rows (n positions
    in blocks block_ids[blk0:]), from block `blk` (>= its block count: V's) at element `off`
    of that block; -> the (blk, off) to continue from."""
    nblk = (n + block_size - 1) // block_size
    while count > 0 and blk < 2 * nblk:
        bi = blk if blk < nblk else blk - nblk
        start = block_ids[blk0 + bi] * block_size * row
        size = min(block_size, n - bi * block_size) * row  # elements of this block's rows
        stop = min(size, off + count * line)
        count -= (stop - off + line - 1) // line
        cache = k_cache if blk < nblk else v_cache
        for e in range(start + off, start + stop, line):
            prefetch(cache, e)
        off = stop
        if off >= size:
            off = 0
            blk += 1
    return blk, off


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def num_tasks(q, k_cache):
    """-> (tasks, split): one task per request, or per (request, KV head) when there are fewer
    than 4 requests (batch-1 decode: so both cores work)."""
    split = k_cache.shape[1] if q.shape[0] < 4 else 1
    return q.shape[0] * split, split


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def attention_task(q, k_cache, v_cache, k_scale, v_scale, block_ids, lens, block_size, scale, out,
                   task, split):
    """Task `task` of `num_tasks`: request task // split, its KV heads part task % split.
    k_scale, v_scale [N*S, K] fp16 as uint16 for int8 caches (value = code * scale), [0, 0]
    for dense ones. Tables per request G = len(lens) // B: 1 (every KV head reads table b,
    lens[b]) or K (KV head h reads table b * K + h, lens[b * K + h]: per-head groups)."""
    b_count, h_count, d = q.shape
    k_count = k_cache.shape[1]
    group = h_count // k_count
    g_count = lens.shape[0] // b_count
    per_head = g_count > 1
    nb = block_ids.shape[0] // (b_count * g_count)
    row = k_count * d  # elements per cache row (slot): every KV head of one position
    line = 64 // k_cache.itemsize  # elements per 64-byte cache line
    b = task // split
    part = task % split
    kh0 = part * k_count // split
    kh1 = (part + 1) * k_count // split
    h0 = kh0 * group
    hn = (kh1 - kh0) * group  # query heads of this task
    nt = kh1 - kh0 if per_head else 1  # tables this task reads
    n = 0  # the longest of them (row stride of `scores`)
    for ti in range(nt):
        n = max(n, lens[b * g_count + (kh0 + ti if per_head else 0)])
    base = np.empty((nt, n), np.int64)  # flat offset of each position's cache row, per table
    for ti in range(nt):
        gi = b * g_count + (kh0 + ti if per_head else 0)
        n_t = lens[gi]
        pos = 0
        blk = gi * nb
        while pos < n_t:  # block by block: no division per position
            start = block_ids[blk] * block_size * row
            for s in range(min(block_size, n_t - pos)):
                base[ti, pos + s] = start + s * row
            pos += block_size
            blk += 1
    quant = k_scale.shape[0] > 0
    # int8 caches: one more row holds a KV head's scale per position (no extra allocation)
    scores = np.empty((hn + 1 if quant else hn, n), np.float32)
    tok_scale = scores[hn if quant else 0]
    sc = vsplat(scale)
    # While this request computes, prefetch the next one's rows (the next task on this
    # thread): its K lines spread over the score chunks, its V lines in a burst per KV head
    # before P.V. The cache is read once, from DRAM, and without this the core waits on
    # it (64 requests x 192 positions, fp16: 0.86 -> 0.70 ms per layer; fp32, with K
    # prefetched at half that rate: 1.23 -> 1.25, unchanged). One table per request only.
    nxt = b + 1 if split == 1 and b + 1 < b_count and not per_head else -1
    pf_blk = 0
    pf_off = 0
    pf_per = 0
    n_next = 0
    lines = 0
    if nxt >= 0:
        n_next = lens[nxt]
        lines = 2 * ((n_next * row + line - 1) // line)  # K and V lines of the next request
        pf_per = lines // 2 // max(1, (n // 16) * hn) // max(1, k_cache.itemsize // 2) + 1
    for kh in range(kh0, kh1):
        kd = kh * d
        bk = base[kh - kh0 if per_head else 0]
        nk = lens[b * g_count + (kh if per_head else 0)]
        n16 = nk // 16 * 16
        if quant:
            _token_scales(k_scale, bk, row, k_count, kh, nk, tok_scale)
        for g in range(group):
            j = kh * group + g - h0
            qo = (b * h_count + kh * group + g) * d
            for c0 in range(0, n16, 16):
                if nxt >= 0:
                    pf_blk, pf_off = _prefetch_lines(k_cache, v_cache, block_ids, nxt * nb,
                                                     n_next, block_size, row, line, pf_blk,
                                                     pf_off, pf_per)
                r = vsum16(
                    _dot(q, qo, k_cache, bk[c0] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 1] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 2] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 3] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 4] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 5] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 6] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 7] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 8] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 9] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 10] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 11] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 12] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 13] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 14] + kd, d),
                    _dot(q, qo, k_cache, bk[c0 + 15] + kd, d))
                vstore(scores, j * n + c0, vmul(r, sc))
            for pos in range(n16, nk):
                scores[j, pos] = vsum(_dot(q, qo, k_cache, bk[pos] + kd, d)) * scale
            if quant:  # q . (codes * s) = (q . codes) * s
                for pos in range(nk):
                    scores[j, pos] *= tok_scale[pos]
    inv = np.empty(hn, np.float32)
    for j in range(hn):
        nj = lens[b * g_count + (kh0 + j // group if per_head else 0)]
        m = scores[j, 0]
        for pos in range(1, nj):
            m = max(m, scores[j, pos])
        total = np.float32(0.0)
        mv = vsplat(m)
        body = nj // 16 * 16
        for pos in range(0, body, 16):  # 16 exponentials per vector op (simd.vexp)
            e = vexp(vsub(vload(scores, j * n + pos), mv))
            vstore(scores, j * n + pos, e)
            total += vsum(e)
        for pos in range(body, nj):
            e = np.exp(scores[j, pos] - m)
            scores[j, pos] = e
            total += e
        inv[j] = np.float32(1.0) / total
    ob = (b * h_count + h0) * d
    d64 = d // 64 * 64
    for kh in range(kh0, kh1):
        bk = base[kh - kh0 if per_head else 0]
        nk = lens[b * g_count + (kh if per_head else 0)]
        if quant:  # fold the value scales into the (already normalised-by-inv) weights
            _token_scales(v_scale, bk, row, k_count, kh, nk, tok_scale)
            for g1 in range(group):
                j = kh * group + g1 - h0
                for pos in range(nk):
                    scores[j, pos] *= tok_scale[pos]
        if nxt >= 0:  # the next request's V rows, a third per KV head
            pf_blk, pf_off = _prefetch_lines(k_cache, v_cache, block_ids, nxt * nb,
                                             n_next, block_size, row, line, pf_blk, pf_off,
                                             lines // (2 * k_count) + 1)
        g = 0
        while g + 3 <= group:  # three query heads share each V load (GQA)
            j = kh * group + g - h0
            for i in range(0, d64, 64):
                _pv3(scores, v_cache, bk, nk, j, kh * d + i, inv, out, ob + j * d + i, d)
            g += 3
        for g1 in range(g, group):
            j = kh * group + g1 - h0
            oo = ob + j * d
            sv = vsplat(inv[j])
            for i in range(0, d64, 64):
                a0 = vzero()
                a1 = vzero()
                a2 = vzero()
                a3 = vzero()
                for pos in range(nk):
                    p = vsplat(scores[j, pos])
                    vo = bk[pos] + kh * d + i
                    a0 = vfma(p, vload_kv(v_cache, vo), a0)
                    a1 = vfma(p, vload_kv(v_cache, vo + 16), a1)
                    a2 = vfma(p, vload_kv(v_cache, vo + 32), a2)
                    a3 = vfma(p, vload_kv(v_cache, vo + 48), a3)
                vstore(out, oo + i, vmul(a0, sv))
                vstore(out, oo + i + 16, vmul(a1, sv))
                vstore(out, oo + i + 32, vmul(a2, sv))
                vstore(out, oo + i + 48, vmul(a3, sv))
        for g1 in range(group):
            j = kh * group + g1 - h0
            for i in range(d64, d, 16):
                a0 = vzero()
                for pos in range(nk):
                    a0 = vfma(vsplat(scores[j, pos]),
                              vload_kv(v_cache, bk[pos] + kh * d + i), a0)
                vstore(out, ob + j * d + i, vmul(a0, vsplat(inv[j])))


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy", inline="always")
def _token_scales(scales, base, row, k_count, kh, n, out):
    """out[pos] = scale of KV head kh at position pos (fp16 as uint16 [N*S, K] -> float32)."""
    for pos in range(n):
        out[pos] = load_f16(scales, base[pos] // row * k_count + kh)


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def _decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_ids, lens, block_size, scale,
                      out):
    tasks, split = num_tasks(q, k_cache)
    for task in prange(tasks):
        attention_task(q, k_cache, v_cache, k_scale, v_scale, block_ids, lens, block_size, scale,
                       out, task, split)


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def decode_attention_into(q, k_cache, v_cache, k_scale, v_scale, block_ids, lens, block_size,
                          scale, out):
    """The one entry both the per-op path and the fused decode step compile against, so the
    kernel is lowered in the same calling context either way (bit-identical results)."""
    _decode_attention(q, k_cache, v_cache, k_scale, v_scale, block_ids, lens, block_size, scale,
                      out)


def supported(q: torch.Tensor) -> bool:
    """Whether the kernel takes these queries (the caches: any `KernelKV` a store gives)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] % 16 == 0


def decode_attention(q: torch.Tensor, kv: KernelKV, block_ids: torch.Tensor,
                     context_lens: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q [B, H, D]; kv one layer's kernel arrays (caches [N*S, K, D] fp32, fp16 or int8 with
    scales); block_ids [B*G*nb] long; context_lens [B*G] long, each >= 1 -> [B, H, D] fp32.
    G = 1: one table per request for all its KV heads; G = K: per-head groups, KV head h of
    request b reads table b*K + h (a dense request in such a batch repeats its table K times,
    which gives the bits of G = 1)."""
    assert supported(q)
    q = q.contiguous()
    out = torch.empty_like(q)
    decode_attention_into(q.numpy(), kv.k, kv.v, kv.k_scale, kv.v_scale, block_ids.numpy(),
                          context_lens.numpy(), block_size, np.float32(scale), out.numpy())
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) the kernel at engine start."""
    for dtype in KERNEL_KV_DTYPES + (torch.int8,):
        kc = torch.zeros(16, 1, 16, dtype=dtype)
        kv = KernelKV(kernel_view(kc), kernel_view(kc))
        if dtype == torch.int8:
            sc = kernel_view(torch.zeros(16, 1, dtype=torch.float16))
            kv = KernelKV(kv.k, kv.v, sc, sc)
        decode_attention(torch.zeros(1, 2, 16), kv, torch.zeros(1, dtype=torch.long),
                         torch.ones(1, dtype=torch.long), 16, 1.0)
