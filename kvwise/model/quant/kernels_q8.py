"""Small-batch quantized matmuls on integer dot products: int4/int8 weights x int8 activations.

For T <= SMALL_BATCH_MAX tokens (decode) each activation row is first quantized to int8 codes per
32 inputs (`quantize_q8`: d = max|x| / 127, code = round(x / d), the Q8 scheme llama.cpp uses for
its CPU dot products), then every 32-weight sub-block is one integer dot product
(simd_int.dot_q4q8 / dot_q8q8) scaled by d and, per weight group, by the weight scale:

    y[t, n] = sum_g s[n, g] * sum_{j in g} d[t, j] * (q[n, j-block] . xq[t, j-block])
              (+ sum_g m[n, g] * sum_{k in g} x[t, k]   for int4's minimum, with exact float x)

Measured on 2 Zen 4 cores (VNNI) against the float kernels of kernels.py: see BENCHMARKS.md.
The activation rounding adds a relative error of ~2^-8 per element; `reference.int4_q8_linear` /
`int8_q8_linear` define the exact math (dequantized codes, fp32 matmul) and tests compare.

Invariants:
- A (token, row) output is computed by the same operations in the same order for any T and any
  thread count (tokens are an inner loop over a row's tasks), so decoding stays batch-invariant.
- Preconditions (checked by the layers / `check_*` in kernels.py): K % 32 == 0, gs % 32 == 0,
  K % gs == 0, C-contiguous arrays of the documented dtypes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kvwise.model.quant import runtime
from kvwise.model.quant.simd import load_f16
from kvwise.model.quant.simd_int import dot_q4q8, dot_q8q8, v8fma, v8splat, v8sum, v8zero

runtime.preload_tbb()

Q8_BLOCK = 32  # activation inputs per int8 scale
ROWS_PER_TASK = 16
_JIT = dict(parallel=True, fastmath=True, cache=True, nogil=True, error_model="numpy")


@njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def quantize_q8(x, group_size, xq, xd, xs):
    """x fp32 [T, K] -> xq int8 [T, K], xd fp32 [T, K/32] (scales), xs fp32 [T, K/gs] (exact sums
    of x per weight group; len 0 along axis 1 to skip)."""
    t_count, k = x.shape
    for t in range(t_count):
        for b in range(k // Q8_BLOCK):
            amax = np.float32(0.0)
            for i in range(b * Q8_BLOCK, (b + 1) * Q8_BLOCK):
                amax = max(amax, abs(x[t, i]))
            xd[t, b] = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            for i in range(b * Q8_BLOCK, (b + 1) * Q8_BLOCK):
                xq[t, i] = np.int8(np.rint(x[t, i] * inv))
        for g in range(xs.shape[1]):
            s = np.float32(0.0)
            for i in range(g * group_size, (g + 1) * group_size):
                s += x[t, i]
            xs[t, g] = s


@njit(**_JIT)
def int4_q8_matmul(xq, xd, xs, q, scale, minv, bias, out):
    """out [T, N] = dequant(xq, xd) @ (codes * s).T + xs @ minv.T (+ bias). Two rows per pass
    share the activation loads."""
    t_count, k = xq.shape
    n, num_groups = scale.shape
    gs = k // num_groups
    row_bytes = k // 2
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        end = min(n, (task + 1) * ROWS_PER_TASK)
        for t in range(t_count):
            o = task * ROWS_PER_TASK
            while o < end:
                o1 = o + 1 if o + 1 < end else o  # an odd last row is computed twice
                a0 = v8zero()
                a1 = v8zero()
                for g in range(num_groups):
                    t0 = v8zero()
                    t1 = v8zero()
                    for j in range(g * gs, (g + 1) * gs, Q8_BLOCK):
                        d = v8splat(xd[t, j // Q8_BLOCK])
                        t0 = v8fma(dot_q4q8(q, o * row_bytes + j // 2, xq, t * k + j), d, t0)
                        t1 = v8fma(dot_q4q8(q, o1 * row_bytes + j // 2, xq, t * k + j), d, t1)
                    a0 = v8fma(t0, v8splat(load_f16(scale, o * num_groups + g)), a0)
                    a1 = v8fma(t1, v8splat(load_f16(scale, o1 * num_groups + g)), a1)
                y0 = v8sum(a0)
                y1 = v8sum(a1)
                for g in range(num_groups):
                    y0 += load_f16(minv, o * num_groups + g) * xs[t, g]
                    y1 += load_f16(minv, o1 * num_groups + g) * xs[t, g]
                out[t, o] = y0 + bias[o] if has_bias else y0
                out[t, o1] = y1 + bias[o1] if has_bias else y1
                o += 2


@njit(**_JIT)
def int8_q8_matmul(xq, xd, q, scale, bias, out):
    """out [T, N] = dequant(xq, xd) @ (q * s).T (+ bias)."""
    t_count, k = xq.shape
    n, num_groups = scale.shape
    gs = k // num_groups
    has_bias = bias.shape[0] > 0
    num_tasks = (n + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(num_tasks):
        end = min(n, (task + 1) * ROWS_PER_TASK)
        for t in range(t_count):
            o = task * ROWS_PER_TASK
            while o < end:
                o1 = o + 1 if o + 1 < end else o
                a0 = v8zero()
                a1 = v8zero()
                for g in range(num_groups):
                    t0 = v8zero()
                    t1 = v8zero()
                    for j in range(g * gs, (g + 1) * gs, Q8_BLOCK):
                        d = v8splat(xd[t, j // Q8_BLOCK])
                        t0 = v8fma(dot_q8q8(q, o * k + j, xq, t * k + j), d, t0)
                        t1 = v8fma(dot_q8q8(q, o1 * k + j, xq, t * k + j), d, t1)
                    a0 = v8fma(t0, v8splat(load_f16(scale, o * num_groups + g)), a0)
                    a1 = v8fma(t1, v8splat(load_f16(scale, o1 * num_groups + g)), a1)
                y0 = v8sum(a0)
                y1 = v8sum(a1)
                out[t, o] = y0 + bias[o] if has_bias else y0
                out[t, o1] = y1 + bias[o1] if has_bias else y1
                o += 2
