"""Dense KV formats: float32, float16 and bfloat16 rows (`--kv-cache-dtype float32|float16|...`).

Math stays in the compute dtype; rows are rounded once, when written, and every reader widens
the same stored values, so outputs stay batch-invariant whatever path a row takes. On CPU a
float16 cache halves the decode-attention bytes; the numba kernels take it as uint16 views.

Invariants:
- `k`, `v` are [L, N*S, K, D] in the storage dtype, zero-filled at start (attention gathers whole
  blocks and masks unwritten slots, and masked NaN garbage would still poison the output).
- `write` returns the written rows rounded to the storage dtype and widened back (what any
  reader sees), computed without reading the cache.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvwise.cache.kv_store import (
    KVStore,
    ModelShape,
    kernel_dtype,
    register_format,
)


class DenseKV(KVStore):
    storage_dtype: torch.dtype = torch.float32

    def __init__(self, shape: ModelShape, num_blocks: int, block_size: int,
                 compute_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, num_blocks, block_size, compute_dtype, device)
        dims = (*self._rows_shape(), shape.num_kv_heads, shape.head_dim)
        self.k = torch.zeros(dims, dtype=self.storage_dtype, device=device)  # [L, N*S, K, D]
        self.v = torch.zeros(dims, dtype=self.storage_dtype, device=device)  # [L, N*S, K, D]
        if kernel_dtype(self.k):
            self._enable_kernels(self.k, self.v)

    @classmethod
    def token_head_bytes(cls, head_dim: int) -> int:
        return 2 * head_dim * torch.empty((), dtype=cls.storage_dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = k.to(self.storage_dtype), v.to(self.storage_dtype)
        self.k[layer].index_copy_(0, slots, ks)
        self.v[layer].index_copy_(0, slots, vs)
        return ks.to(k.dtype), vs.to(v.dtype)

    def write_heads(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = k.to(self.storage_dtype), v.to(self.storage_dtype)
        heads = torch.arange(self.num_kv_heads, device=slots.device).expand_as(slots)
        self.k[layer][slots, heads] = ks
        self.v[layer][slots, heads] = vs
        return ks.to(k.dtype), vs.to(v.dtype)

    def gather_head_keys(self, layer: int, rows: torch.Tensor, head: int) -> torch.Tensor:
        return self.k[layer][rows, head].to(self.compute_dtype)

    def gather_rows(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.compute_dtype
        return self.k[layer][rows].to(c), self.v[layer][rows].to(c)

    def gather_blocks(self, layer: int, block_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        # whole blocks: one index_select of S*K*D-element rows, ~2x faster than a per-slot gather
        s, kh, d = self.block_size, self.num_kv_heads, self.head_dim
        c = self.compute_dtype
        k = self.k[layer].view(-1, s, kh, d).index_select(0, block_ids).view(-1, kh, d)
        v = self.v[layer].view(-1, s, kh, d).index_select(0, block_ids).view(-1, kh, d)
        return k.to(c), v.to(c)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v}


class Float32KV(DenseKV):
    name = "float32"
    storage_dtype = torch.float32


class Float16KV(DenseKV):
    name = "float16"
    storage_dtype = torch.float16


class BFloat16KV(DenseKV):
    name = "bfloat16"
    storage_dtype = torch.bfloat16


for _cls in (Float32KV, Float16KV, BFloat16KV):
    register_format(_cls.name, _cls)
