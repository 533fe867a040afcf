"""Decode attention over a KVQuant cache (kvwise.cache.kvquant_kv) as one numba kernel for CPU,
reading the packed codes in place: no dense copy of the cache is built.

Per request and KV head, as kvwise.attention.cpu_decode does for dense caches:
1. Scores, 16 positions at a time: each position's key is dequantized and rotated into a
   16-row tile (fp32, in L1): 16 codes unpacked and looked up with one `simd.vload_lut`
   (`vpermps` on AVX-512), times the channel's calibrated scale plus its zero (one FMA); the
   row's used fp16 outlier slots are stored over their channels (an unused slot, channel
   NO_OUTLIER, goes to a spare element past the tile, so it can never land on a used channel:
   the rule of quantizer.dequantize); then RoPE at the row's position (rotate-half, from the
   model's cos/sin tables). Open blocks and sink rows load fp16 pre-RoPE keys from their pools
   instead of codes. The GQA query heads of the KV head then reduce their dot products against
   the tile (simd.vsum16).
2. Softmax (simd.vexp), as cpu_decode.
3. P.V: each position's value vectors are made once, lut[code] * s_t + z_t (one lookup and one
   FMA per 16 channels, s_t, z_t the token's fp16 range) with the outlier lanes blended in
   exactly (`simd.vput`), and shared by up to three query heads of the KV head.
The reference is paged.decode_attention (the store's gather_blocks + SDPA); the KV values a
reader sees are defined by KVQuantKV.gather_rows.

Invariants:
- Each request is computed independently, in a fixed order per (head, lane), so its output
  does not depend on the batch it runs in or on the thread count (one task per request, or per
  (request, KV head) below 4 requests: a KV head's arithmetic is the same either way).
- A row reads what KVQuantKV.gather_rows returns for it: its open block's fp16 tail entry, else
  its sink entry (a row at offset < sink_tokens of a block with a sink entry, at a position
  < sink_tokens), else its codes; keys rotated at `positions[row]`.
- One compiled specialization serves every code width (`_lut` branches on it), so an engine
  compiles, or loads from numba's cache, the kernel once (`warmup`, at engine start: a cold
  compile takes ~20-40 s) whatever its format. Compile time is numba inlining IR: the big helpers
  are inlined at one call site each; attention_task stays inlined into the parallel loop (as a
  separate function it ran 1.7x slower, measured; part of that is the noalias arguments numba
  gives the parallel region's body); the prefetch walks are plain calls (once per 16 positions).
- Preconditions (checked by `supported` and asserted): fp32 q [B, H, D] on CPU, D % 16 == 0,
  D < NO_OUTLIER, 2..4-bit codes, contiguous arrays as `KVQuantKV.kernel_arrays` gives them.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from kvwise.cache.kvquant_kv import KVQuantArrays
from kvwise.kernels.cpu import runtime
from kvwise.kernels.cpu.simd import (
    load_f16,
    prefetch,
    prefetch_l2,
    vexp,
    vfma,
    vfnma,
    vload,
    vload_kv,
    vload_lut,
    vmul,
    vput,
    vsplat,
    vstore,
    vsub,
    vsum,
    vsum16,
    vzero,
)

runtime.preload_tbb()

_FASTMATH = set(runtime.EXACT_FASTMATH)
_OPTS = dict(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
NO_OUTLIER = 255  # kvwise.cache.kvquant.quantizer.NO_OUTLIER
QUANT, TAIL, SINK = 0, 1, 2  # where a position's row is read from
PREFETCH_CHUNKS = 4  # how many 16-position chunks ahead the first pass prefetches rows


@njit(inline="always", **_OPTS)
def _lut(table, arr, offset, bits):
    """simd.vload_lut at a run-time code width: the width is a literal in the lookup's shuffle
    masks, so each width is its own branch here (a loop-invariant, predicted branch), and the
    kernel is one compiled specialization for every width instead of one per width (a cold
    compile is tens of seconds)."""
    if bits == 4:
        return vload_lut(table, arr, offset, 4)
    if bits == 3:
        return vload_lut(table, arr, offset, 3)
    return vload_lut(table, arr, offset, 2)


@njit(inline="always", **_OPTS)
def _dot(q, qo, tile, to, d):
    """Lane-wise partial dot product of q[qo:qo+d] and tile[to:to+d] (sum with vsum)."""
    acc = vzero()
    for i in range(0, d, 16):
        acc = vfma(vload(q, qo + i), vload(tile, to + i), acc)
    return acc


@njit(inline="always", **_OPTS)
def _dots16(q, qo, tile, d):
    """The 16 dot products of q[qo:qo+d] with the tile's rows, as one vector (row r in lane r):
    each row's lanes accumulate in `_dot`'s order, q's vector loaded once for the 16 rows."""
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    a4 = vzero()
    a5 = vzero()
    a6 = vzero()
    a7 = vzero()
    a8 = vzero()
    a9 = vzero()
    a10 = vzero()
    a11 = vzero()
    a12 = vzero()
    a13 = vzero()
    a14 = vzero()
    a15 = vzero()
    for i in range(0, d, 16):
        x = vload(q, qo + i)
        a0 = vfma(x, vload(tile, i), a0)
        a1 = vfma(x, vload(tile, d + i), a1)
        a2 = vfma(x, vload(tile, 2 * d + i), a2)
        a3 = vfma(x, vload(tile, 3 * d + i), a3)
        a4 = vfma(x, vload(tile, 4 * d + i), a4)
        a5 = vfma(x, vload(tile, 5 * d + i), a5)
        a6 = vfma(x, vload(tile, 6 * d + i), a6)
        a7 = vfma(x, vload(tile, 7 * d + i), a7)
        a8 = vfma(x, vload(tile, 8 * d + i), a8)
        a9 = vfma(x, vload(tile, 9 * d + i), a9)
        a10 = vfma(x, vload(tile, 10 * d + i), a10)
        a11 = vfma(x, vload(tile, 11 * d + i), a11)
        a12 = vfma(x, vload(tile, 12 * d + i), a12)
        a13 = vfma(x, vload(tile, 13 * d + i), a13)
        a14 = vfma(x, vload(tile, 14 * d + i), a14)
        a15 = vfma(x, vload(tile, 15 * d + i), a15)
    return vsum16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15)


