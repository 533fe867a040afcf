"""Weights -> quantized formats: from fp32/fp16/bf16 tensors, or straight from GGUF blocks.

int8: symmetric, scale = max|w| / 127 per group, q = round(w / scale); one group per output row
  (per-channel) for float checkpoints, groups of 32 for GGUF block-quantized tensors.
int4: asymmetric per group of `group_size` inputs (FlexGen, Sheng et al. 2023, sec. 5: min/max
  per group), scale = (max - min) / 15, q = round((w - min) / scale) in 0..15.
Scales (and mins) are stored as fp16; q is computed against the stored (rounded) values.

GGUF fast paths (no fp32 copy, exact): Q8_0 blocks (d, 32 x int8) are int8 groups of 32; Q4_1
blocks of 32 are already (d, m, 16 bytes of nibbles) in our packing order, so they map onto int4
groups of 32 (scale = d, min = m); Q4_0 blocks (d, nibbles, w = d * (q - 8)) map onto scale = d,
min = -8 d (exact in fp16). Any other pairing (Q4_1 -> int8, Q8_0 -> int4, F16, K-quants...)
dequantizes one tensor and quantizes it as a float tensor, with groups of 32 when the source was
block-quantized (so int8 from Q4_1 stays within 1/254 of each 32-block's maximum).

Invariants:
- A fused projection (q|k|v, gate|up) is converted part by part and concatenated along rows;
  all parts of one int4 layer share one group size (`int4_group_size`).
- Large tensors are processed in row chunks, so converting never holds more than one tensor's
  fp32 copy plus a chunk of temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from gguf import GGMLQuantizationType

from kvwise.model.gguf_dequant import dequantize
from kvwise.model.gguf_reader import RawTensor
from kvwise.model.quant.reference import SUB_BLOCK, pack_int4

Part = Union[torch.Tensor, RawTensor]  # a float weight [out, in], or a GGUF tensor's raw blocks
GGUF_INT4_DIRECT = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
GGUF_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
DEFAULT_GROUP_SIZE = 64  # int4 from float checkpoints
_CHUNK_ROWS = 4096


@dataclass
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, G] fp16; G = 1: per output row

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]


@dataclass
class Int4Weight:
    q: torch.Tensor  # [N, K/2] uint8, GGUF sub-block order (reference.pack_int4)
    scale: torch.Tensor  # [N, G] fp16
    minv: torch.Tensor  # [N, G] fp16

    @property
    def group_size(self) -> int:
        return self.q.shape[1] * 2 // self.scale.shape[1]


def _check_group(k: int, group_size: int) -> None:
    if group_size % SUB_BLOCK or k % group_size:
        raise ValueError(f"group_size {group_size} must be a multiple of {SUB_BLOCK} "
                         f"dividing K={k}")


def quantize_int8(w: torch.Tensor, group_size: Optional[int] = None) -> Int8Weight:
    """w float [N, K] -> symmetric int8, one fp16 scale per row (group_size None) or group."""
    n, k = w.shape
    gs = group_size or k
    if group_size is not None:
        _check_group(k, gs)
    qs, scales = [], []
    for c in w.split(_CHUNK_ROWS):
        g = c.float().reshape(c.shape[0], k // gs, gs)  # [n, G, gs]
        scale = (g.abs().amax(dim=2) / 127.0).clamp(max=65504).half()  # [n, G]
        s32 = scale.float()
        safe = torch.where(s32 > 0, s32, torch.ones_like(s32))
        q = torch.round(g / safe[:, :, None]).clamp_(-127, 127).to(torch.int8)
        qs.append(q.reshape(c.shape[0], k))
        scales.append(scale)
    return Int8Weight(torch.cat(qs), torch.cat(scales))


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> Int4Weight:
    """w float [N, K] -> asymmetric int4 with fp16 scale/min per `group_size` inputs."""
    n, k = w.shape
    _check_group(k, group_size)
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


def int8_from_gguf(raw: RawTensor) -> Int8Weight:
    """Q8_0 blocks -> int8 with group size 32, bit-exact."""
    if raw.ggml_type != GGMLQuantizationType.Q8_0:
        raise ValueError(f"{raw.ggml_type.name} has no direct int8 mapping")
    rows, cols = raw.shape
    blocks = np.ascontiguousarray(raw.data).reshape(rows, cols // 32, 34)  # d f16, 32 x int8
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0]  # [N, K/32]
    q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(rows, cols)
    return Int8Weight(torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(d)))


def _block_quantized(part: Part) -> bool:
    return isinstance(part, RawTensor) and part.ggml_type not in GGUF_FLOAT_TYPES


def int8_group_size(parts: list[Part]) -> Optional[int]:
    """32 when any part is a block-quantized GGUF tensor (Q8_0 maps exactly), else None (per
    output row, as for float checkpoints)."""
    return SUB_BLOCK if any(_block_quantized(p) for p in parts) else None


def int4_group_size(parts: list[Part], default: int = DEFAULT_GROUP_SIZE) -> int:
    """32 when any part is GGUF Q4_0/Q4_1 (so those map exactly), else `default`."""
    direct = any(isinstance(p, RawTensor) and p.ggml_type in GGUF_INT4_DIRECT for p in parts)
    return SUB_BLOCK if direct else default


def to_int8(parts: list[Part], group_size: Optional[int]) -> Int8Weight:
    """Quantize (or map GGUF Q8_0 blocks) and concatenate parts along rows."""
    ws = []
    for p in parts:
        if (isinstance(p, RawTensor) and p.ggml_type == GGMLQuantizationType.Q8_0
                and group_size == SUB_BLOCK):
            ws.append(int8_from_gguf(p))
        else:
            ws.append(quantize_int8(dense(p), group_size))
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
