"""Writing a step's K/V rows into a CPU cache: dense copies and int8 per-(token, KV head) codes.

The int8 scheme (the per-token-head one vLLM and LMDeploy ship): for each token t and KV head h,
scale = fp16(max_i |x[t, h, i]| / 127) and code_i = clamp(rint(x_i / scale), -127, 127), so
x_i ~ code_i * scale. `quantize_int8_reference` is the PyTorch form; `quantize_rows` the numba
one the fused decode step calls. Both divide with IEEE division and round the scale with
round-to-nearest-even, so their codes and scales are bit-identical (a test checks it): a token's
stored KV does not depend on which path wrote it.

Invariants:
- The kernels here run with exact float semantics (no fastmath): no reciprocal or contraction
  may change a code.
- A (token, head) whose values are all zero (or whose scale underflows to 0 in fp16) stores
  scale 0 and codes 0; it dequantizes to exactly 0.
- `store_rows` chooses the write by the destination array's dtype at compile time: fp32 or
  fp16-as-uint16 rows are rounded copies (`simd.store_kv`), int8 rows are quantized.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit, types
from numba.extending import overload

from kvwise.kernels.cpu.simd import load_f16, store_kv

INT8_MAX = 127


def quantize_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K, D] float -> codes [T, K, D] int8, scale [T, K] float16 (see module docstring)."""
    x = x.float()
    amax = x.abs().amax(dim=-1)  # [T, K]
    # tensor / tensor: an IEEE division (torch turns a division by a Python scalar into a
    # multiplication by its reciprocal, which can round differently from the kernel)
    scale = torch.div(amax, torch.full_like(amax, float(INT8_MAX))).half()  # [T, K]
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(x / safe[..., None]).clamp_(-INT8_MAX, INT8_MAX)  # [T, K, D]
    codes = torch.where((s > 0)[..., None], codes, torch.zeros_like(codes))
    return codes.to(torch.int8), scale


def dequantize_int8_reference(codes: torch.Tensor, scale: torch.Tensor,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., D] int8, scale [...] float16 -> values [..., D] in `dtype`."""
    return (codes.float() * scale.float()[..., None]).to(dtype)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_rows(src, rows, codes, scales):
    """src [T, K, D] float32 -> codes[rows[t]] [K, D] int8 and scales[rows[t]] [K] (fp16 as
    uint16) for every t. codes [R, K, D] and scales [R, K] are C-contiguous."""
    t_count, k_count, d = src.shape
    for t in range(t_count):
        r = rows[t]
        for h in range(k_count):
            amax = np.float32(0.0)
            for i in range(d):
                a = abs(src[t, h, i])
                if a > amax:
                    amax = a
            so = r * k_count + h
            store_kv(scales, so, amax / np.float32(INT8_MAX))
            s = load_f16(scales, so)
            for i in range(d):
                c = np.float32(0.0)
                if s > np.float32(0.0):
                    c = np.rint(src[t, h, i] / s)
                    c = min(max(c, np.float32(-INT8_MAX)), np.float32(INT8_MAX))
                codes[r, h, i] = np.int8(c)


def store_rows(src_k, src_v, rows, k_dst, v_dst, ks_dst, vs_dst):  # pragma: no cover
    """src_k, src_v [T, K, D] float32 -> rows[t] of the caches k_dst, v_dst [R, K, D] (and of
    their scales ks_dst, vs_dst [R, K] for int8 caches; ignored for dense ones). Callable from
    numba code only (the implementation is chosen by the caches' dtype)."""
    raise NotImplementedError("store_rows is compiled by numba; call it from an njit function")


@njit(cache=True, nogil=True, error_model="numpy")
def _copy_rows(src, rows, dst):
    t_count, k_count, d = src.shape
    for t in range(t_count):
        base = rows[t] * k_count * d
        for h in range(k_count):
            for i in range(d):
                store_kv(dst, base + h * d + i, src[t, h, i])


@overload(store_rows, jit_options={"cache": True, "nogil": True})
def _store_rows(src_k, src_v, rows, k_dst, v_dst, ks_dst, vs_dst):
    if isinstance(k_dst, types.Array) and k_dst.dtype == types.int8:
        def quantized(src_k, src_v, rows, k_dst, v_dst, ks_dst, vs_dst):
            quantize_rows(src_k, rows, k_dst, ks_dst)
            quantize_rows(src_v, rows, v_dst, vs_dst)
        return quantized

    def dense(src_k, src_v, rows, k_dst, v_dst, ks_dst, vs_dst):
        _copy_rows(src_k, rows, k_dst)
        _copy_rows(src_v, rows, v_dst)
    return dense
