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

from typing import Optional

import numpy as np
import torch

from kvwise.model.quant import kernels, reference
from kvwise.model.quant.base import QuantLinear
from kvwise.model.quant.convert import Int8Weight
from kvwise.model.quant.dispatch import (
    SMALL_BATCH_MAX,
    Workspace,
    bf16_matmul,
    dequant_matmul,
    fused_rows,
    restore_shape,
)


class Int8Linear(QuantLinear):
    kind = "int8"

    def __init__(self, weight: Int8Weight, bias: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> None:
        n, k = weight.q.shape
        super().__init__(k, n, weight.group_size, workspace)
        if self.group_size * weight.scale.shape[1] != self.in_features:
            raise ValueError(f"int8 scale {tuple(weight.scale.shape)} does not divide "
                             f"in_features={self.in_features}")
        self.register_buffer("qweight", weight.q.contiguous())  # [N, K] int8
        self.register_buffer("scale", weight.scale.half().contiguous())  # [N, G] fp16
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self._refresh_arrays()

    def _cpu_arrays(self) -> tuple[np.ndarray, ...]:
        return self.qweight.numpy(), self.scale.numpy().view(np.uint16), self._bias_array()

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_int8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.group_size % 32:
            return reference.int8_linear(x, self.qweight, self.scale, self.bias)
        x2 = self._cpu_input(x)  # [T, K]
        q, scale, bias = self._arrays
        if x2.shape[0] <= SMALL_BATCH_MAX or self.workspace.row_invariant:
            out = fused_rows(x2, self.out_features,
                             lambda xc, oc: kernels.int8_matmul(xc, q, scale, bias, oc))
        elif self.weight_bf16 is not None:
            out = bf16_matmul(x2, self.weight_bf16, self.bias)
        else:
            out = dequant_matmul(x2, self.out_features,
                                 lambda row0, buf: kernels.int8_dequant(q, scale, row0, buf),
                                 self.bias, self.workspace)
        return restore_shape(out, x)
