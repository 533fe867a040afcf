"""Rotary position embeddings (RoFormer) in the Hugging Face rotate-half convention.

Invariants:
- `inv_freq` follows the model's `rope_scaling` ("linear" or "llama3"; None = plain RoPE).
- Tables are built once per engine for `max_positions` and indexed by absolute position, so a
  token's rotation never depends on the batch it runs in.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp64, with Llama-3 or linear scaling applied."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        blended = (1 - smooth) * inv / factor + smooth * inv
        return torch.where(mid, blended, scaled)
    if kind == "default":
        return inv
    raise ValueError(f"rope_scaling: unsupported rope_type {kind!r}")


def rope_tables(head_dim: int, theta: float, scaling: Optional[dict[str, Any]],
                max_positions: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [P, D] (frequencies repeated for both halves)."""
    inv = rope_inv_freq(head_dim, theta, scaling)  # [D/2]
    pos = torch.arange(max_positions, dtype=torch.float64)
    freqs = torch.outer(pos, inv)  # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
    return emb.cos().to(dtype=dtype, device=device), emb.sin().to(dtype=dtype, device=device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, n, D]; cos/sin [T, D] already gathered at the tokens' positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)  # [T, n, D]
    return x * cos[:, None, :] + rotated * sin[:, None, :]
