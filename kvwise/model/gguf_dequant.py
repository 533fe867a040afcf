"""Dequantize GGUF tensor blocks to float32 (numpy).

Invariants:
- The numpy fast paths (F32, F16, BF16, Q4_0, Q4_1, Q8_0) are bit-identical to
  `gguf.quants.dequantize`, the reference used for every other type; tests compare the two.
- The result is a new array: it never aliases the memory-mapped file.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from kvwise.errors import WeightLoadError


# The fast paths are numpy rather than torch on purpose: torch's intra-op threads made loading
# 15-25x slower on a CPU shared with other processes, and numpy needs no global thread setting.
def _half_scales(blocks: np.ndarray, start: int, count: int = 1) -> np.ndarray:
    """`count` fp16 scalars per block starting at byte `start`, as fp32 [nb, count]."""
    return np.ascontiguousarray(blocks[:, start : start + 2 * count]).view(np.float16).astype(
        np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = _half_scales(blocks, 0)  # [nb, 1]
    out = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)  # [nb, 32]
    out *= d
    return out


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _half_scales(blocks, 0)  # [nb, 1]
    qs = blocks[:, 2:]  # [nb, 16]; low nibbles are elements 0..15, high nibbles 16..31
    out = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # [nb, 32]
    out -= 8.0
    out *= d
    return out


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    dm = _half_scales(blocks, 0, count=2)  # [nb, 2]: scale d, minimum m
    qs = blocks[:, 4:]  # [nb, 16]
    out = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.float32)  # [nb, 32]
    out *= dm[:, :1]
    out += dm[:, 1:]
    return out


def _dequant_f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()


def _dequant_f16(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


def _dequant_bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of an fp32
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


_FAST_DEQUANT = {
    GGMLQuantizationType.F32: _dequant_f32,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
}


def dequantize_reference(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """gguf-py's numpy dequantizer: uint8 [rows, row_bytes] -> float32 [rows, cols]."""
    return gguf_quants.dequantize(raw, ggml_type)


def dequantize(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """Stored bytes uint8 [rows, row_bytes] -> a new float32 array [rows, cols]."""
    raw = np.ascontiguousarray(raw)
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] % type_size:
        raise WeightLoadError(f"{ggml_type.name}: expected uint8 rows of whole {type_size}-byte "
                              f"blocks, got {raw.dtype} {raw.shape}")
    if ggml_type in _FAST_DEQUANT:
        out = _FAST_DEQUANT[ggml_type](raw.reshape(-1, type_size))  # [nb, block_size]
        return out.reshape(*raw.shape[:-1], -1)
    try:
        return dequantize_reference(raw, ggml_type)
    except NotImplementedError as e:
        raise WeightLoadError(f"ggml type {ggml_type.name} cannot be dequantized: {e}") from e
