"""Small fused CPU ops of the decoder (numba), against the per-step overhead of batch-1 decode.

At batch 1 a decoder layer's elementwise work is microseconds of arithmetic behind tens of
microseconds of dispatch: `F.rms_norm` on CPU runs ~10 aten ops (~30 us per call in a decode
step, 61 calls per token on SmolLM2). One kernel call costs ~2 us.

Reference: `F.rms_norm(x, (E,), w, eps)`; tests compare the two.

Invariants:
- Rows are independent and computed in a fixed order: results do not depend on T.
- Only fp32 contiguous CPU tensors take the kernels (`supported`); callers fall back otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from kvwise.model.quant import runtime
from kvwise.model.quant.simd import vfma, vload, vmul, vsplat, vstore, vsum, vzero

runtime.preload_tbb()
_PARALLEL_MIN_ROWS = 64  # below this, one thread: the launch costs more than the work


@njit(fastmath=True, cache=True, nogil=True, inline="always")
def _rms_row(x, w, eps, out, r):
    # explicit 16-lane vectors (fixed summation order): the same bits whichever kernel inlines it
    e = x.shape[1]
    body = e // 16 * 16
    acc = vzero()
    for i in range(0, body, 16):
        v = vload(x, r * e + i)
        acc = vfma(v, v, acc)
    total = vsum(acc)
    for i in range(body, e):
        total += x[r, i] * x[r, i]
    inv = np.float32(1.0) / np.sqrt(total / np.float32(e) + eps)
    s = vsplat(inv)
    for i in range(0, body, 16):
        vstore(out, r * e + i, vmul(vmul(vload(x, r * e + i), s), vload(w, i)))
    for i in range(body, e):
        out[r, i] = (x[r, i] * inv) * w[i]


@njit(fastmath=True, cache=True, nogil=True)
def _rms_norm_serial(x, w, eps, out):
    for r in range(x.shape[0]):
        _rms_row(x, w, eps, out, r)


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _rms_norm_parallel(x, w, eps, out):
    for r in prange(x.shape[0]):
        _rms_row(x, w, eps, out, r)


def supported(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 \
        and x.is_contiguous()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, E] fp32 -> x / rms(x) * w (Zhang & Sennrich 2019), like F.rms_norm."""
    if not supported(x) or w.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    out = torch.empty_like(x)
    kernel = _rms_norm_parallel if x.shape[0] >= _PARALLEL_MIN_ROWS else _rms_norm_serial
    kernel(x.numpy(), w.numpy(), np.float32(eps), out.numpy())
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels at engine start."""
    x = torch.ones(_PARALLEL_MIN_ROWS, 32)
    rms_norm(x, torch.ones(32), 1e-5)
    rms_norm(x[:1], torch.ones(32), 1e-5)
