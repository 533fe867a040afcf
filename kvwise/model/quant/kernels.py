"""Fused dequantize + matmul kernels for CPU (numba), and dequantize-into-scratch for prefill.

Weight formats (see kvwise.model.quant.int8 / int4 for the layers that own them):
- int8: `q` int8 [N, K], `scale` IEEE half stored as uint16 [N, K/gs] (gs = K: one scale per
  row); w[n, k] = q[n, k] * scale[n, k // gs].
- int4: `q` uint8 [N, K/2] holding K/32 sub-blocks of 16 bytes per row; byte j of sub-block b
  holds element 32b + j in its low nibble and 32b + 16 + j in its high nibble (the GGUF
  Q4_0/Q4_1 order). `scale`, `minv` IEEE half stored as uint16 [N, K/gs];
  w[n, k] = q * scale[n, k // gs] + minv[n, k // gs] with q in 0..15.

Kernels (all write `out` [T, N] fp32, x is fp32 [T, K]; `bias` is [N] or empty):
- `int8_matmul`, `int4_matmul`: T == 1 streams each weight row once and dots it straight from the
  packed codes (GEMV, memory-bound); T > 1 dequantizes a row into an L1 buffer once and reuses it
  for all T tokens (small-batch decode).
- `int4_matmul(..., a8=True)` (`--activation-quant int8`): each token's activations are first
  rounded to int8 per block of 32 (`quantize_activations`, the Q8 activations llama.cpp uses),
  and each pair of weight blocks is one integer dot product (64 u8 x s8 products; AVX-512 VNNI
  `vpdpbusd` where present) scaled once per block. Converting nibbles to floats made the fp32
  GEMV compute-bound at ~8 GB/s per core; the integer form reads the same bytes at ~15 GB/s per
  core (measured on the SmolLM2 decode shapes). The minimum terms keep the fp32 group sums.
- `int4_prepare` + `int4_rows`, `int8_rows`: the same kernels over a row range, for callers that
  split the rows themselves (the fused decode step's thread team).
- `int8_dequant`, `int4_dequant`: rows [row0, row0 + R) into fp32 `out` [R, K], for large T
  where the caller runs torch's fp32 matmul on the scratch (compute-bound, see int8.py).

int4 uses sum_k x_k (q s + m) = sum_g [ s_g * sum_{k in g} x_k q_k + m_g * sum_{k in g} x_k ]:
one FMA per weight plus one per group (measured 21 vs 18 G weights/s on 2 cores against
dequantizing each weight first); int8 likewise without the minimum. In both formats T == 1 and
T > 1 perform the same vector operations in the same order per (token, row) (16-lane
accumulators, a fixed pairwise lane sum; simd.py), so a token's output is bit-identical alone or
in a small batch: greedy decoding stays batch-invariant with quantized weights.

Invariants:
- Preconditions are checked by `check_*` before a kernel runs (the kernels do raw vector loads):
  K % 32 == 0, contiguous arrays of the documented dtypes and shapes, gs % 32 == 0, K % gs == 0.
- Accumulation is fp32 in a fixed order per (token, row): for T <= SMALL_BATCH_MAX results do not
  depend on T, on the thread count or on which rows share a task. Large T goes through sgemm
  (dispatch.py), whose summation order differs (as it does for fp32 DenseLinear).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kvwise.kernels.cpu import runtime
from kvwise.kernels.cpu.simd import (
    load_f16,
    vabsmax32,
    vadd,
    vdot_q4q8,
    vdot_q4q8_half,
    vfma,
    vload,
    vload_hi4,
    vload_i8,
    vload_lo4,
    vmul,
    vscale_pair,
    vsplat,
    vstore,
    vstore_rint_i8,
    vsum,
    vzero,
)

runtime.preload_tbb()

ROWS_PER_TASK = 16  # rows per prange iteration: enough work per task, fine enough to balance
# Full fastmath (exact flags made the int4 GEMV 1.7x slower). The entry points the fused decode
# step shares with the prange kernels (`int4_prepare`, `int4_rows`, `int8_rows`) are compiled as
# functions of their own rather than inlined into a caller with other flags.
_FAST = True
_JIT = dict(parallel=True, fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
_CALL = dict(fastmath=_FAST, cache=True, nogil=True, error_model="numpy")
_INLINE = dict(_CALL, inline="always")


# -- int8 ------------------------------------------------------------------------------------

@njit(**_INLINE)
def _int8_row_to_f32(q, scale, o, w):
    """Row o of the int8 weight -> fp32 w [K]."""
    k = w.shape[0]
    num_groups = scale.shape[1]
    gs = k // num_groups
    for g in range(num_groups):
        s = vsplat(load_f16(scale, o * num_groups + g))
        for i in range(g * gs, (g + 1) * gs, 16):
            vstore(w, i, vmul(vload_i8(q, o * k + i), s))


@njit(**_INLINE)
def _int8_gemv_rows(x, q, scale, bias, out, r0, r1):
    """T == 1, rows [r0, r1): sum_g s_g * sum_{k in g} x_k q_k, codes converted in registers."""
    k = x.shape[1]
    num_groups = scale.shape[1]
    gs = k // num_groups
    has_bias = bias.shape[0] > 0
    for o in range(r0, r1):
        a0 = vzero()
        for g in range(num_groups):
            t0 = vzero()
            t1 = vzero()
            for i in range(g * gs, (g + 1) * gs, 32):
                t0 = vfma(vload(x, i), vload_i8(q, o * k + i), t0)
                t1 = vfma(vload(x, i + 16), vload_i8(q, o * k + i + 16), t1)
            a0 = vfma(vadd(t0, t1), vsplat(load_f16(scale, o * num_groups + g)), a0)
        y = vsum(a0)
        out[0, o] = y + bias[o] if has_bias else y


@njit(**_INLINE)
def _int8_gemm_small_rows(x, q, scale, bias, out, codes, r0, r1):
    """1 < T <= SMALL_BATCH_MAX, rows [r0, r1): codes converted once per row into `codes` [K]
    fp32, same order per (token, row) as `_int8_gemv_rows`."""
    t_count, k = x.shape
    num_groups = scale.shape[1]
    gs = k // num_groups
    has_bias = bias.shape[0] > 0
    for o in range(r0, r1):
        for i in range(0, k, 16):
            vstore(codes, i, vload_i8(q, o * k + i))
        for t in range(t_count):
            xb = t * k
            a0 = vzero()
            for g in range(num_groups):
                t0 = vzero()
                t1 = vzero()
                for i in range(g * gs, (g + 1) * gs, 32):
                    t0 = vfma(vload(x, xb + i), vload(codes, i), t0)
                    t1 = vfma(vload(x, xb + i + 16), vload(codes, i + 16), t1)
                a0 = vfma(vadd(t0, t1), vsplat(load_f16(scale, o * num_groups + g)), a0)
            y = vsum(a0)
            out[t, o] = y + bias[o] if has_bias else y


@njit(**_CALL)
def int8_rows(x, q, scale, bias, out, codes, r0, r1):
    """Rows [r0, r1) of out = x @ W.T (+ bias), T <= SMALL_BATCH_MAX; `codes` fp32 [K]
    scratch (used when T > 1). Every row's value depends only on x and that row."""
    if x.shape[0] == 1:
        _int8_gemv_rows(x, q, scale, bias, out, r0, r1)
    else:
        _int8_gemm_small_rows(x, q, scale, bias, out, codes, r0, r1)


