"""Projection layers of the decoder. Dense weights are stored transposed, [in, out].

Why transposed: on this class of CPU a batch-1 `x @ W_t` streams the weight row-major and reaches
~15 GB/s over the model, against ~11 GB/s for `F.linear(x, W)` with W [out, in] (measured on
2 AVX2 cores, PyTorch 2.13); for large batches both run at the same GFLOP/s.

Invariants:
- Every projection maps x [T, in] -> [T, out] through `forward`; quantized variants (weight-only
  int8/int4) implement the same interface and are swapped in by name (see kvwise.model.quant).
- `row_invariant` (batch-invariant mode, set by `LlamaModel.set_batch_invariant`): on CPU fp32
  each output row depends only on its input row (kvwise.kernels.cpu.dense_rows), for any T.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class DenseLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features), requires_grad=False)
        self.bias: Optional[nn.Parameter] = None
        self.row_invariant = False
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def load(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """weight [out, in] in nn.Linear / HF layout."""
        self.weight_t.copy_(weight.t())
        if self.bias is not None:
            assert bias is not None, "layer has a bias but none was given"
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_invariant and x.device.type == "cpu" and x.dtype == torch.float32:
            return self._row_invariant(x)
        y = x @ self.weight_t  # [T, out]
        return y if self.bias is None else y + self.bias

    def _row_invariant(self, x: torch.Tensor) -> torch.Tensor:
        from kvwise.kernels.cpu import dense_rows, runtime

        runtime.set_num_threads(torch.get_num_threads())  # the engine's (numba's is per thread)
        x2 = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(x2.shape[0], self.out_features)
        bias = self.bias.detach() if self.bias is not None else torch.empty(0)
        dense_rows.matmul(x2.numpy(), self.weight_t.detach().numpy(), bias.numpy(), out.numpy())
        return out.view(*x.shape[:-1], self.out_features)
