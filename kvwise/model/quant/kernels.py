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

from kvwise.model.quant import runtime
from kvwise.model.quant.simd import (
    load_f16,
    vadd,
    vfma,
    vload,
    vload_hi4,
    vload_i8,
    vload_lo4,
    vmul,
    vsplat,
    vstore,
    vsum,
    vzero,
)

runtime.preload_tbb()

ROWS_PER_TASK = 16  # rows per prange iteration: enough work per task, fine enough to balance
_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")


# -- int8 ------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True, nogil=True, error_model="numpy", inline="always")
def _int8_row_to_f32(q, scale, o, w):
    """Row o of the int8 weight -> fp32 w [K]."""
    k = w.shape[0]
    num_groups = scale.shape[1]
    gs = k // num_groups
    for g in range(num_groups):
        s = vsplat(load_f16(scale, o * num_groups + g))
        for i in range(g * gs, (g + 1) * gs, 16):
            vstore(w, i, vmul(vload_i8(q, o * k + i), s))


@njit(**_JIT)
def _int8_gemv(x, q, scale, bias, out):
    """T == 1: sum_g s_g * sum_{k in g} x_k q_k, codes converted in registers."""
    k = x.shape[1]
    n, num_groups = scale.shape
    gs = k // num_groups
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
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


@njit(**_JIT)
def _int8_gemm_small(x, q, scale, bias, out):
    """1 < T <= SMALL_BATCH_MAX: codes converted once per row, same order as `_int8_gemv`."""
    t_count, k = x.shape
    n, num_groups = scale.shape
    gs = k // num_groups
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        codes = np.empty(k, np.float32)
        for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
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


def int8_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray,
                out: np.ndarray) -> None:
    """out [T, N] = x [T, K] @ dequant(q, scale).T (+ bias); T <= SMALL_BATCH_MAX."""
    if x.shape[0] == 1:
        _int8_gemv(x, q, scale, bias, out)
    else:
        _int8_gemm_small(x, q, scale, bias, out)


@njit(**_JIT)
def int8_dequant(q, scale, row0, out):
    rows = out.shape[0]
    num_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            _int8_row_to_f32(q, scale, row0 + r, out[r])


# -- int4 ------------------------------------------------------------------------------------

@njit(fastmath=True, cache=True, nogil=True, error_model="numpy", inline="always")
def _group_sums(x, t, num_groups, out):
    """out[g] = sum of x[t] over input group g (fixed pairwise order)."""
    k = x.shape[1]
    gs = k // num_groups
    for g in range(num_groups):
        acc = vzero()
        for i in range(t * k + g * gs, t * k + (g + 1) * gs, 16):
            acc = vadd(acc, vload(x, i))
        out[g] = vsum(acc)


@njit(**_JIT)
def _int4_gemv(x, q, scale, minv, bias, out):
    """T == 1: codes converted in registers; two rows per pass share the x loads."""
    k = x.shape[1]
    n, num_groups = scale.shape
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    xsum = np.empty(num_groups, np.float32)
    _group_sums(x, 0, num_groups, xsum)
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        o = task * ROWS_PER_TASK
        end = min(n, o + ROWS_PER_TASK)
        while o < end:
            # an odd last row is computed twice (same value)
            o1 = o + 1 if o + 1 < end else o
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
                y0 += load_f16(minv, o * num_groups + g) * xsum[g]
                y1 += load_f16(minv, o1 * num_groups + g) * xsum[g]
            out[0, o] = y0 + bias[o] if has_bias else y0
            out[0, o1] = y1 + bias[o1] if has_bias else y1
            o += 2


@njit(**_JIT)
def _int4_gemm_small(x, q, scale, minv, bias, out):
    """1 < T <= SMALL_BATCH_MAX: a row's codes are converted to fp32 once (L1 buffer) and reused
    for every token, with the same operation order per (token, row) as `_int4_gemv`."""
    t_count, k = x.shape
    n, num_groups = scale.shape
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    xsum = np.empty((t_count, num_groups), np.float32)
    for t in range(t_count):
        _group_sums(x, t, num_groups, xsum[t])
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        codes = np.empty(k, np.float32)
        for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
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


def int4_matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray, minv: np.ndarray,
                bias: np.ndarray, out: np.ndarray) -> None:
    """out [T, N] = x [T, K] @ dequant(q, scale, minv).T (+ bias); T <= SMALL_BATCH_MAX."""
    if x.shape[0] == 1:
        _int4_gemv(x, q, scale, minv, bias, out)
    else:
        _int4_gemm_small(x, q, scale, minv, bias, out)


@njit(fastmath=True, cache=True, nogil=True, error_model="numpy", inline="always")
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
    buf = np.empty((n, k), np.float32)
    int8_dequant(q8, s16, 0, buf)
    int4_dequant(q4, s16, s16, 0, buf)