@njit(**_JIT)
def _int8_matmul(x, q, scale, bias, out):
    n = q.shape[0]
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        codes = np.empty(x.shape[1], np.float32)
        int8_rows(x, q, scale, bias, out, codes, task * ROWS_PER_TASK,
                  min(n, (task + 1) * ROWS_PER_TASK))


def int8_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                out: np.ndarray) -> None:
    """out [T, N] = x [T, K] @ dequant(q, scale).T (+ bias); T <= SMALL_BATCH_MAX."""
    _int8_matmul(x, q, scale, bias, out)


@njit(**_JIT)
def int8_dequant(q, scale, row0, out):
    rows = out.shape[0]
    num_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _int8_row_to_f32(q, scale, row0 + r, out[r])


# -- int4 ------------------------------------------------------------------------------------

@njit(**_INLINE)
def _group_sums(x, t, num_groups, out):
    """out[g] = sum of x[t] over input group g (fixed pairwise order)."""
    k = x.shape[1]
    gs = k // num_groups
    for g in range(num_groups):
        acc = vzero()
        for i in range(t * k + g * gs, t * k + (g + 1) * gs, 16):
            acc = vadd(acc, vload(x, i))
        out[g] = vsum(acc)


@njit(fastmath=False, cache=True, nogil=True, error_model="numpy")
def quantize_activations(x, t, xq, dxp):
    """Token t of x [T, K] -> int8 codes xq [K] and scale lanes dxp [ceil(K/64) * 16] (int8
    activations, `a8`): per block of 32 values, d = max|x| / 127, code = round-half-even(x *
    (127 / max|x|)) (0 for an all-zero block). Blocks are stored in the pairs `simd.vdot_q4q8`
    reads (pair order; a last odd block in element order) and dxp holds each pair's two d in
    that function's lane layout. Exact IEEE arithmetic (no fastmath): the reference
    (quant.reference.quantize_activations) computes the same codes and scales."""
    k = x.shape[1]
    nb = k // 32
    base = t * k
    for b in range(nb):
        amax = vabsmax32(x, base + b * 32)
        d = amax / np.float32(127.0)
        inv = vsplat(np.float32(127.0) / amax if amax > 0 else np.float32(0.0))
        pair = b // 2
        second = b % 2
        if b == nb - 1 and nb % 2 == 1:
            lo = b * 32
            hi = lo + 16
            for j in range(4):  # the missing second block's lanes: its dot products are 0
                dxp[pair * 16 + 4 + j] = 0.0
                dxp[pair * 16 + 12 + j] = 0.0
        else:
            lo = pair * 64 + second * 16
            hi = lo + 32
        vstore_rint_i8(xq, lo, vmul(vload(x, base + b * 32), inv))
        vstore_rint_i8(xq, hi, vmul(vload(x, base + b * 32 + 16), inv))
        for j in range(4):
            dxp[pair * 16 + second * 4 + j] = d
            dxp[pair * 16 + 8 + second * 4 + j] = d


