"""QuantLinear: what Int8Linear and Int4Linear share — numpy views of their CPU buffers for the
kernels, the optional bf16 copy for large steps, the input reshaping of `forward`.

Invariants:
- `_arrays` (the kernels' numpy views) are rebuilt after every `.to()` / `_apply`, and dropped
  together with the bf16 copy when the layer leaves the CPU.
- A subclass defines `kind`, `_cpu_arrays()` (views of its buffers, fp16 as uint16 bits, bias as
  an empty array when absent) and `dequantize()` (the exact fp32 weight [N, K]).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from kvwise.model.quant.dispatch import BF16_NATIVE, Workspace, pack_bf16


class QuantLinear(nn.Module):
    kind = "?"

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 workspace: Optional[Workspace]) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.workspace = workspace or Workspace()
        self._arrays: tuple[np.ndarray, ...] = ()
        self.weight_bf16: Optional[torch.Tensor] = None  # [N, K], see build_bf16

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}, "
                f"group_size={self.group_size}")

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        super()._apply(fn, recurse)
        self._refresh_arrays()
        return self

    def _refresh_arrays(self) -> None:
        if self.qweight.device.type != "cpu":
            self._arrays = ()
            self.weight_bf16 = None
            return
        self._arrays = self._cpu_arrays()

    def _bias_array(self) -> np.ndarray:
        return (self.bias if self.bias is not None else torch.empty(0)).numpy()

    def _cpu_arrays(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def build_bf16(self) -> bool:
        """Keep a bf16 copy of the dequantized weight for large-T GEMMs on a CPU with native bf16
        (dispatch.py). -> whether the copy exists."""
        if BF16_NATIVE and self.qweight.device.type == "cpu" and self.weight_bf16 is None:
            self.weight_bf16 = pack_bf16(self.dequantize().bfloat16())
        return self.weight_bf16 is not None

    def _cpu_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> fp32 contiguous [T, K], with the kernels' thread count applied."""
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        self.workspace.use_threads()
        return x2
