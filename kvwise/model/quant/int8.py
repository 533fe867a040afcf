"""Int8Linear: weight-only int8, one symmetric scale per output row.

w[n, k] = qweight[n, k] * scale[n]; 1 byte per weight + 4 bytes per row (4x less than fp32).
Same interface as DenseLinear: forward(x [..., in]) -> [..., out] in x's dtype.

Invariants:
- `qweight` int8 [out, in] row-major (each output is a contiguous dot product), `scale` fp32
  [out], `bias` fp32 [out] or None; all buffers (moved by `.to(device)`, not trainable).
- CPU with in % 32 == 0 runs kernels.int8_matmul / int8_dequant; anything else the reference.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from kvwise.model.quant import kernels, reference
from kvwise.model.quant.convert import Int8Weight
from kvwise.model.quant.dispatch import SMALL_BATCH_MAX, Workspace, dequant_matmul


class Int8Linear(nn.Module):
    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.register_buffer("qweight", weight.q.contiguous())  # [N, K] int8
        self.register_buffer("scale", weight.scale.float().contiguous())  # [N]
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.workspace = workspace or Workspace()
        self._arrays_key = -1
        self._arrays: tuple[np.ndarray, ...] = ()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def _numpy(self) -> tuple[np.ndarray, ...]:
        """Numpy views of the buffers for the kernels, rebuilt if a buffer was replaced."""
        key = self.qweight.data_ptr()
        if key != self._arrays_key:
            bias = self.bias if self.bias is not None else torch.empty(0)
            self._arrays = (self.qweight.numpy(), self.scale.numpy(), bias.numpy())
            self._arrays_key = key
        return self._arrays

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.in_features % 32:
            return reference.int8_linear(x, self.qweight, self.scale, self.bias)
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # [T, K]
        kernels.set_num_threads(self.workspace.num_threads)
        q, scale, bias = self._numpy()
        if x2.shape[0] <= SMALL_BATCH_MAX:
            out = torch.empty(x2.shape[0], self.out_features)
            kernels.int8_matmul(x2.numpy(), q, scale, bias, out.numpy())
        else:
            out = dequant_matmul(x2, self.out_features,
                                 lambda row0, buf: kernels.int8_dequant(q, scale, row0, buf),
                                 self.bias, self.workspace)
        return out.view(*x.shape[:-1], self.out_features).to(x.dtype)