def act_scratch(t: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(xq, dxp) buffers for `int4_prepare` with int8 activations: T tokens of K inputs."""
    return np.empty((t, k), np.int8), np.empty((t, (k // 32 + 1) // 2 * 16), np.float32)


@njit(**_CALL)
def int4_prepare(x, num_groups, xsum, xq, dxp, a8):
    """Per-input work of `int4_rows`: xsum [T, G] = the group sums of x [T, K] that the minimum
    terms need; with a8 also each token's int8 codes and scales (`quantize_activations`) into
    xq [T, >= K], dxp [T, >= ceil(K/64) * 16]."""
    for t in range(x.shape[0]):
        _group_sums(x, t, num_groups, xsum[t])
        if a8:
            quantize_activations(x, t, xq[t], dxp[t])


@njit(**_INLINE)
def _int4_a8_rows(x, q, scale, minv, bias, out, xsum, xq, dxp, r0, r1):
    """Rows [r0, r1), any T <= SMALL_BATCH_MAX, int8 activations: per pair of 32-blocks one
    integer dot product (simd.vdot_q4q8: AVX-512 VNNI where present) scaled by the weight and
    activation scales, plus the minimum terms on the exact fp32 group sums. Two rows per pass
    share each activation load; every (token, row) runs the same operations for any T."""
    t_count, k = x.shape
    num_groups = scale.shape[1]
    gs = k // num_groups
    row_bytes = k // 2
    nb = k // 32
    npairs = nb // 2
    has_bias = bias.shape[0] > 0
    per_group = gs // 32  # blocks per scale group
    o = r0
    while o < r1:
        o1 = o + 1 if o + 1 < r1 else o
        s_row0 = o * num_groups
        s_row1 = o1 * num_groups
        for t in range(t_count):
            xr = xq[t]
            dr = dxp[t]
            a0 = vzero()
            a1 = vzero()
            ga = 0  # group of the pair's first block, and that block's index in it
            within = 0
            for pi in range(npairs):
                dv = vload(dr, pi * 16)
                if within + 1 < per_group:
                    s0 = vmul(vsplat(load_f16(scale, s_row0 + ga)), dv)
                    s1 = vmul(vsplat(load_f16(scale, s_row1 + ga)), dv)
                else:
                    s0 = vmul(vscale_pair(scale, s_row0 + ga), dv)
                    s1 = vmul(vscale_pair(scale, s_row1 + ga), dv)
                a0 = vfma(vdot_q4q8(q, o * row_bytes + pi * 32, xr, pi * 64), s0, a0)
                a1 = vfma(vdot_q4q8(q, o1 * row_bytes + pi * 32, xr, pi * 64), s1, a1)
                within += 2
                while within >= per_group:
                    within -= per_group
                    ga += 1
            if nb % 2:
                b = nb - 1
                dv = vload(dr, npairs * 16)
                s0 = vmul(vsplat(load_f16(scale, s_row0 + ga)), dv)
                s1 = vmul(vsplat(load_f16(scale, s_row1 + ga)), dv)
                a0 = vfma(vdot_q4q8_half(q, o * row_bytes + b * 16, xr, b * 32), s0, a0)
                a1 = vfma(vdot_q4q8_half(q, o1 * row_bytes + b * 16, xr, b * 32), s1, a1)
            y0 = vsum(a0)
            y1 = vsum(a1)
            for g in range(num_groups):
                y0 += load_f16(minv, s_row0 + g) * xsum[t, g]
                y1 += load_f16(minv, s_row1 + g) * xsum[t, g]
            out[t, o] = y0 + bias[o] if has_bias else y0
            out[t, o1] = y1 + bias[o1] if has_bias else y1
        o += 2


@njit(**_INLINE)
def _int4_gemv_rows(x, q, scale, minv, bias, out, xsum, r0, r1):
    """T == 1, rows [r0, r1): codes converted in registers; two rows per pass share the x
    loads (an odd last row is computed twice, same value)."""
    k = x.shape[1]
    num_groups = scale.shape[1]
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    o = r0
    while o < r1:
        o1 = o + 1 if o + 1 < r1 else o
        a0 = vzero()
        a1 = vzero()
        for g in range(num_groups):
            t0 = vzero()
            t1 = vzero()
            for i in range(g * gs, (g + 1) * gs, 32):
                xl = vload(x, i)
                xh = vload(x, i + 16)
                q0 = o * row_bytes + i // 2
                q1 = o1 * row_bytes + i // 2
                t0 = vfma(xl, vload_lo4(q, q0), t0)
                t0 = vfma(xh, vload_hi4(q, q0), t0)
                t1 = vfma(xl, vload_lo4(q, q1), t1)
                t1 = vfma(xh, vload_hi4(q, q1), t1)
            a0 = vfma(t0, vsplat(load_f16(scale, o * num_groups + g)), a0)
            a1 = vfma(t1, vsplat(load_f16(scale, o1 * num_groups + g)), a1)
        y0 = vsum(a0)
        y1 = vsum(a1)
        for g in range(num_groups):
            y0 += load_f16(minv, o * num_groups + g) * xsum[0, g]
            y1 += load_f16(minv, o1 * num_groups + g) * xsum[0, g]
        out[0, o] = y0 + bias[o] if has_bias else y0
        out[0, o1] = y1 + bias[o1] if has_bias else y1
        o += 2


@njit(**_INLINE)
def _int4_gemm_small_rows(x, q, scale, minv, bias, out, xsum, codes, r0, r1):
    """1 < T <= SMALL_BATCH_MAX, rows [r0, r1): a row's codes are converted to fp32 once
    (`codes` [K], an L1 buffer) and reused for every token, with the same operation order per
    (token, row) as `_int4_gemv_rows`."""
    t_count, k = x.shape
    num_groups = scale.shape[1]
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    for o in range(r0, r1):
        for i in range(0, k, 32):
            vstore(codes, i, vload_lo4(q, o * row_bytes + i // 2))
            vstore(codes, i + 16, vload_hi4(q, o * row_bytes + i // 2))
        t = 0
        while t + 4 <= t_count:  # 4 tokens per pass share each code load
            xa, xb, xc, xd = t * k, (t + 1) * k, (t + 2) * k, (t + 3) * k
            aa = vzero()
            ab = vzero()
            ac = vzero()
            ad = vzero()
            for g in range(num_groups):
                ta = vzero()
                tb = vzero()
                tc = vzero()
                td = vzero()
                for i in range(g * gs, (g + 1) * gs, 32):
                    lo = vload(codes, i)
                    hi = vload(codes, i + 16)
                    ta = vfma(vload(x, xa + i + 16), hi, vfma(vload(x, xa + i), lo, ta))
                    tb = vfma(vload(x, xb + i + 16), hi, vfma(vload(x, xb + i), lo, tb))
                    tc = vfma(vload(x, xc + i + 16), hi, vfma(vload(x, xc + i), lo, tc))
                    td = vfma(vload(x, xd + i + 16), hi, vfma(vload(x, xd + i), lo, td))
                s = vsplat(load_f16(scale, o * num_groups + g))
                aa = vfma(ta, s, aa)
                ab = vfma(tb, s, ab)
                ac = vfma(tc, s, ac)
                ad = vfma(td, s, ad)
            ys = (vsum(aa), vsum(ab), vsum(ac), vsum(ad))
            for j in range(4):
                y = ys[j]
                for g in range(num_groups):
                    y += load_f16(minv, o * num_groups + g) * xsum[t + j, g]
                out[t + j, o] = y + bias[o] if has_bias else y
            t += 4
        while t < t_count:
            xo = t * k
            a0 = vzero()
            for g in range(num_groups):
                t0 = vzero()
                for i in range(g * gs, (g + 1) * gs, 32):
                    t0 = vfma(vload(x, xo + i), vload(codes, i), t0)
                    t0 = vfma(vload(x, xo + i + 16), vload(codes, i + 16), t0)
                a0 = vfma(t0, vsplat(load_f16(scale, o * num_groups + g)), a0)
            y = vsum(a0)
            for g in range(num_groups):
                y += load_f16(minv, o * num_groups + g) * xsum[t, g]
            out[t, o] = y + bias[o] if has_bias else y
            t += 1


@njit(**_CALL)
def int4_rows(x, q, scale, minv, bias, out, xsum, codes, xq, dxp, a8, r0, r1):
    """Rows [r0, r1) of out = x @ W.T (+ bias), T <= SMALL_BATCH_MAX; `xsum` (and with a8,
    int8 activations, `xq` and `dxp`) from `int4_prepare(x, ...)`, `codes` fp32 [K] scratch
    (used when T > 1). Every row's value depends only on x and that row."""
    if a8:
        _int4_a8_rows(x, q, scale, minv, bias, out, xsum, xq, dxp, r0, r1)
    elif x.shape[0] == 1:
        _int4_gemv_rows(x, q, scale, minv, bias, out, xsum, r0, r1)
    else:
        _int4_gemm_small_rows(x, q, scale, minv, bias, out, xsum, codes, r0, r1)


@njit(**_JIT)
def _int4_matmul(x, q, scale, minv, bias, out, xq, dxp, a8):
    n, num_groups = scale.shape
    xsum = np.empty((x.shape[0], num_groups), np.float32)
    int4_prepare(x, num_groups, xsum, xq, dxp, a8)
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        codes = np.empty(x.shape[1], np.float32)
        int4_rows(x, q, scale, minv, bias, out, xsum, codes, xq, dxp, a8, task * ROWS_PER_TASK,
                  min(n, (task + 1) * ROWS_PER_TASK))


def int4_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray, minv: np.ndarray,
                bias: np.ndarray, out: np.ndarray, a8: bool = False) -> None:
    """out [T, N] = x [T, K] @ dequant(q, scale, minv).T (+ bias); T <= SMALL_BATCH_MAX. a8:
    activations rounded to int8 per 32 values first (`quantize_activations`)."""
    xq, dxp = act_scratch(x.shape[0], x.shape[1]) if a8 else act_scratch(0, 0)
    _int4_matmul(x, q, scale, minv, bias, out, xq, dxp, a8)


