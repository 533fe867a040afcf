"""`--kv-cache-dtype int8`: K and V as symmetric int8 codes, an fp16 scale per token and KV head.

The per-token-head scheme that vLLM and LMDeploy ship (scheme and both implementations in
kvwise.kernels.cpu.kv_rows). A token's head of 64 values takes 64 + 2 bytes instead of 256 in
fp32 (0.26x) or 128 in fp16. Keys are quantized after RoPE. The CPU decode kernel and the fused
decode step read the codes in place (the score of a position is its dot product with the codes
times the key scale; the value scale is folded into the softmax weight), so there is no dense
copy of the cache; the PyTorch backends and the reference read dequantized rows
(`gather_blocks`). Prefix-shared chunks are stored once, in int8, and every sharer reads the
same codes.

Invariants:
- `k`, `v` [L, N*S, K, D] int8 and `k_scale`, `v_scale` [L, N*S, K] float16, zero at start.
- Codes and scales do not depend on the path that wrote them (numba for small steps, PyTorch
  for large ones: bit-identical, tested), and `write` returns the dequantized stored values, so
  a request's tokens do not depend on whether its context came from a prefix-cache hit.
"""

from __future__ import annotations

from typing import Optional

import torch

from kvwise.cache.kv_store import KVStore, ModelShape, register_format
from kvwise.kernels.cpu import kv_rows

# Steps up to this many tokens quantize with the numba kernel (no per-op dispatch); larger ones
# with vectorized PyTorch ops. The two give identical codes.
KERNEL_WRITE_MAX_TOKENS = 64


class Int8KV(KVStore):
    name = "int8"

    def __init__(self, shape: ModelShape, num_blocks: int, block_size: int,
                 compute_dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(shape, num_blocks, block_size, compute_dtype, device)
        rows = self._rows_shape()
        dims = (*rows, shape.num_kv_heads, shape.head_dim)
        self.k = torch.zeros(dims, dtype=torch.int8, device=device)  # [L, N*S, K, D] int8
        self.v = torch.zeros(dims, dtype=torch.int8, device=device)  # [L, N*S, K, D] int8
        self.k_scale = torch.zeros((*rows, shape.num_kv_heads), dtype=torch.float16,
                                   device=device)  # [L, N*S, K] fp16
        self.v_scale = torch.zeros_like(self.k_scale)  # [L, N*S, K] fp16
        if device.type == "cpu":
            self._enable_kernels(self.k, self.v, self.k_scale, self.v_scale)

    @classmethod
    def token_head_bytes(cls, head_dim: int) -> int:
        return 2 * (head_dim + 2)  # K and V: D int8 codes + one fp16 scale each

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[0]
        kern = self.kernel_layer(layer)
        if kern is not None and t <= KERNEL_WRITE_MAX_TOKENS and k.dtype == torch.float32:
            rows = slots.numpy()
            kv_rows.quantize_rows(k.contiguous().numpy(), rows, kern.k, kern.k_scale)
            kv_rows.quantize_rows(v.contiguous().numpy(), rows, kern.v, kern.v_scale)
            return self.gather_rows(layer, slots)
        kc, ks = kv_rows.quantize_int8_reference(k)  # [T, K, D] int8, [T, K] fp16
        vc, vs = kv_rows.quantize_int8_reference(v)
        self.k[layer].index_copy_(0, slots, kc)
        self.v[layer].index_copy_(0, slots, vc)
        self.k_scale[layer].index_copy_(0, slots, ks)
        self.v_scale[layer].index_copy_(0, slots, vs)
        c = self.compute_dtype
        return (kv_rows.dequantize_int8_reference(kc, ks, c),
                kv_rows.dequantize_int8_reference(vc, vs, c))

    def write_heads(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        kc, ks = kv_rows.quantize_int8_reference(k)  # [T, K, D] int8, [T, K] fp16
        vc, vs = kv_rows.quantize_int8_reference(v)
        heads = torch.arange(self.num_kv_heads, device=slots.device).expand_as(slots)
        self.k[layer][slots, heads] = kc
        self.v[layer][slots, heads] = vc
        self.k_scale[layer][slots, heads] = ks
        self.v_scale[layer][slots, heads] = vs
        c = self.compute_dtype
        return (kv_rows.dequantize_int8_reference(kc, ks, c),
                kv_rows.dequantize_int8_reference(vc, vs, c))

    def gather_rows(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.compute_dtype
        k = kv_rows.dequantize_int8_reference(self.k[layer][rows], self.k_scale[layer][rows], c)
        v = kv_rows.dequantize_int8_reference(self.v[layer][rows], self.v_scale[layer][rows], c)
        return k, v  # [R, K, D] each

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "v": self.v, "k_scale": self.k_scale, "v_scale": self.v_scale}


register_format(Int8KV.name, Int8KV)
