"""Row-invariant fp32 matmul for CPU: out [T, N] = x [T, K] @ w [K, N] (+ bias), each output a
fixed chain of FMAs over k, whatever T is.

Why: BLAS sgemm picks its kernel and its K blocking from the call's shape, so a token's row of
`x @ w` differs in the last bits between a 1-row, a 16-row and a 600-row call (measured with
torch 2.13's CPU sgemm on SmolLM2's shapes: rows differ for M < 16 and for several larger M).
A prompt computed whole, in chunks or after a prefix-cache hit then gets different logits, and
a seeded sampled request different tokens. `--batch-invariant` routes fp32 projections here.

How: the natural layout of `DenseLinear.weight_t` ([K, N], N contiguous) is an outer-product
kernel: for each k, one 16-lane load of w[k, n:n+16] and a broadcast of x[t, k] per token, into
4 tokens x 4 vectors = 16 accumulators. Every output element is acc = fma(x[t, k], w[k, n], acc)
for k = 0..K-1 in order, then + bias; token grouping, column blocking and threads only choose
which elements run together, never the order within one.

Invariants:
- x, w, out C-contiguous float32; bias [N] or empty; checked by `check`.
- out[t, n] depends only on x[t], w[:, n] and bias[n]: bit-identical for any T, any row position
  and any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kvwise.kernels.cpu import runtime
from kvwise.kernels.cpu.simd import vadd, vfma, vload, vsplat, vstore, vzero

runtime.preload_tbb()

_FM = set(runtime.EXACT_FASTMATH)  # scalar tail math must not be contracted or reassociated
COLS = 64  # output columns per task (4 vectors)
ROWS = 4  # tokens sharing each weight load


@njit(fastmath=_FM, cache=True, nogil=True, error_model="numpy", inline="always")
def _block4(x, w, bias, out, t0, n0, has_bias):
    """Tokens t0..t0+3, columns n0..n0+63."""
    k_count = x.shape[1]
    n = w.shape[1]
    xa, xb, xc, xd = t0 * k_count, (t0 + 1) * k_count, (t0 + 2) * k_count, (t0 + 3) * k_count
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    b0 = vzero()
    b1 = vzero()
    b2 = vzero()
    b3 = vzero()
    c0 = vzero()
    c1 = vzero()
    c2 = vzero()
    c3 = vzero()
    d0 = vzero()
    d1 = vzero()
    d2 = vzero()
    d3 = vzero()
    xf = x.reshape(-1)
    for k in range(k_count):
        wo = k * n + n0
        w0 = vload(w, wo)
        w1 = vload(w, wo + 16)
        w2 = vload(w, wo + 32)
        w3 = vload(w, wo + 48)
        s = vsplat(xf[xa + k])
        a0 = vfma(s, w0, a0)
        a1 = vfma(s, w1, a1)
        a2 = vfma(s, w2, a2)
        a3 = vfma(s, w3, a3)
        s = vsplat(xf[xb + k])
        b0 = vfma(s, w0, b0)
        b1 = vfma(s, w1, b1)
        b2 = vfma(s, w2, b2)
        b3 = vfma(s, w3, b3)
        s = vsplat(xf[xc + k])
        c0 = vfma(s, w0, c0)
        c1 = vfma(s, w1, c1)
        c2 = vfma(s, w2, c2)
        c3 = vfma(s, w3, c3)
        s = vsplat(xf[xd + k])
        d0 = vfma(s, w0, d0)
        d1 = vfma(s, w1, d1)
        d2 = vfma(s, w2, d2)
        d3 = vfma(s, w3, d3)
    _store4(out, bias, t0 * n + n0, a0, a1, a2, a3, n0, has_bias)
    _store4(out, bias, (t0 + 1) * n + n0, b0, b1, b2, b3, n0, has_bias)
    _store4(out, bias, (t0 + 2) * n + n0, c0, c1, c2, c3, n0, has_bias)
    _store4(out, bias, (t0 + 3) * n + n0, d0, d1, d2, d3, n0, has_bias)


@njit(fastmath=_FM, cache=True, nogil=True, error_model="numpy", inline="always")
def _store4(out, bias, o, v0, v1, v2, v3, n0, has_bias):
    if has_bias:
        v0 = vadd(v0, vload(bias, n0))
        v1 = vadd(v1, vload(bias, n0 + 16))
        v2 = vadd(v2, vload(bias, n0 + 32))
        v3 = vadd(v3, vload(bias, n0 + 48))
    vstore(out, o, v0)
    vstore(out, o + 16, v1)
    vstore(out, o + 32, v2)
    vstore(out, o + 48, v3)


@njit(fastmath=_FM, cache=True, nogil=True, error_model="numpy", inline="always")
def _block1(x, w, bias, out, t, n0, has_bias):
    """Token t, columns n0..n0+63 (the tokens past the last multiple of 4)."""
    k_count = x.shape[1]
    n = w.shape[1]
    xf = x.reshape(-1)
    a0 = vzero()
    a1 = vzero()
    a2 = vzero()
    a3 = vzero()
    for k in range(k_count):
        wo = k * n + n0
        s = vsplat(xf[t * k_count + k])
        a0 = vfma(s, vload(w, wo), a0)
        a1 = vfma(s, vload(w, wo + 16), a1)
        a2 = vfma(s, vload(w, wo + 32), a2)
        a3 = vfma(s, vload(w, wo + 48), a3)
    _store4(out, bias, t * n + n0, a0, a1, a2, a3, n0, has_bias)


@njit(fastmath=_FM, cache=True, nogil=True, error_model="numpy", inline="always")
def _one_vec(x, w, bias, out, t, n0, has_bias):
    """Token t, columns n0..n0+15: the same FMA chain per element as `_block4`."""
    k_count = x.shape[1]
    n = w.shape[1]
    xf = x.reshape(-1)
    acc = vzero()
    for k in range(k_count):
        acc = vfma(vsplat(xf[t * k_count + k]), vload(w, k * n + n0), acc)
    if has_bias:
        acc = vadd(acc, vload(bias, n0))
    vstore(out, t * n + n0, acc)


@njit(fastmath=_FM, cache=True, nogil=True, error_model="numpy", inline="always")
def _scalar_col(x, w, bias, out, t, col, has_bias):
    """One element of the columns past the last multiple of 16: mul then add in k order (which
    columns take this path depends on N alone, so a column's arithmetic never changes)."""
    k_count = x.shape[1]
    acc = np.float32(0.0)
    for k in range(k_count):
        acc = acc + x[t, k] * w[k, col]
    if has_bias:
        acc = acc + bias[col]
    out[t, col] = acc


@njit(parallel=True, fastmath=_FM, cache=True, nogil=True, error_model="numpy")
def _matmul(x, w, bias, out):
    t_count = x.shape[0]
    n = w.shape[1]
    has_bias = bias.shape[0] > 0
    n64 = n // COLS * COLS
    n16 = n // 16 * 16
    tasks = n64 // COLS + (1 if n16 > n64 else 0) + (1 if n > n16 else 0)
    for task in prange(tasks):
        if task < n64 // COLS:
            n0 = task * COLS
            t = 0
            while t + ROWS <= t_count:
                _block4(x, w, bias, out, t, n0, has_bias)
                t += ROWS
            while t < t_count:
                _block1(x, w, bias, out, t, n0, has_bias)
                t += 1
        elif n16 > n64 and task == n64 // COLS:
            for t in range(t_count):
                for n0 in range(n64, n16, 16):
                    _one_vec(x, w, bias, out, t, n0, has_bias)
        else:
            for t in range(t_count):
                for col in range(n16, n):
                    _scalar_col(x, w, bias, out, t, col, has_bias)


def check(x: np.ndarray, w: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    for name, a in (("x", x), ("w", w), ("bias", bias), ("out", out)):
        if a.dtype != np.float32 or not a.flags.c_contiguous:
            raise ValueError(f"dense_rows: {name} must be C-contiguous float32")
    t, k = x.shape
    if w.shape[0] != k or out.shape != (t, w.shape[1]):
        raise ValueError(f"dense_rows: shapes x {x.shape}, w {w.shape}, out {out.shape}")
    if bias.shape[0] not in (0, w.shape[1]):
        raise ValueError(f"dense_rows: bias {bias.shape} for N={w.shape[1]}")


def matmul(x: np.ndarray, w: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """out [T, N] = x [T, K] @ w [K, N] (+ bias [N] unless empty); row-invariant."""
    check(x, w, bias, out)
    if x.shape[0]:
        _matmul(x, w, bias, out)
