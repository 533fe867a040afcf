"""How a quantized projection runs for a given input: fused numba kernel, or dequantize + matmul.

- CPU, T <= SMALL_BATCH_MAX tokens (decode): the fused kernel (kernels.py) reads the packed
  weights once; single-stream decode is memory-bound, so fewer bytes per weight is the speed-up.
- CPU, larger T (prefill, big decode batches): compute-bound. On a CPU with native bf16 dot
  products (AVX512-BF16 or AMX, `BF16_NATIVE`) the layer keeps a bf16 copy of its dequantized
  weight (2 B/weight, built once by `build_bf16`) and runs a bf16 GEMM with fp32 accumulation
  (oneDNN): measured 2.0-2.4x the fp32 sgemm on 2 Zen 4 cores (~400 vs ~165 GFLOP/s), and
  +0.15% perplexity on pydoc topics against fp32 activations. Rounding activations to int8 per
  token for torch._int_mm (~800 GOP/s) cost +4.7% perplexity (activation outliers) and is not
  used. Without native bf16, rows are dequantized chunk by chunk into one reusable fp32 scratch
  buffer (a few MB, stays in cache) and multiplied with torch.mm.
- Any other device: the PyTorch reference (dequantize, then F.linear). Not verified on a GPU.

Invariants:
- `Workspace` is the one piece of runtime state the quantized layers of a model share (scratch
  buffer, kernel thread count); it is created by the model builder and passed in explicitly.
- Output is fp32 [T, N] on CPU; the caller casts to the activation dtype.
- Small and large steps differ at bf16 precision (~0.4% relative), so with quantized weights a
  token's logits depend on whether its step had <= SMALL_BATCH_MAX tokens; prefix-cache hits and
  chunked prefill change a prompt tail's step size. Rows within either path are independent of
  the rest of the batch (batch invariance at fixed step sizes holds; tests check it). With
  `Workspace.row_invariant` (`--batch-invariant`) every T runs the fused kernels (`fused_rows`),
  so a row's bits depend on nothing but that row.
- The bf16 copy is derived from the packed weight (never loaded separately) and is not a buffer:
  it does not move with `.to()` and is dropped when the layer leaves the CPU. It is kept in
  oneDNN's blocked layout when the probe in `pack_bf16` confirms identical results.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

from kvwise.kernels.cpu.features import cpu_features


def _bf16_native() -> bool:
    """bf16 dot products in hardware (AVX512-BF16 or AMX) on the CPU as capped by
    KVWISE_CPU_ISA: without them oneDNN's bf16 GEMM is emulated and slower than fp32 sgemm."""
    feats = cpu_features()
    return feats.avx512bf16 or feats.amx_bf16


BF16_NATIVE = _bf16_native()
SMALL_BATCH_MAX = 16  # measured crossover of the fused kernel vs dequantize + sgemm (int4/int8)
CHUNK_ELEMS = 1 << 20  # fp32 elements of weight dequantized per sgemm call (4 MiB)


class Workspace:
    """Scratch memory and settings shared by all quantized layers of one model (not thread-safe:
    one engine thread runs the model)."""

    def __init__(self, num_threads: Optional[int] = None, act_int8: bool = False) -> None:
        self.num_threads = num_threads or torch.get_num_threads()
        # int4 layers' CPU decode kernels round activations to int8 (`--activation-quant int8`)
        self.act_int8 = act_int8
        # batch-invariant mode: every T through the fused kernels (`fused_rows`), whose rows do
        # not depend on T; the bf16 / sgemm large-T paths are not used
        self.row_invariant = False
        self._buf = torch.empty(0)
        self._threads_set_in: Optional[int] = None  # id of the thread that last applied them

    def use_threads(self) -> None:
        """Apply `num_threads` to kernel launches from the calling thread (numba keeps the
        setting per thread; the engine may run on a thread other than the one that built it)."""
        ident = threading.get_ident()
        if ident != self._threads_set_in:
            from kvwise.kernels.cpu import runtime

            runtime.set_num_threads(self.num_threads)
            self._threads_set_in = ident

    def scratch(self, numel: int) -> torch.Tensor:
        """An fp32 CPU buffer of at least `numel` elements (contents undefined), reused."""
        if self._buf.numel() < numel:
            self._buf = torch.empty(numel)
        return self._buf[:numel]


