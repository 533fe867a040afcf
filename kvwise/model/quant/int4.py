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

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from kvwise.model.quant import kernels, reference
from kvwise.model.quant.convert import Int4Weight
from kvwise.model.quant.dispatch import (
    BF16_NATIVE,
    SMALL_BATCH_MAX,
    Workspace,
    bf16_matmul,
    dequant_matmul,
    restore_shape,
)


class Int4Linear(nn.Module):
    def __init__(self, weight: Int4Weight, bias: Optional[torch.Tensor] = None,
                 workspace: Optional[Workspace] = None) -> None:
        super().__init__()
        self.out_features = weight.q.shape[0]
        self.in_features = weight.q.shape[1] * 2
        self.group_size = weight.group_size
        if self.group_size % reference.SUB_BLOCK or self.in_features % self.group_size:
            raise ValueError(f"int4 group size {self.group_size} must be a multiple of "
                             f"{reference.SUB_BLOCK} dividing in_features={self.in_features}")
        self.register_buffer("qweight", weight.q.contiguous())  # [N, K/2] uint8
        self.register_buffer("scale", weight.scale.half().contiguous())  # [N, G] fp16
        self.register_buffer("minv", weight.minv.half().contiguous())  # [N, G] fp16
        self.bias: Optional[torch.Tensor]
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.workspace = workspace or Workspace()
        self._arrays: tuple[np.ndarray, ...] = ()
        self.weight_bf16: Optional[torch.Tensor] = None  # [N, K], see build_bf16
        self._refresh_arrays()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}")

    def _apply(self, fn: Any, recurse: bool = True) -> Int4Linear:
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
        self._arrays = (self.qweight.numpy(), self.scale.numpy().view(np.uint16),
                        self.minv.numpy().view(np.uint16), bias.numpy())

    def build_bf16(self) -> bool:
        """Keep a bf16 copy of the dequantized weight for large-T GEMMs on a CPU with native bf16
        (dispatch.py). -> whether the copy exists."""
        if BF16_NATIVE and self.qweight.device.type == "cpu" and self.weight_bf16 is None:
            w = reference.dequantize_int4(self.qweight, self.scale, self.minv)  # [N, K] fp32
            self.weight_bf16 = w.bfloat16()
        return self.weight_bf16 is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return reference.int4_linear(x, self.qweight, self.scale, self.minv, self.bias)
        x2 = x.reshape(-1, self.in_features)  # [T, K]
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        self.workspace.use_threads()
        q, scale, minv, bias = self._arrays
        if x2.shape[0] <= SMALL_BATCH_MAX:
            out = torch.empty(x2.shape[0], self.out_features)
            kernels.int4_matmul(x2.numpy(), q, scale, minv, bias, out.numpy())
        elif self.weight_bf16 is not None:
            out = bf16_matmul(x2, self.weight_bf16, self.bias)
        else:
            out = dequant_matmul(
                x2, self.out_features,
                lambda row0, buf: kernels.int4_dequant(q, scale, minv, row0, buf),
                self.bias, self.workspace)
        return restore_shape(out, x)
