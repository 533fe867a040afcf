"""Weights -> quantized formats: from fp32/fp16/bf16 tensors, or straight from GGUF blocks.

int8: symmetric per output row, scale = max|w| / 127, q = round(w / scale).
int4: asymmetric per group of `group_size` inputs (FlexGen, Sheng et al. 2023, sec. 5: min/max
  per group), scale = (max - min) / 15, q = round((w - min) / scale) in 0..15; scale and min are
  stored as fp16 and q is computed against the stored (rounded) values.

GGUF fast paths (no fp32 copy, exact): Q4_1 blocks of 32 are already (d, m, 16 bytes of nibbles)
in our packing order, so they map onto int4 groups of 32 (scale = d, min = m); Q4_0 blocks
(d, nibbles, w = d * (q - 8)) map onto scale = d, min = -8 d (exact in fp16). Every other GGUF
type (Q8_0, F16, K-quants...) is dequantized one tensor at a time and quantized as a float tensor.

Invariants:
- A fused projection (q|k|v, gate|up) is converted part by part and concatenated along rows;
  all parts of one int4 layer share one group size (`int4_group_size`).
- Large tensors are processed in row chunks, so converting never holds more than one tensor's
  fp32 copy plus a chunk of temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kvwise.model.gguf_reader import RawTensor, dequantize
from kvwise.model.quant.reference import SUB_BLOCK, pack_int4

Part = Union[torch.Tensor, RawTensor]  # a float weight [out, in], or a GGUF tensor's raw blocks
GGUF_INT4_DIRECT = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
DEFAULT_GROUP_SIZE = 64
_CHUNK_ROWS = 4096


@dataclass
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] fp32


@dataclass
class Int4Weight:
    q: torch.Tensor  # [N, K/2] uint8, GGUF sub-block order (reference.pack_int4)
    scale: torch.Tensor  # [N, G] fp16
    minv: torch.Tensor  # [N, G] fp16

    @property
    def group_size(self) -> int:
        return self.q.shape[1] * 2 // self.scale.shape[1]


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """w float [N, K] -> per-row symmetric int8."""
    qs, scales = [], []
    for c in w.split(_CHUNK_ROWS):
        c = c.float()
        scale = c.abs().amax(dim=1) / 127.0  # [n]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        qs.append(torch.round(c / scale[:, None]).clamp_(-127, 127).to(torch.int8))
        scales.append(scale)
    return Int8Weight(torch.cat(qs), torch.cat(scales))


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """w float [N, K] -> asymmetric int4 with fp16 scale/min per `group_size` inputs."""
    n, k = w.shape
    if group_size % SUB_BLOCK or k % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of {SUB_BLOCK} "
                         f"dividing K={k}")
    qs, scales, mins = [], [], []
    for c in w.split(_CHUNK_ROWS):
        g = c.float().reshape(c.shape[0], k // group_size, group_size)  # [n, G, gs]
        lo, hi = g.amin(dim=2), g.amax(dim=2)  # [n, G]
        minv = lo.clamp(-65504, 65504).half()
        scale = ((hi - minv.float()) / 15.0).clamp(max=65504).half()
        s32 = scale.float()
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        codes = torch.round((g - minv.float()[:, :, None]) / safe[:, :, None]).clamp_(0, 15)
        codes = torch.where(s32[:, :, None] > 0, codes, torch.zeros_like(codes))
        qs.append(pack_int4(codes.to(torch.uint8).reshape(c.shape[0], k)))
        scales.append(scale)
        mins.append(minv)
    return Int4Weight(torch.cat(qs), torch.cat(scales), torch.cat(mins))


def dense(part: Part) -> torch.Tensor:
    """A part as an fp32 tensor [out, in] (dequantizing GGUF blocks)."""
    if isinstance(part, torch.Tensor):
        return part.float()
    return torch.from_numpy(dequantize(part.data, part.ggml_type).reshape(part.shape))


def int4_from_gguf(raw: RawTensor) -> Int4Weight:
    """Q4_0 / Q4_1 blocks -> int4 with group size 32, bit-exact."""
    rows, cols = raw.shape
    blocks = np.ascontiguousarray(raw.data).reshape(rows, cols // 32, -1)  # [N, K/32, bytes]
    if raw.ggml_type == GGMLQuantizationType.Q4_1:  # d f16, m f16, 16 bytes
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
        qs = blocks[:, :, 4:20]
    elif raw.ggml_type == GGMLQuantizationType.Q4_0:  # d f16, 16 bytes; w = d * (q - 8)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
        m = (d.astype(np.float32) * -8.0).astype(np.float16)  # exact: a power-of-two multiple
        qs = blocks[:, :, 2:18]
    else:
        raise ValueError(f"{raw.ggml_type.name} has no direct int4 mapping")
    q = torch.from_numpy(np.ascontiguousarray(qs).reshape(rows, cols // 2))
    return Int4Weight(q, torch.from_numpy(np.ascontiguousarray(d)),
                      torch.from_numpy(np.ascontiguousarray(m)))


def int4_group_size(parts: list[Part], default: int = DEFAULT_GROUP_SIZE) -> int:
    """32 when any part is GGUF Q4_0/Q4_1 (so those map exactly), else `default`."""
    direct = any(isinstance(p, RawTensor) and p.ggml_type in GGUF_INT4_DIRECT for p in parts)
    return SUB_BLOCK if direct else default


def to_int8(parts: list[Part]) -> Int8Weight:
    """Quantize and concatenate parts along rows."""
    ws = [quantize_int8(dense(p)) for p in parts]
    return Int8Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]))


def to_int4(parts: list[Part], group_size: int) -> Int4Weight:
    """Quantize (or map GGUF 4-bit blocks) and concatenate parts along rows."""
    ws = []
    for p in parts:
        if (isinstance(p, RawTensor) and p.ggml_type in GGUF_INT4_DIRECT
                and group_size == SUB_BLOCK):
            ws.append(int4_from_gguf(p))
        else:
            ws.append(quantize_int4(dense(p), group_size))
    return Int4Weight(torch.cat([w.q for w in ws]), torch.cat([w.scale for w in ws]),
                      torch.cat([w.minv for w in ws]))
