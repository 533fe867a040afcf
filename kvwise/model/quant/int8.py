"""Int8Linear: weight-only int8, symmetric, one fp16 scale per output row or per group.

w[n, k] = qweight[n, k] * scale[n, k // gs]. The group size is a property of the layer: gs = in
(one scale per output row, "per channel") when quantized from a float checkpoint, 32 when built
from GGUF block-quantized tensors (Q8_0 blocks map exactly). 1 byte per weight + 2 bytes per
group: ~1.0 B/weight per row, 1.0625 at gs = 32 (fp32: 4). Same interface as DenseLinear:
forward(x [..., in]) -> [..., out] in x's dtype.

Invariants:
- `qweight` int8 [out, in] row-major (each output is a contiguous dot product), `scale` fp16
  [out, in/gs], `bias` fp32 [out] or None; all buffers (moved by `.to(device)`, not trainable).
- CPU with gs % 32 == 0 runs kernels.int8_matmul / int8_dequant; anything else the reference.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from kvwise.model.quant import kernels, reference
from kvwise.model.quant.convert import Int8Weight
from kvwise.model.quant.dispatch import (
    BF16_NATIVE,
    SMALL_BATCH_MAX,
    Workspace,
    bf16_matmul,
    dequant_matmul,
    restore_shape,
)


class Int8Linear(nn.Module):
    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.q.shape
        self.group_size = weight.group_size
        if self.group_size * weight.scale.shape[1] != self.in_features:
            raise ValueError(f"int8 scale {tuple(weight.scale.shape)} does not divide "
                             f"in_features={self.in_features}")
        self.register_buffer("qweight", weight.q.contiguous())  # [N, K] int8
        self.register_buffer("scale", weight.scale.half().contiguous())  # [N, G] fp16
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.workspace = workspace or Workspace()
        self._arrays: tuple[np.ndarray, ...] = ()
        self.weight_bf16: Optional[torch.Tensor] = None  # [N, K], see build_bf16
        self._refresh_arrays()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                f"group_size={self.group_size}")

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        super()._apply(fn, recurse)
        self._refresh_arrays()
        return self

    def _refresh_arrays(self) -> None:
        """Numpy views of the CPU buffers for the kernels (fp16 as uint16 bits); rebuilt whenever
        `.to()` / `._apply` may have replaced a buffer."""
        if self.qweight.device.type != "cpu":
            self._arrays = ()
            self.weight_bf16 = None
            return
        bias = self.bias if self.bias is not None else torch.empty(0)
        self._arrays = (self.qweight.numpy(), self.scale.numpy().view(np.uint16), bias.numpy())

    def build_bf16(self) -> bool:
        """Keep a bf16 copy of the dequantized weight for large-T GEMMs on a CPU with native bf16
        (dispatch.py). -> whether the copy exists."""
        if BF16_NATIVE and self.qweight.device.type == "cpu" and self.weight_bf16 is None:
            self.weight_bf16 = reference.dequantize_int8(self.qweight, self.scale).bfloat16()
        return self.weight_bf16 is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.group_size % 32:
            return reference.int8_linear(x, self.qweight, self.scale, self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        self.workspace.use_threads()
        q, scale, bias = self._arrays
        if x2.shape[0] <= SMALL_BATCH_MAX:
            out = torch.empty(x2.shape[0], self.out_features)
            kernels.int8_matmul(x2.numpy(), q, scale, bias, out.numpy())
        elif self.weight_bf16 is not None:
            out = bf16_matmul(x2, self.weight_bf16, self.bias)
        else:
            out = dequant_matmul(x2, self.out_features,
                                 lambda row0, buf: kernels.int8_dequant(q, scale, row0, buf),
                                 self.bias, self.workspace)
        return restore_shape(out, x)
