"""The KV tensors: one preallocated pool of blocks per layer, addressed by flat slot rows.

Invariants:
- `k[l]` and `v[l]` are [N*S, K, D] views of layer l; block b owns rows b*S .. b*S+S-1 in every
  layer ("one block id spans all layers").
- Every slot always holds a finite value (zero until first written).
- The store never decides which block a token goes to: the KV manager does, the runner turns that
  into slot rows, and the model writes them with `write`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class ModelShape(Protocol):
    """What the store needs of a model's config (kvwise.model.config.ModelConfig has it; the
    cache layer does not import the model layer)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

# Cache dtypes the CPU numba kernels (rope-into-cache, decode attention, fused decode step) read
# and write; other dtypes (bfloat16) go through the PyTorch paths.
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


def kernel_dtype(cache: torch.Tensor) -> bool:
    """Whether the CPU kernels take this cache tensor."""
    return cache.device.type == "cpu" and cache.dtype in KERNEL_KV_DTYPES


def kernel_view(cache: torch.Tensor) -> np.ndarray:
    """The numpy array the kernels take for a CPU cache tensor (no copy): fp32 as is, fp16 as its
    uint16 bits (numba has no half type; simd.vload_kv / store_kv convert)."""
    a = cache.numpy()
    return a if cache.dtype == torch.float32 else a.view(np.uint16)


def bytes_per_block(cfg: ModelShape, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class KVStore:
    def __init__(self, cfg: ModelShape, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (cfg.num_layers, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not empty: attention gathers whole blocks and masks the unwritten slots, and a
        # masked slot holding NaN garbage would still poison the output (0 * NaN = NaN).
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, N*S, K, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, N*S, K, D]
        self.bytes_per_block = bytes_per_block(cfg, block_size, dtype)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """slots [T] long; k, v [T, K, D] (any float dtype: rounded to the cache's) -> stored at
        those rows of layer `layer`."""
        self.k[layer].index_copy_(0, slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(0, slots, v.to(self.v.dtype))

    # -- moving blocks between engines (export/import of a request) ---------------------------

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """The stored bytes of these blocks, every layer, as CPU tensors (name -> tensor):
        "k" and "v" [L, len(block_ids) * S, K, D] in the store's dtype, rows in table order."""
        rows = _block_rows(block_ids, self.block_size, self.k.device)
        return {"k": self.k[:, rows].cpu(), "v": self.v[:, rows].cpu()}

    def import_blocks(self, block_ids: list[int], data: dict[str, torch.Tensor]) -> None:
        """Write what `export_blocks` returned (from an engine with the same format and model)
        into these blocks; shapes and dtypes must match exactly (ValueError otherwise)."""
        rows = _block_rows(block_ids, self.block_size, self.k.device)
        for name, cache in (("k", self.k), ("v", self.v)):
            t = data.get(name)
            want = (cache.shape[0], rows.shape[0], *cache.shape[2:])
            if t is None or tuple(t.shape) != want or t.dtype != cache.dtype:
                got = None if t is None else (tuple(t.shape), t.dtype)
                raise ValueError(f"KV import: tensor {name!r} must be {want} {cache.dtype}, "
                                 f"got {got}")
            cache[:, rows] = t.to(cache.device)


def _block_rows(block_ids: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    """[len(block_ids) * S] long: the flat rows of these blocks, in order."""
    ids = torch.tensor(block_ids, dtype=torch.long, device=device)
    return (ids[:, None] * block_size + torch.arange(block_size, device=device)).reshape(-1)
