"""Small fused CPU ops of the decoder (numba), against the per-step overhead of batch-1 decode.

At batch 1 a decoder layer's elementwise work is microseconds of arithmetic behind tens of
microseconds of dispatch: `F.rms_norm` on CPU runs ~10 aten ops (~30 us per call in a decode
step, 61 calls per token on SmolLM2). One kernel call costs ~2 us.

References: `F.rms_norm(x, (E,), w, eps)`, `rope.apply_rope`, `F.silu(gate) * up`; tests compare.
The same kernels run in LlamaModel.forward and in the fused decode step (fused_decode.py), so a
token's arithmetic does not depend on which of the two paths its step took.

Invariants:
- Rows are independent and computed in a fixed order: results do not depend on T.
- Only fp32 contiguous CPU tensors take the kernels (`supported`); callers fall back otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange, types
from numba.extending import overload

from kvwise.kernels.cpu import kv_rows, runtime
from kvwise.kernels.cpu.simd import store_kv, vfma, vload, vmul, vsplat, vstore, vsum, vzero
from kvwise.model.quant.dispatch import SMALL_BATCH_MAX

runtime.preload_tbb()
_PARALLEL_MIN_ROWS = 64  # below this, one thread: the launch costs more than the work
SILU_KERNEL_MAX_ROWS = SMALL_BATCH_MAX  # the fused decode step's sizes
_NO_CONTRACT = set(runtime.EXACT_FASTMATH)


@njit(fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy", inline="always")
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


@njit(fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy")
def rms_norm_serial(x, w, eps, out):
    for r in range(x.shape[0]):
        _rms_row(x, w, eps, out, r)


@njit(parallel=True, fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy")
def _rms_norm_parallel(x, w, eps, out):
    for r in prange(x.shape[0]):
        _rms_row(x, w, eps, out, r)


@njit(fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy")
def rope_split(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, rows):
    """qkv [T, (H+2K)*D] -> q_out [T, H, D] rotated, k_dst[rows[t]] [K, D] rotated, v_dst[rows[t]]
    [K, D] copied (rotate-half RoPE at `positions[t]`; cos/sin tables [P, D]). k_dst / v_dst are
    C-contiguous [R, K, D] caches, fp32 or fp16 as uint16 (kv_store.kernel_view): fp16 rows are
    rounded to nearest even, as `KVStore.write` rounds them."""
    t_count = qkv.shape[0]
    k_count, d = k_dst.shape[1], k_dst.shape[2]
    half = d // 2
    for t in range(t_count):
        p = positions[t]
        r = rows[t]
        for j in range(num_heads + k_count):
            base = j * d
            kb = (r * k_count + j - num_heads) * d  # flat offset of this KV head's cache row
            for i in range(half):
                x1 = qkv[t, base + i]
                x2 = qkv[t, base + half + i]
                lo = x1 * cos[p, i] - x2 * sin[p, i]
                hi = x2 * cos[p, half + i] + x1 * sin[p, half + i]
                if j < num_heads:
                    q_out[t, j, i] = lo
                    q_out[t, j, half + i] = hi
                else:
                    store_kv(k_dst, kb + i, lo)
                    store_kv(k_dst, kb + half + i, hi)
        vbase = (num_heads + k_count) * d
        for i in range(k_count * d):
            store_kv(v_dst, r * k_count * d + i, qkv[t, vbase + i])


def rope_write(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, ks_dst, vs_dst, rows,
               k_buf, v_buf):  # pragma: no cover
    """rope_split into the caches' rows `rows`, whatever the cache format: dense caches are
    written by the rope kernel directly; int8 caches (with scales ks_dst, vs_dst) through the
    fp32 buffers k_buf, v_buf [T, K, D] and `kv_rows.store_rows`, exactly as the per-op path
    (rope_qkv, then the format's write) does. numba code only: the implementation is chosen by
    the cache dtype when compiled."""
    raise NotImplementedError("rope_write is compiled by numba; call it from an njit function")


@overload(rope_write, jit_options={"cache": True, "nogil": True})
def _rope_write(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, ks_dst, vs_dst, rows,
                k_buf, v_buf):
    if isinstance(k_dst, types.Array) and k_dst.dtype == types.int8:
        def quantized(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, ks_dst, vs_dst,
                      rows, k_buf, v_buf):
            t = qkv.shape[0]
            rope_split(qkv, positions, cos, sin, num_heads, q_out, k_buf[:t], v_buf[:t],
                       np.arange(t))
            kv_rows.store_rows(k_buf[:t], v_buf[:t], rows, k_dst, v_dst, ks_dst, vs_dst)
        return quantized

    def dense(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, ks_dst, vs_dst, rows,
              k_buf, v_buf):
        rope_split(qkv, positions, cos, sin, num_heads, q_out, k_dst, v_dst, rows)
    return dense


@njit(fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy", inline="always")
def _silu_mul_row(gu, out, r):
    n = out.shape[1]
    for i in range(n):
        g = gu[r, i]
        out[r, i] = g / (np.float32(1.0) + np.exp(-g)) * gu[r, n + i]


@njit(fastmath=_NO_CONTRACT, cache=True, nogil=True, error_model="numpy")
def silu_mul_serial(gu, out):
    """gu [T, 2I] (gate | up) -> out [T, I] = silu(gate) * up."""
    for r in range(gu.shape[0]):
        _silu_mul_row(gu, out, r)


def supported(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 \
        and x.is_contiguous()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, E] fp32 -> x / rms(x) * w (Zhang & Sennrich 2019), like F.rms_norm."""
    if not supported(x) or w.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    out = torch.empty_like(x)
    kernel = _rms_norm_parallel if x.shape[0] >= _PARALLEL_MIN_ROWS else rms_norm_serial
    kernel(x.numpy(), w.numpy(), np.float32(eps), out.numpy())
    return out


def rope_qkv(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             num_heads: int, num_kv_heads: int, head_dim: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H+2K)D] fp32 -> q [T, H, D], k [T, K, D] rotated; v [T, K, D]. The caller checks
    `supported(qkv)` and fp32 tables; positions long [T]."""
    t = qkv.shape[0]
    q = torch.empty(t, num_heads, head_dim)
    k = torch.empty(t, num_kv_heads, head_dim)
    v = torch.empty(t, num_kv_heads, head_dim)
    rows = np.arange(t, dtype=np.int64)
    rope_split(qkv.numpy(), positions.numpy(), cos.numpy(), sin.numpy(), num_heads, q.numpy(),
               k.numpy(), v.numpy(), rows)
    return q, k, v


def silu_mul(gu: torch.Tensor, any_rows: bool = False) -> torch.Tensor:
    """gu [T, 2I] fp32 contiguous (gate | up) -> silu(gate) * up [T, I].

    The kernel (scalar expf) serves T <= SILU_KERNEL_MAX_ROWS, the decode sizes that the fused
    decode step also runs; larger T use torch's vectorized silu (10-20x faster per element),
    unless `any_rows` (batch-invariant mode: every row through the kernel, same bits for any T)."""
    if not supported(gu) or (gu.shape[0] > SILU_KERNEL_MAX_ROWS and not any_rows):
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = torch.empty(gu.shape[0], gu.shape[1] // 2)
    silu_mul_serial(gu.numpy(), out.numpy())
    return out


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels at engine start."""
    x = torch.ones(_PARALLEL_MIN_ROWS, 32)
    rms_norm(x, torch.ones(32), 1e-5)
    rms_norm(x[:1], torch.ones(32), 1e-5)
    silu_mul(x)
    silu_mul(x[:1])
    tab = torch.ones(4, 16)
    rope_qkv(torch.ones(2, 64), torch.zeros(2, dtype=torch.long), tab, tab, 2, 1, 16)
