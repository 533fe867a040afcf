"""Pure-PyTorch references of the quantized formats: unpack, dequantize, matmul.

These define the formats (kernels.py documents the same layouts) and are the path for every
device other than CPU: on CUDA a quantized layer dequantizes with these ops and runs F.linear.

Invariants:
- `dequantize_*` are exact: every code maps to q * scale (+ min) computed in fp32, so a kernel
  can be compared against them to fp32 rounding of the accumulation only.
- int4 packing is the GGUF Q4_0/Q4_1 order: per 32-element sub-block, 16 bytes; byte j holds
  element j in the low nibble and element j + 16 in the high nibble.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

SUB_BLOCK = 32  # int4 elements per packed sub-block (16 bytes)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in 0..15 -> packed uint8 [N, K/2] (GGUF sub-block order)."""
    n, k = codes.shape
    assert k % SUB_BLOCK == 0, f"K={k} must be a multiple of {SUB_BLOCK}"
    c = codes.reshape(n, k // SUB_BLOCK, 2, SUB_BLOCK // 2)  # [N, K/32, lo|hi, 16]
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2] -> codes uint8 [N, K] in 0..15."""
    n, half = packed.shape
    p = packed.reshape(n, half // 16, 16)  # [N, K/32, 16]
    return torch.cat([p & 0xF, p >> 4], dim=-1).reshape(n, half * 2)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K], scale fp16 [N, G] -> w fp32 [N, K] (group size K / G; G = 1: per row)."""
    n, k = q.shape
    g = scale.shape[1]
    return (q.float().view(n, g, k // g) * scale.float()[:, :, None]).view(n, k)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K/2], scale/minv fp16 [N, G] -> w fp32 [N, K] (group size K / G)."""
    codes = unpack_int4(q).float()  # [N, K]
    n, k = codes.shape
    g = scale.shape[1]
    w = codes.view(n, g, k // g) * scale.float()[:, :, None] + minv.float()[:, :, None]
    return w.view(n, k)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype."""
    w = dequantize_int8(q, scale).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def int4_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [T, K] -> [T, N] in x's dtype."""
    w = dequantize_int4(q, scale, minv).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


ACT_BLOCK = 32  # activations per int8 scale (`quantize_activations`)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x [T, K] -> (codes int8 [T, K], d fp32 [T, K/32]): per block of 32 values
    d = max|x| / 127 and code = round-half-even(x * (127 / max|x|)), 0 for an all-zero block.
    x ~= codes * d (the kernels' `a8` input; kernels.quantize_activations computes the same)."""
    t, k = x.shape
    blocks = x.float().reshape(t, k // ACT_BLOCK, ACT_BLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # a tensor numerator: `127.0 / t` is reciprocal(t) * 127 in torch, rounded differently
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, 1.0),
                      0.0)
    codes = torch.round(blocks * inv).to(torch.int8)
    return codes.reshape(t, k), (amax / 127.0).reshape(t, k // ACT_BLOCK)


def int4_linear_a8(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minv: torch.Tensor,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The int8-activation form of `int4_linear` in float64: sum_k xq_k d_b(k) q_k s_g(k) plus
    the minimum terms on the unrounded x (sum_k x_k m_g(k)) -> [T, N] float64."""
    codes, d = quantize_activations(x)
    xd = (codes.double().reshape(x.shape[0], -1, ACT_BLOCK) * d.double().unsqueeze(-1))
    xd = xd.reshape(x.shape)
    n, g = scale.shape
    gs = x.shape[1] // g
    qs = unpack_int4(q).double() * scale.double().repeat_interleave(gs, dim=1)
    out = xd @ qs.T + x.double() @ minv.double().repeat_interleave(gs, dim=1).T
    return out if bias is None else out + bias.double()