@njit(**_INLINE)
def _int4_row_to_f32(q, scale, minv, o, w):
    """Row o of the int4 weight -> fp32 w [K] (q * s + m, one fused multiply-add)."""
    k = w.shape[0]
    num_groups = scale.shape[1]
    gs = k // num_groups
    row_bytes = k // 2
    for g in range(num_groups):
        s = vsplat(load_f16(scale, o * num_groups + g))
        m = vsplat(load_f16(minv, o * num_groups + g))
        for i in range(g * gs, (g + 1) * gs, 32):
            qo = o * row_bytes + i // 2
            vstore(w, i, vfma(vload_lo4(q, qo), s, m))
            vstore(w, i + 16, vfma(vload_hi4(q, qo), s, m))


@njit(**_JIT)
def int4_dequant(q, scale, minv, row0, out):
    rows = out.shape[0]
    num_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _int4_row_to_f32(q, scale, minv, row0 + r, out[r])


# -- preconditions ---------------------------------------------------------------------------

def _check_common(x: np.ndarray, n: int, bias: np.ndarray, out: np.ndarray) -> None:
    assert x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous, (x.dtype, x.shape)
    assert x.shape[1] % 32 == 0, f"K={x.shape[1]} must be a multiple of 32"
    assert bias.dtype == np.float32 and bias.shape in ((0,), (n,)), bias.shape
    assert out.dtype == np.float32 and out.shape == (x.shape[0], n) and out.flags.c_contiguous


