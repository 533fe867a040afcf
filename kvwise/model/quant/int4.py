"""Int4Linear: weight-only int4, asymmetric, one fp16 scale and minimum per group of inputs.

w[n, k] = q[n, k] * scale[n, k // gs] + minv[n, k // gs], q in 0..15 (FlexGen's group-wise
min/max quantization). 0.5 byte per weight + 4 bytes per group: 0.625 B/weight at gs = 32,
0.5625 at gs = 64 (fp32: 4).

The group size is a property of the layer: 32 when the layer was mapped straight from GGUF
Q4_0/Q4_1 blocks (exact, no re-quantization), `convert.DEFAULT_GROUP_SIZE` (64) when quantized
from a float checkpoint. Same interface as DenseLinear.

Invariants:
- `qweight` uint8 [out, in/2] in GGUF sub-block order (reference.pack_int4), `scale` and `minv`
  fp16 [out, in/gs], `bias` fp32 [out] or None; all buffers.
- gs % 32 == 0 and in % gs == 0 (checked at construction).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from kvwise.model.quant import kernels, reference
from kvwise.model.quant.base import QuantLinear
from kvwise.model.quant.convert import Int4Weight
from kvwise.model.quant.dispatch import (
    SMALL_BATCH_MAX,
    Workspace,
    bf16_matmul,
    dequant_matmul,
    fused_rows,
    restore_shape,
)


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, weight: Int4Weight, bias: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> None:
        super().__init__(weight.q.shape[1] * 2, weight.q.shape[0], weight.group_size, workspace)
        if self.group_size % reference.SUB_BLOCK or self.in_features % self.group_size:
            raise ValueError(f"int4 group size {self.group_size} must be a multiple of "
                             f"{reference.SUB_BLOCK} dividing in_features={self.in_features}")
        self.register_buffer("qweight", weight.q.contiguous())  # [N, K/2] uint8
        self.register_buffer("scale", weight.scale.half().contiguous())  # [N, G] fp16
        self.register_buffer("minv", weight.minv.half().contiguous())  # [N, G] fp16
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self._refresh_arrays()

    def _cpu_arrays(self) -> tuple[np.ndarray, ...]:
        return (self.qweight.numpy(), self.scale.numpy().view(np.uint16),
                self.minv.numpy().view(np.uint16), self._bias_array())

    def dequantize(self) -> torch.Tensor:
        return reference.dequantize_int4(self.qweight, self.scale, self.minv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return reference.int4_linear(x, self.qweight, self.scale, self.minv, self.bias)
        x2 = self._cpu_input(x)  # [T, K]
        q, scale, minv, bias = self._arrays
        if x2.shape[0] <= SMALL_BATCH_MAX or self.workspace.row_invariant:
            a8 = self.workspace.act_int8
            out = fused_rows(x2, self.out_features, lambda xc, oc: kernels.int4_matmul(
                xc, q, scale, minv, bias, oc, a8=a8))
        elif self.weight_bf16 is not None:
            out = bf16_matmul(x2, self.weight_bf16, self.bias)
        else:
            out = dequant_matmul(
                x2, self.out_features,
                lambda row0, buf: kernels.int4_dequant(q, scale, minv, row0, buf),
                self.bias, self.workspace)
        return restore_shape(out, x)
