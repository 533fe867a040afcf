"""KVQuant's quantizer (Hooper et al. 2024): per-channel pre-RoPE keys, per-token values, a
lookup-table datatype, dense-and-sparse outliers, as pure PyTorch functions.

Keys (one layer): each (KV head, channel) has a calibrated range [zero - scale, zero + scale]
(kvwise.cache.kvquant.calibration). A key element x is normalized to u = (x - zero) / scale
and stored as the index of the nearest entry of the layer's key datatype (`levels`, 2^bits
sorted values in [-1, 1]); it reads back as values[code] * scale + zero (`values` = `levels`,
or Q-Norm's affine correction of them for 2-bit nuq). Elements outside the range are the
dense-and-sparse outliers: up to `num_outliers` per (token, KV head), the farthest out first,
are kept exactly in fp16 beside the codes; the rest are clamped to the range.

Values: each (token, KV head) vector of D elements takes its own range online. With C outlier
slots, the C elements whose removal leaves the narrowest range (a lowest and C - a highest,
the best a) are kept exactly; zero and scale (fp16) span the rest. Then codes as for keys,
with the layer's value datatype.

Invariants:
- Every function is deterministic: ties in nearest-level rounding go to the lower level, ties
  between outlier candidates to the lower channel index, ties between value splits to the
  smaller `a`. Zero and scale are rounded to fp16 before normalizing, so dequantization with
  the stored fp16 numbers reproduces exactly what was quantized.
- An unused outlier slot holds channel index `NO_OUTLIER` and value 0; a vector with scale 0
  (all dense elements equal) reads back as its zero.
- Codes are packed little-endian, bit i of code j at bit j*bits + i of the vector's bytes, so
  a D-element vector takes D * bits / 8 bytes (D % 8 == 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_OUTLIER = 255  # channel index of an unused outlier slot (head dims are < 255)


@dataclass(frozen=True)
class Datatype:
    """A layer's datatype for keys or values: codes index `levels` when quantizing (nearest) and
    `values` when reading (equal to `levels` except after Q-Norm). Both [2^bits] float32."""

    levels: torch.Tensor
    values: torch.Tensor

    @property
    def bits(self) -> int:
        return int(self.levels.numel()).bit_length() - 1


def uniform_datatype(bits: int) -> Datatype:
    """The uniform grid over [-1, 1] (min-max integer quantization), for the `int` formats."""
    levels = torch.linspace(-1.0, 1.0, 1 << bits, dtype=torch.float32)
    return Datatype(levels, levels)


def nearest_codes(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """u [...] float32 -> uint8 [...]: index of the nearest level (ties: the lower one)."""
    bounds = (levels[1:] + levels[:-1]) * 0.5  # [2^b - 1]
    return torch.searchsorted(bounds, u.contiguous()).to(torch.uint8)


def fp16_range(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> zero, scale rounded to fp16 (float16 tensors) of the range [lo, hi]."""
    return ((hi + lo) * 0.5).half(), ((hi - lo) * 0.5).half()


def normalize(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(x - zero) / scale in float32, 0 where scale is 0 (shapes broadcast)."""
    z, s = zero.float(), scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.where(s > 0, (x.float() - z) / safe, torch.zeros_like(x, dtype=torch.float32))


# -- keys -------------------------------------------------------------------------------------

def quantize_keys(x: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, dt: Datatype,
                  num_outliers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, K, D] pre-RoPE keys; zero, scale [K, D] fp16 -> codes [T, K, D] uint8, outlier
    channel [T, K, C] uint8, outlier value [T, K, C] fp16 (C = num_outliers)."""
    u = normalize(x, zero, scale)  # [T, K, D]
    codes = nearest_codes(u.clamp(-1.0, 1.0), dt.levels)
    t, k, d = x.shape
    idx = torch.full((t, k, num_outliers), NO_OUTLIER, dtype=torch.uint8)
    val = torch.zeros((t, k, num_outliers), dtype=torch.float16)
    if num_outliers:
        excess = torch.where(u.abs() > 1.0, u.abs(), torch.zeros_like(u))  # [T, K, D]
        order = torch.sort(excess, dim=-1, descending=True, stable=True).indices
        top = order[..., :num_outliers]  # [T, K, C] farthest out first, lower channel on ties
        keep = torch.gather(excess, -1, top) > 0
        idx = torch.where(keep, top.to(torch.uint8), idx)
        val = torch.where(keep, torch.gather(x.float(), -1, top).half(), val)
    return codes, idx, val


def dequantize(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, dt: Datatype,
               out_idx: torch.Tensor, out_val: torch.Tensor) -> torch.Tensor:
    """codes [..., D] uint8; zero, scale broadcastable to codes (fp16); outliers [..., C]
    -> float32 [..., D]: values[code] * scale + zero, outlier channels replaced exactly."""
    x = dt.values[codes.long()] * scale.float() + zero.float()
    if out_idx.shape[-1]:
        d = x.shape[-1]
        used = out_idx != NO_OUTLIER  # [..., C]
        # unused slots write into a spare column, so they can never land on a used one
        ch = torch.where(used, out_idx.long(), torch.full_like(out_idx, d, dtype=torch.long))
        padded = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)  # [..., D + 1]
        x = padded.scatter(-1, ch, torch.where(used, out_val.float(), 0.0))[..., :d]
    return x