def dequant_matmul(x: torch.Tensor, out_features: int,
                   dequant_rows: Callable[[int, np.ndarray], None],
                   bias: Optional[torch.Tensor], workspace: Workspace) -> torch.Tensor:
    """x fp32 [T, K] @ W.T where `dequant_rows(row0, buf [R, K])` writes rows row0..row0+R-1 of W
    in fp32 -> [T, N] fp32."""
    t, k = x.shape
    n = out_features
    rows = max(64, CHUNK_ELEMS // k // 64 * 64)
    out = torch.empty(t, n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        w = workspace.scratch((r1 - r0) * k).view(r1 - r0, k)  # [R, K]
        dequant_rows(r0, w.numpy())
        torch.mm(x, w.t(), out=out[:, r0:r1])
    if bias is not None:
        out += bias
    return out


# oneDNN's reorder-once linear (the ops torch.compile's CPU backend emits for frozen weights)
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
_PACKED_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
PACK_BATCH_HINT = 64  # rows the blocked layout is chosen for (decode batches); any T works


def pack_bf16(weight_bf16: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 -> the same weight in oneDNN's blocked layout, reordered once, or the input
    when this PyTorch lacks the ops or their result differs from F.linear on a probe.

    Why: F.linear on a plain bf16 weight reorders it inside every call; the packed weight runs
    the 64-row decode-step GEMMs of SmolLM2 in 38.0 instead of 48.6 ms per step (30 layers,
    weights out of cache; 1024 rows: 525 vs 553 ms), with bit-identical outputs."""
    if _REORDER is None or _PACKED_LINEAR is None or weight_bf16.device.type != "cpu":
        return weight_bf16
    try:
        packed = _REORDER(weight_bf16, PACK_BATCH_HINT)
        probe = torch.randn(17, weight_bf16.shape[1], generator=torch.Generator().manual_seed(0))
        probe = probe.bfloat16()
        same = torch.equal(_PACKED_LINEAR(probe, packed, None, "none", [], ""),
                           torch.nn.functional.linear(probe, weight_bf16))
    except RuntimeError:
        return weight_bf16
    return packed if same else weight_bf16


def bf16_matmul(x: torch.Tensor, weight_bf16: torch.Tensor,
                bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x fp32 [T, K] @ weight_bf16 [N, K].T in bf16 with fp32 accumulation -> fp32 [T, N].
    weight_bf16 is plain or packed by `pack_bf16` (same results)."""
    if weight_bf16.layout == torch._mkldnn:
        out = _PACKED_LINEAR(x.bfloat16(), weight_bf16, None, "none", [], "").float()
    else:
        out = torch.nn.functional.linear(x.bfloat16(), weight_bf16).float()
    if bias is not None:
        out += bias
    return out


def restore_shape(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """out fp32 [T, N] -> x's leading shape and dtype."""
    if x.dim() != 2:
        out = out.view(*x.shape[:-1], out.shape[-1])
    return out if x.dtype == torch.float32 else out.to(x.dtype)


FUSED_CHUNK = 64  # tokens per fused-kernel call (large T only in batch-invariant mode)


def fused_rows(x: torch.Tensor, out_features: int,
               kernel: Callable[[np.ndarray, np.ndarray], None]) -> torch.Tensor:
    """x fp32 [T, K] -> [T, N] through `kernel(x_chunk, out_chunk)` (a fused int4/int8
    matmul), FUSED_CHUNK tokens at a time (their activations stay in cache; T <= SMALL_BATCH_MAX
    is one call); each row's value depends only on that row, so chunking changes no bits."""
    out = torch.empty(x.shape[0], out_features)
    for t0 in range(0, x.shape[0], FUSED_CHUNK):
        kernel(x[t0:t0 + FUSED_CHUNK].numpy(), out[t0:t0 + FUSED_CHUNK].numpy())
    return out