def _check_groups(k: int, scale: np.ndarray, n: int) -> None:
    assert scale.dtype == np.uint16 and scale.ndim == 2 and scale.shape[0] == n, scale.shape
    assert scale.flags.c_contiguous
    gs = k // scale.shape[1]
    assert gs * scale.shape[1] == k and gs % 32 == 0, f"group size {gs} for K={k}"


def check_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray,
               out: np.ndarray) -> None:
    n = q.shape[0]
    _check_common(x, n, bias, out)
    assert q.dtype == np.int8 and q.shape == (n, x.shape[1]) and q.flags.c_contiguous, q.shape
    _check_groups(x.shape[1], scale, n)


def check_int4(x: np.ndarray, q: np.ndarray, scale: np.ndarray, minv: np.ndarray,
               bias: np.ndarray, out: np.ndarray) -> None:
    n, k = q.shape[0], x.shape[1]
    _check_common(x, n, bias, out)
    assert q.dtype == np.uint8 and q.shape == (n, k // 2) and q.flags.c_contiguous, q.shape
    _check_groups(k, scale, n)
    assert minv.dtype == np.uint16 and minv.shape == scale.shape and minv.flags.c_contiguous


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel for the dtypes the layers use, so the
    JIT cost lands at engine start and not in the first timed step."""
    k, n = 64, 4
    rng = np.random.default_rng(0)
    q8 = rng.integers(-127, 128, (n, k), dtype=np.int8)
    q4 = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    bias = np.ones(n, np.float32)
    s16 = np.ones((n, k // 32), np.float16).view(np.uint16)
    empty = np.empty(0, np.float32)
    for t in (1, 2):
        x = np.ones((t, k), np.float32)
        out = np.empty((t, n), np.float32)
        for b in (empty, bias):
            int8_matmul(x, q8, s16, b, out)
            int4_matmul(x, q4, s16, s16, b, out)
            int4_matmul(x, q4, s16, s16, b, out, a8=True)
    buf = np.empty((n, k), np.float32)
    int8_dequant(q8, s16, 0, buf)
    int4_dequant(q4, s16, s16, 0, buf)
