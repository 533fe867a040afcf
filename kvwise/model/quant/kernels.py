"""Fused dequantize + matmul kernels for CPU (numba), and dequantize-into-scratch for prefill.

Weight formats (see kvwise.model.quant.int8 / int4 for the layers that own them):
- int8: `q` int8 [N, K], `scale` fp32 [N]; w[n, k] = q[n, k] * scale[n].
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

Both paths dequantize w = q * s (+ m) with the same vector ops and accumulate x * w in the same
order (two 16-lane accumulators over alternate halves of each 32-wide step, then a fixed pairwise
lane sum; simd.py), so a token's output is bit-identical whether it runs alone (T == 1) or in a
small batch: greedy decoding stays batch-invariant with quantized weights.

Invariants:
- Preconditions are checked by `check_*` before a kernel runs (the kernels do raw vector loads):
  K % 32 == 0, contiguous arrays of the documented dtypes and shapes, gs % 32 == 0, K % gs == 0.
- Accumulation is fp32 in a fixed order per (token, row): for T <= SMALL_BATCH_MAX results do not
  depend on T, on the thread count or on which rows share a task. Large T goes through sgemm
  (dispatch.py), whose summation order differs (as it does for fp32 DenseLinear).
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np


def _preload_tbb() -> None:
    """Make numba's TBB threading layer loadable from a pip-installed `tbb` wheel.

    The wheel puts libtbb.so.12 in <prefix>/lib, which is not on the loader path; numba's
    tbbpool extension then fails to load and numba falls back to OpenMP, whose spin-waiting
    workers fight torch's own OpenMP workers on a 2-core machine (measured: a 2 us kernel launch
    became 50-8000 us next to torch ops). TBB workers back off instead. Loading the library once
    by absolute path with RTLD_GLOBAL satisfies tbbpool's dependency by soname.
    """
    for prefix in (sys.prefix, sys.base_prefix):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.isfile(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return


_preload_tbb()

import numba  # noqa: E402  (after the TBB preload)
from numba import njit, prange  # noqa: E402

from kvwise.model.quant.simd import (  # noqa: E402
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

ROWS_PER_TASK = 16  # rows per prange iteration: enough work per task, fine enough to balance
_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True)


# -- int8 ------------------------------------------------------------------------------------

@njit(**_JIT)
def int8_matmul(x, q, scale, bias, out):
    t_count, k = x.shape
    n = q.shape[0]
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if t_count == 1:
        for task in prange(num_tasks):
            for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
                s = vsplat(scale[o])
                a0 = vzero()
                a1 = vzero()
                base = o * k
                for i in range(0, k, 32):
                    a0 = vfma(vload(x, i), vmul(vload_i8(q, base + i), s), a0)
                    a1 = vfma(vload(x, i + 16), vmul(vload_i8(q, base + i + 16), s), a1)
                y = vsum(vadd(a0, a1))
                out[0, o] = y + bias[o] if has_bias else y
        return
    for task in prange(num_tasks):
        w = np.empty(k, np.float32)
        for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            s = vsplat(scale[o])
            base = o * k
            for i in range(0, k, 16):
                vstore(w, i, vmul(vload_i8(q, base + i), s))
            for t in range(t_count):
                a0 = vzero()
                a1 = vzero()
                xb = t * k
                for i in range(0, k, 32):
                    a0 = vfma(vload(x, xb + i), vload(w, i), a0)
                    a1 = vfma(vload(x, xb + i + 16), vload(w, i + 16), a1)
                y = vsum(vadd(a0, a1))
                out[t, o] = y + bias[o] if has_bias else y


@njit(**_JIT)
def int8_dequant(q, scale, row0, out):
    rows, k = out.shape
    num_tasks = (rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            s = vsplat(scale[row0 + r])
            base = (row0 + r) * k
            for i in range(0, k, 16):
                vstore(out, r * k + i, vmul(vload_i8(q, base + i), s))


# -- int4 ------------------------------------------------------------------------------------

@njit(**_JIT)
def _int4_gemv(x, q, scale, minv, bias, out):
    k = x.shape[1]
    n, num_groups = scale.shape
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        o = task * ROWS_PER_TASK
        end = min(n, o + ROWS_PER_TASK)
        while o < end:
            # two rows at a time share the x loads; an odd last row is computed twice (same value)
            o1 = o + 1 if o + 1 < end else o
            a0 = vzero()
            a1 = vzero()
            b0 = vzero()
            b1 = vzero()
            for g in range(num_groups):
                s0 = vsplat(load_f16(scale, o * num_groups + g))
                m0 = vsplat(load_f16(minv, o * num_groups + g))
                s1 = vsplat(load_f16(scale, o1 * num_groups + g))
                m1 = vsplat(load_f16(minv, o1 * num_groups + g))
                for i in range(g * gs, (g + 1) * gs, 32):
                    xl = vload(x, i)
                    xh = vload(x, i + 16)
                    q0 = o * row_bytes + i // 2
                    q1 = o1 * row_bytes + i // 2
                    a0 = vfma(xl, vfma(vload_lo4(q, q0), s0, m0), a0)
                    a1 = vfma(xh, vfma(vload_hi4(q, q0), s0, m0), a1)
                    b0 = vfma(xl, vfma(vload_lo4(q, q1), s1, m1), b0)
                    b1 = vfma(xh, vfma(vload_hi4(q, q1), s1, m1), b1)
            y0 = vsum(vadd(a0, a1))
            y1 = vsum(vadd(b0, b1))
            out[0, o] = y0 + bias[o] if has_bias else y0
            out[0, o1] = y1 + bias[o1] if has_bias else y1
            o += 2


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _int4_row_to_f32(q, scale, minv, o, w):
    """Row o of the int4 weight -> fp32 w [K]."""
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
def _int4_gemm_small(x, q, scale, minv, bias, out):
    t_count, k = x.shape
    n = q.shape[0]
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        w = np.empty(k, np.float32)
        for o in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            _int4_row_to_f32(q, scale, minv, o, w)
            for t in range(t_count):
                a0 = vzero()
                a1 = vzero()
                xb = t * k
                for i in range(0, k, 32):
                    a0 = vfma(vload(x, xb + i), vload(w, i), a0)
                    a1 = vfma(vload(x, xb + i + 16), vload(w, i + 16), a1)
                y = vsum(vadd(a0, a1))
                out[t, o] = y + bias[o] if has_bias else y


@njit(fastmath=True, cache=True, nogil=True)
def int4_matmul(x, q, scale, minv, bias, out):
    if x.shape[0] == 1:
        _int4_gemv(x, q, scale, minv, bias, out)
    else:
        _int4_gemm_small(x, q, scale, minv, bias, out)


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


def check_int8(x: np.ndarray, q: np.ndarray, scale: np.ndarray, bias: np.ndarray,
               out: np.ndarray) -> None:
    n = q.shape[0]
    _check_common(x, n, bias, out)
    assert q.dtype == np.int8 and q.shape == (n, x.shape[1]) and q.flags.c_contiguous, q.shape
    assert scale.dtype == np.float32 and scale.shape == (n,), scale.shape


def check_int4(x: np.ndarray, q: np.ndarray, scale: np.ndarray, minv: np.ndarray,
               bias: np.ndarray, out: np.ndarray) -> None:
    n, k = q.shape[0], x.shape[1]
    _check_common(x, n, bias, out)
    assert q.dtype == np.uint8 and q.shape == (n, k // 2) and q.flags.c_contiguous, q.shape
    assert scale.dtype == np.uint16 and scale.ndim == 2 and scale.shape[0] == n, scale.shape
    assert minv.dtype == np.uint16 and minv.shape == scale.shape, minv.shape
    assert scale.flags.c_contiguous and minv.flags.c_contiguous
    gs = k // scale.shape[1]
    assert gs * scale.shape[1] == k and gs % 32 == 0, f"group size {gs} for K={k}"


def set_num_threads(n: int) -> None:
    """Threads for the calling thread's kernel launches (numba keeps this per calling thread)."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def threading_layer() -> str:
    return numba.threading_layer()


def warmup() -> None:
    """Compile (or load from numba's cache) every kernel for the dtypes the layers use, so the
    JIT cost lands at engine start and not in the first timed step."""
    k, n = 64, 4
    rng = np.random.default_rng(0)
    q8 = rng.integers(-127, 128, (n, k), dtype=np.int8)
    q4 = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    s = np.ones(n, np.float32)
    s16 = np.ones((n, k // 32), np.float16).view(np.uint16)
    empty = np.empty(0, np.float32)
    for t in (1, 2):
        x = np.ones((t, k), np.float32)
        out = np.empty((t, n), np.float32)
        int8_matmul(x, q8, s, empty, out)
        int8_matmul(x, q8, s, s, out)
        int4_matmul(x, q4, s16, s16, empty, out)
        int4_matmul(x, q4, s16, s16, s, out)
    buf = np.empty((n, k), np.float32)
    int8_dequant(q8, s, 0, buf)
    int4_dequant(q4, s16, s16, 0, buf)