# -- values -----------------------------------------------------------------------------------

def value_ranges(x: torch.Tensor, num_outliers: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> lo, hi [...] of the dense elements and the outlier channels [..., C] long:
    the C removed elements (a lowest and C - a highest) that leave the narrowest range."""
    srt, order = torch.sort(x.float(), dim=-1, stable=True)
    d = x.shape[-1]
    c = num_outliers
    if c == 0:
        return srt[..., 0], srt[..., -1], order[..., :0]
    widths = torch.stack([srt[..., d - 1 - (c - a)] - srt[..., a] for a in range(c + 1)], -1)
    best = torch.argmin(widths, dim=-1)  # [...] first minimum: the smaller a on ties
    lo = torch.gather(srt, -1, best[..., None])[..., 0]
    hi = torch.gather(srt, -1, (d - 1 - c + best)[..., None])[..., 0]
    ranks = torch.arange(c, device=x.device)  # the removed ranks: 0..a-1 and d-(c-a)..d-1
    removed = torch.where(ranks < best[..., None], ranks, ranks + (d - c))  # [..., C]
    return lo, hi, torch.gather(order, -1, removed)


def quantize_values(x: torch.Tensor, dt: Datatype, num_outliers: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor]:
    """x [T, K, D] -> codes [T, K, D] uint8, zero, scale [T, K] fp16, outlier channel [T, K, C]
    uint8, outlier value [T, K, C] fp16."""
    lo, hi, out = value_ranges(x, num_outliers)
    zero, scale = fp16_range(lo, hi)  # [T, K] fp16
    u = normalize(x, zero[..., None], scale[..., None]).clamp(-1.0, 1.0)
    codes = nearest_codes(u, dt.levels)
    idx = out.to(torch.uint8)
    val = torch.gather(x.float(), -1, out).half()  # the slot count is fixed per vector
    return codes, zero, scale, idx, val


# -- packing ----------------------------------------------------------------------------------

def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] uint8 (< 2^bits) -> [..., D * bits / 8] uint8 (see module docstring)."""
    d = codes.shape[-1]
    assert d * bits % 8 == 0, "head_dim * bits must be a multiple of 8"
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    bitplane = (codes[..., None] >> shifts) & 1  # [..., D, bits]
    flat = bitplane.reshape(*codes.shape[:-1], d * bits // 8, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=codes.device))
    return (flat.to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Inverse of pack_codes: [..., D * bits / 8] uint8 -> codes [..., D] uint8. Eight codes
    take exactly `bits` bytes, so each group is one little-endian word shifted eight ways."""
    lead = packed.shape[:-1]
    groups = packed.reshape(*lead, d // 8, bits).to(torch.int32)  # [..., D/8, bits]
    word = groups[..., 0]
    for i in range(1, bits):
        word = word | (groups[..., i] << (8 * i))  # [..., D/8]
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32, device=packed.device)  # [8]
    codes = (word[..., None] >> shifts) & ((1 << bits) - 1)  # [..., D/8, 8]
    return codes.reshape(*lead, d).to(torch.uint8)