@njit(inline="always", **_OPTS)
def _key16(kb, i, keys, ktab, kd, bits):
    """Pre-RoPE key lanes i .. i+15 of one (row, KV head) from its codes at byte kb: the
    looked-up values times the channels' scales plus their zeros (outliers not applied)."""
    k_codes, k_zero, k_scale = keys[0], keys[2], keys[3]
    return vfma(_lut(ktab, k_codes, kb + i * bits // 8, bits), vload(k_scale, kd + i),
                vload(k_zero, kd + i))


@njit(inline="always", **_OPTS)
def _key_row(tile, to, kind, kb, xo, keys, ktab, kd, ck, tail_k, sink_k, cos, sin, po, rbuf, d,
             bits):
    """tile[to:to+d] = one row's key rotated at its position (cos/sin rows at po): from its
    codes at byte kb (kind QUANT; the used outlier slots xo .. xo+ck-1 are stored over their
    lanes exactly) or from fp16 pre-RoPE tail_k / sink_k[kb:kb+d] (TAIL / SINK). The pre-RoPE
    row goes through the tile: an outlier costs one scalar store instead of a compare and
    blend per vector, and an unused slot (channel NO_OUTLIER >= d) stores to the spare element
    tile[16*d], so it can never overwrite a used channel (as quantizer.dequantize reads it)."""
    k_out_idx, k_out_val = keys[4], keys[5]
    if kind == QUANT:
        for i in range(0, d, 16):
            vstore(tile, to + i, _key16(kb, i, keys, ktab, kd, bits))
        for s in range(ck):
            o = np.uint64(xo + s)  # unsigned: no negative-index wraparound
            c = np.int64(k_out_idx[o])
            tile[to + c if c < d else 16 * d] = load_f16(k_out_val, o)
    elif kind == TAIL:
        for i in range(0, d, 16):
            vstore(tile, to + i, vload_kv(tail_k, kb + i))
    else:
        for i in range(0, d, 16):
            vstore(tile, to + i, vload_kv(sink_k, kb + i))
    h = d // 2
    if h % 16 == 0:  # rotate-half pairs whole vectors
        for i in range(0, h, 16):
            a = vload(tile, to + i)
            b = vload(tile, to + i + h)
            vstore(tile, to + i, vfnma(b, vload(sin, po + i), vmul(a, vload(cos, po + i))))
            vstore(tile, to + i + h, vfma(a, vload(sin, po + i + h),
                                          vmul(b, vload(cos, po + i + h))))
        return
    # other D: rbuf = [-x, x]; rotate_half(x)[i] = rbuf[i + h] for every i < D
    for i in range(0, d, 16):
        x = vload(tile, to + i)
        vstore(rbuf, i, vsub(vzero(), x))
        vstore(rbuf, d + i, x)
    for i in range(0, d, 16):
        vstore(tile, to + i, vfma(vload(rbuf, h + i), vload(sin, po + i),
                                  vmul(vload(rbuf, d + i), vload(cos, po + i))))


@njit(inline="always", **_OPTS)
def _values4(rk, vo, values, vtab, cv, nbytes, nv, bits):
    """nv <= 4 vectors of value lanes vo .. vo+16nv of (row, KV head) rk = row * K + head:
    lut[code] * s + z, outlier lanes replaced by their exact fp16 values (the others zero)."""
    v_codes, v_zero, v_scale, v_out_idx, v_out_val = (values[0], values[2], values[3],
                                                       values[4], values[5])
    sv = vsplat(load_f16(v_scale, rk))
    zv = vsplat(load_f16(v_zero, rk))
    cb = rk * nbytes + vo * bits // 8
    v0 = vfma(_lut(vtab, v_codes, cb, bits), sv, zv)
    v1 = vfma(_lut(vtab, v_codes, cb + 2 * bits, bits), sv, zv) if nv > 1 else vzero()
    v2 = vfma(_lut(vtab, v_codes, cb + 4 * bits, bits), sv, zv) if nv > 2 else vzero()
    v3 = vfma(_lut(vtab, v_codes, cb + 6 * bits, bits), sv, zv) if nv > 3 else vzero()
    for s in range(cv):
        o = np.uint64(rk * cv + s)  # unsigned: no negative-index wraparound
        c = v_out_idx[o]
        x = load_f16(v_out_val, o)
        v0 = vput(v0, vo, c, x)
        v1 = vput(v1, vo + 16, c, x)
        v2 = vput(v2, vo + 32, c, x)
        v3 = vput(v3, vo + 48, c, x)
    return v0, v1, v2, v3


@njit(inline="always", **_OPTS)
def _pv_lanes(w, j, nh, n, kind, row, prow, kh, values, vtab, pools, dims, vo0, nv, inv, out,
              oo, d, block_size, lead, bits):
    """out[oo + hh*d + vo0 ...] = inv[j + hh] * sum_pos w[j + hh, pos] * v_pos[vo0 : vo0 + 16 nv]
    for nh <= 3 query heads (one KV head kh) and nv <= 4 vectors of lanes: each position's value
    vectors are made once for the heads (from codes, `_values4`, or the fp16 pool row). The
    `lead` pass (the task's first over the values) prefetches rows a few chunks ahead."""
    k_count, nbytes, cv = dims[0], dims[1], dims[3]
    tail_v, sink_v = pools[1], pools[3]
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
    for c0 in range(0, n, 16):
        if lead:  # the V rows prefetched by the score pass may have left L1 (and the TLB)
            _prefetch_values(c0 + PREFETCH_CHUNKS * 16, n, row, block_size, values, dims)
        for pos in range(c0, min(c0 + 16, n)):
            k = kind[pos]
            if k == QUANT:
                v0, v1, v2, v3 = _values4(row[pos] * k_count + kh, vo0, values, vtab, cv, nbytes,
                                          nv, bits)
            elif k == TAIL:
                v0, v1, v2, v3 = _pool4(tail_v, (prow[pos] * k_count + kh) * d + vo0, nv)
            else:
                v0, v1, v2, v3 = _pool4(sink_v, (prow[pos] * k_count + kh) * d + vo0, nv)
            p0 = vsplat(w[j, pos])
            a00 = vfma(p0, v0, a00)
            a01 = vfma(p0, v1, a01)
            a02 = vfma(p0, v2, a02)
            a03 = vfma(p0, v3, a03)
            if nh > 1:
                p1 = vsplat(w[j + 1, pos])
                a10 = vfma(p1, v0, a10)
                a11 = vfma(p1, v1, a11)
                a12 = vfma(p1, v2, a12)
                a13 = vfma(p1, v3, a13)
            if nh > 2:
                p2 = vsplat(w[j + 2, pos])
                a20 = vfma(p2, v0, a20)
                a21 = vfma(p2, v1, a21)
                a22 = vfma(p2, v2, a22)
                a23 = vfma(p2, v3, a23)
    _store4(out, oo + vo0, a00, a01, a02, a03, inv[j], nv)
    if nh > 1:
        _store4(out, oo + d + vo0, a10, a11, a12, a13, inv[j + 1], nv)
    if nh > 2:
        _store4(out, oo + 2 * d + vo0, a20, a21, a22, a23, inv[j + 2], nv)


@njit(inline="always", **_OPTS)
def _pool4(pool, base, nv):
    """nv <= 4 vectors of an fp16 pool row from element base (the others zero)."""
    v0 = vload_kv(pool, base)
    v1 = vload_kv(pool, base + 16) if nv > 1 else vzero()
    v2 = vload_kv(pool, base + 32) if nv > 2 else vzero()
    v3 = vload_kv(pool, base + 48) if nv > 3 else vzero()
    return v0, v1, v2, v3


@njit(inline="always", **_OPTS)
def _store4(out, o, a0, a1, a2, a3, inv, nv):
    s = vsplat(inv)
    vstore(out, o, vmul(a0, s))
    if nv > 1:
        vstore(out, o + 16, vmul(a1, s))
    if nv > 2:
        vstore(out, o + 32, vmul(a2, s))
    if nv > 3:
        vstore(out, o + 48, vmul(a3, s))


@njit(inline="always", **_OPTS)
def num_tasks(b_count, k_count):
    """-> (tasks, split): one task per request, or per (request, KV head) when there are fewer
    than 4 requests (batch-1 decode: so both cores work)."""
    split = k_count if b_count < 4 else 1
    return b_count * split, split


@njit(inline="always", **_OPTS)
def _rows(block_ids, blk0, n, block_size, rows, sink_rows, sink_tokens, row, kind, prow):
    """Per position of one request: its flat row, where it is read from, its pool row."""
    positions, open_, tail_slot, sink_slot = rows
    for p in range(n):
        blk = block_ids[blk0 + p // block_size]
        off = p % block_size
        r = blk * block_size + off
        row[p] = r
        if open_[blk]:
            kind[p] = TAIL
            prow[p] = tail_slot[blk] * block_size + off
        elif sink_slot[blk] >= 0 and positions[r] < sink_tokens and off < sink_rows:
            kind[p] = SINK
            prow[p] = sink_slot[blk] * sink_rows + off
        else:
            kind[p] = QUANT
            prow[p] = r


@njit(inline="always", **_OPTS)
def _prefetch_span(arr, start, count, level):
    """Prefetch the cache lines of arr[start : start + count] (flat elements) into L2
    (level 2) or L1 (3)."""
    if count <= 0:
        return
    step = 64 // arr.itemsize
    for e in range(start, start + count, step):
        if level == 3:
            prefetch(arr, e)
        else:
            prefetch_l2(arr, e)
    if level == 3:
        prefetch(arr, start + count - 1)
    else:
        prefetch_l2(arr, start + count - 1)


@njit(inline="always", **_OPTS)
def _prefetch_rows(r0, m, keys, values, positions, dims):
    """prefetch_l2 everything sealed rows r0 .. r0+m-1 (one block's, contiguous) are read
    from: K and V codes, value scales and zeros, outlier slots, positions (all KV heads)."""
    k_count, nbytes, ck, cv = dims[0], dims[1], dims[2], dims[3]
    a, n = r0 * k_count, m * k_count  # (row, KV head) pairs
    _prefetch_span(keys[0], a * nbytes, n * nbytes, 2)
    _prefetch_span(values[0], a * nbytes, n * nbytes, 2)
    _prefetch_span(values[2], a, n, 2)
    _prefetch_span(values[3], a, n, 2)
    _prefetch_span(keys[4], a * ck, n * ck, 2)
    _prefetch_span(keys[5], a * ck, n * ck, 2)
    _prefetch_span(values[4], a * cv, n * cv, 2)
    _prefetch_span(values[5], a * cv, n * cv, 2)
    _prefetch_span(positions, r0, m, 2)


@njit(**_OPTS)  # a plain call, not inlined: compile time (module docstring)
def _prefetch_chunk(c0, n, row, block_size, keys, values, positions, dims):
    """Prefetch the rows of positions c0 .. c0+15 of the request (block by block)."""
    p = c0
    end = min(c0 + 16, n)
    while p < end:
        m = min(block_size - row[p] % block_size, end - p)  # rows left in p's block
        _prefetch_rows(row[p], m, keys, values, positions, dims)
        p += m


@njit(**_OPTS)  # a plain call, not inlined: compile time (module docstring)
def _prefetch_values(c0, n, row, block_size, values, dims):
    """prefetch (to L1) the value rows (codes, scales, zeros, outliers; all KV heads) of
    positions c0 .. c0+15, block by block."""
    k_count, nbytes, cv = dims[0], dims[1], dims[3]
    p = c0
    end = min(c0 + 16, n)
    while p < end:
        m = min(block_size - row[p] % block_size, end - p)
        a, na = row[p] * k_count, m * k_count  # (row, KV head) pairs
        _prefetch_span(values[0], a * nbytes, na * nbytes, 3)
        _prefetch_span(values[2], a, na, 3)
        _prefetch_span(values[3], a, na, 3)
        _prefetch_span(values[4], a * cv, na * cv, 3)
        _prefetch_span(values[5], a * cv, na * cv, 3)
        p += m


@njit(inline="always", **_OPTS)
def _scores(q, b, kh, group, h0, n, row, kind, prow, keys, ktab, values, pools, rope, positions,
            dims, block_size, lead, scale, scores, tile, rbuf, bits):
    """scores[j, :n] = scale * q_j . key_pos for the query heads j of KV head kh (task-local
    rows kh*group - h0 ...), 16 keys at a time through the tile."""
    h_count, d = q.shape[1], q.shape[2]
    k_count, nbytes, ck = dims[0], dims[1], dims[2]
    tail_k, sink_k = pools[0], pools[2]
    cos, sin = rope
    kd = kh * d
    sc = vsplat(scale)
    if lead:  # the request's first rows: nothing before them to hide the misses behind
        for c in range(0, PREFETCH_CHUNKS * 16, 16):
            _prefetch_chunk(c, n, row, block_size, keys, values, positions, dims)
    for c0 in range(0, n, 16):
        m = min(16, n - c0)
        if lead:
            # the task's first pass over its rows comes from DRAM in short runs (a block's
            # rows, blocks scattered): fetch a few chunks ahead, V rows included (P.V reads
            # them from L2 then)
            _prefetch_chunk(c0 + PREFETCH_CHUNKS * 16, n, row, block_size, keys, values,
                            positions, dims)
        for i in range(m):
            p = c0 + i
            r = row[p]
            po = positions[r] * d
            k = kind[p]
            rk = r * k_count + kh
            kb = rk * nbytes if k == QUANT else (prow[p] * k_count + kh) * d
            # one call site: each inlined copy of _key_row costs numba compile time
            _key_row(tile, i * d, k, kb, rk * ck, keys, ktab, kd, ck, tail_k, sink_k, cos, sin,
                     po, rbuf, d, bits)
        for g in range(group):
            j = kh * group + g - h0
            qo = (b * h_count + kh * group + g) * d
            if m == 16:
                vstore(scores, j * n + c0, vmul(_dots16(q, qo, tile, d), sc))
            else:
                for i in range(m):
                    scores[j, c0 + i] = vsum(_dot(q, qo, tile, i * d, d)) * scale


@njit(inline="always", **_OPTS)
def _softmax(scores, hn, n, inv):
    """Each row j < hn of scores [:, :n] -> exp(s - max) in place, inv[j] its reciprocal sum."""
    body = n // 16 * 16
    for j in range(hn):
        mx = scores[j, 0]
        for p in range(1, n):
            mx = max(mx, scores[j, p])
        total = np.float32(0.0)
        mv = vsplat(mx)
        for p in range(0, body, 16):  # 16 exponentials per vector op (simd.vexp)
            e = vexp(vsub(vload(scores, j * n + p), mv))
            vstore(scores, j * n + p, e)
            total += vsum(e)
        for p in range(body, n):
            e = np.exp(scores[j, p] - mx)
            scores[j, p] = e
            total += e
        inv[j] = np.float32(1.0) / total


@njit(inline="always", **_OPTS)
def _aligned(n):
    """An empty float32 [n] starting on a 64-byte boundary: the tile's vectors then never
    straddle cache lines (split loads, and stores that cannot forward to the next loads)."""
    buf = np.empty(n + 16, np.float32)
    skip = (64 - buf.ctypes.data % 64) % 64 // 4
    return buf[skip:skip + n]


@njit(inline="always", **_OPTS)
def attention_task(q, keys, values, rows, pools, rope, dims, block_ids, lens, block_size, scale,
                   out, task, split, bits):
    """Task `task` of `num_tasks`: request task // split, its KV heads part task % split
    (arguments as `decode_attention_into` takes them)."""
    b_count, h_count, d = q.shape
    k_count = dims[0]
    group = h_count // k_count
    nb = block_ids.shape[0] // b_count
    b = task // split
    part = task % split
    kh0 = part * k_count // split
    kh1 = (part + 1) * k_count // split
    h0 = kh0 * group
    hn = (kh1 - kh0) * group
    n = lens[b]
    row = np.empty(n, np.int64)
    kind = np.empty(n, np.int8)
    prow = np.empty(n, np.int64)
    _rows(block_ids, b * nb, n, block_size, rows, dims[4], dims[5], row, kind, prow)
    scores = np.empty((hn, n), np.float32)
    tile = _aligned(16 * d + 1)  # + the spare element of `_key_row`
    rbuf = _aligned(2 * d)
    ktab = vload(keys[1], 0)
    vtab = vload(values[1], 0)
    for kh in range(kh0, kh1):
        _scores(q, b, kh, group, h0, n, row, kind, prow, keys, ktab, values, pools, rope,
                rows[0], dims, block_size, kh == kh0, scale, scores, tile, rbuf, bits)
    inv = np.empty(hn, np.float32)
    _softmax(scores, hn, n, inv)
    ob = (b * h_count + h0) * d
    for kh in range(kh0, kh1):
        g = 0
        while g < group:  # up to three query heads share each value vector (GQA)
            nh = min(3, group - g)
            j = kh * group + g - h0
            for i in range(0, d, 64):
                nv = min(4, (d - i) // 16)
                lead = kh == kh0 and g == 0 and i == 0
                _pv_lanes(scores, j, nh, n, kind, row, prow, kh, values, vtab, pools, dims, i,
                          nv, inv, out, ob + j * d, d, block_size, lead, bits)
            g += nh


@njit(parallel=True, **_OPTS)
def decode_attention_into(q, keys, values, rows, pools, rope, dims, block_ids, lens, block_size,
                          scale, out, bits):
    """q [B, H, D]; keys (k_codes, k_tab, k_zero, k_scale, k_out_idx, k_out_val), values
    likewise (v_zero, v_scale per row), rows (positions, open, tail_slot, sink_slot), pools
    (tail_k, tail_v, sink_k, sink_v), rope (cos, sin): KVQuantArrays' fields, all flat 1-D
    but `rows`; dims (K, D*bits/8, Ck, Cv, sink_rows, sink_tokens); k_tab, v_tab [16] the
    read datatypes repeated to 16 entries (simd.vload_lut); bits 2..4 -> out [B*H*D]."""
    tasks, split = num_tasks(q.shape[0], dims[0])
    for task in prange(tasks):
        attention_task(q, keys, values, rows, pools, rope, dims, block_ids, lens, block_size,
                       scale, out, task, split, bits)


def supported(q: torch.Tensor) -> bool:
    """Whether the kernel takes these queries (the cache: any `KVQuantArrays` of 2..4 bits)."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and q.shape[-1] % 16 == 0


def _table16(values: np.ndarray) -> np.ndarray:
    """A datatype's 2^bits read values repeated to the 16 lanes simd.vload_lut indexes."""
    return np.ascontiguousarray(np.tile(values.astype(np.float32), 16 // values.shape[0]))


def decode_attention_kvquant(q: torch.Tensor, arrays: KVQuantArrays, block_ids: torch.Tensor,
                             context_lens: torch.Tensor, block_size: int, scale: float
                             ) -> torch.Tensor:
    """q [B, H, D] fp32; arrays one layer of a KVQuant store (`kernel_arrays`); block_ids
    [B*nb] long (each request's table padded to nb blocks); context_lens [B] long, each >= 1
    -> [B, H, D] fp32 attention over positions < context_lens[b] of each table."""
    assert supported(q) and 2 <= arrays.bits <= 4, (q.dtype, q.shape, arrays.bits)
    assert q.shape[-1] < NO_OUTLIER, q.shape  # an outlier channel must not read as unused
    a = arrays
    for x in (a.k_codes, a.v_codes, a.k_zero, a.k_scale, a.v_zero, a.v_scale, a.k_out_idx,
              a.k_out_val, a.v_out_idx, a.v_out_val, a.tail_k, a.tail_v, a.sink_k, a.sink_v,
              a.cos, a.sin):
        assert x.flags.c_contiguous
    q = q.contiguous()
    out = torch.empty_like(q)
    flat = [x.reshape(-1) for x in (a.k_codes, a.k_zero, a.k_scale, a.k_out_idx, a.k_out_val,
                                    a.v_codes, a.v_zero, a.v_scale, a.v_out_idx, a.v_out_val,
                                    a.tail_k, a.tail_v, a.sink_k, a.sink_v, a.cos, a.sin)]
    keys = (flat[0], _table16(a.k_values), *flat[1:5])
    values = (flat[5], _table16(a.v_values), *flat[6:10])
    rows = (a.positions, a.open, a.tail_slot, a.sink_slot)
    _, k_count, nbytes = a.k_codes.shape
    dims = (k_count, nbytes, a.k_out_idx.shape[2], a.v_out_idx.shape[2], a.sink_rows,
            a.sink_tokens)
    decode_attention_into(q.numpy(), keys, values, rows, tuple(flat[10:14]), tuple(flat[14:]),
                          dims, block_ids.contiguous().numpy(), context_lens.contiguous().numpy(),
                          block_size, np.float32(scale), out.numpy().reshape(-1), a.bits)
    return out


def warmup(bits: int = 4) -> None:
    """Compile (or load from numba's cache) the kernel at engine start: one tiny cache with the
    argument types `KVQuantKV.kernel_arrays` gives (one specialization for every width)."""
    d, s, u8, f16 = 16, 16, np.uint8, np.uint16
    z = np.zeros
    arrays = KVQuantArrays(
        bits=bits, k_codes=z((s, 1, d * bits // 8), u8), v_codes=z((s, 1, d * bits // 8), u8),
        k_values=np.linspace(-1, 1, 1 << bits, dtype=np.float32),
        v_values=z(1 << bits, np.float32), k_zero=z((1, d), np.float32),
        k_scale=z((1, d), np.float32), v_zero=z((s, 1), f16), v_scale=z((s, 1), f16),
        k_out_idx=np.full((s, 1, 1), NO_OUTLIER, u8), k_out_val=z((s, 1, 1), f16),
        v_out_idx=np.full((s, 1, 1), NO_OUTLIER, u8), v_out_val=z((s, 1, 1), f16),
        positions=z(s, np.int64), open=z(1, np.bool_), tail_slot=np.full(1, -1, np.int64),
        tail_k=z((s, 1, d), f16), tail_v=z((s, 1, d), f16),
        sink_slot=np.full(1, -1, np.int64), sink_rows=1, sink_k=z((1, 1, d), f16),
        sink_v=z((1, 1, d), f16), sink_tokens=0, cos=np.ones((s, d), np.float32),
        sin=z((s, d), np.float32))
    decode_attention_kvquant(torch.zeros(1, 2, d), arrays, torch.zeros(1, dtype=torch.long),
                             torch.ones(1, dtype=torch.long), s, 1.0)
