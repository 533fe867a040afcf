"""Weight-only quantization of the decoder's projections (and LM head), chosen by name.

`--weight-dtype fp32 | int8 | int4` (EngineConfig.weight_dtype):
- fp32: DenseLinear (kvwise.model.linear), the default; parity with HF holds only here.
- int8: Int8Linear, symmetric per output row.
- int4: Int4Linear, asymmetric per group (32 from GGUF Q4_0/Q4_1 blocks, else 64).

A quantized layer has DenseLinear's interface (forward(x [T, in]) -> [T, out], in_features,
out_features, optional bias) and is built from "parts" (HF [out, in] float tensors or GGUF raw
blocks) that are fused along rows, like q|k|v and gate|up in LlamaModel.

Invariants:
- The registry `WEIGHT_DTYPES` is the single list of names; `make_linear` is the only factory.
- Embedding tables are not quantized (a gather, not a matmul); the LM head is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvwise.config import WEIGHT_DTYPES
from kvwise.model.quant.convert import DEFAULT_GROUP_SIZE, Part, int4_group_size, to_int4, to_int8
from kvwise.model.quant.dispatch import Workspace
from kvwise.model.quant.int4 import Int4Linear
from kvwise.model.quant.int8 import Int8Linear


def make_linear(weight_dtype: str, parts: list[Part], bias: Optional[torch.Tensor] = None,
                workspace: Optional[Workspace] = None,
                group_size: int = DEFAULT_GROUP_SIZE) -> nn.Module:
    """A quantized projection whose weight is `parts` concatenated along rows."""
    if weight_dtype == "int8":
        return Int8Linear(to_int8(parts), bias, workspace)
    if weight_dtype == "int4":
        return Int4Linear(to_int4(parts, int4_group_size(parts, group_size)), bias, workspace)
    raise ValueError(f"weight_dtype {weight_dtype!r} is not a quantized format "
                     f"(one of {WEIGHT_DTYPES[1:]})")


def warmup() -> None:
    """JIT-compile (or load from cache) the CPU kernels; call at engine start."""
    from kvwise.model.quant import kernels

    kernels.warmup()


__all__ = ["WEIGHT_DTYPES", "Int4Linear", "Int8Linear", "Workspace", "make_linear", "warmup"]
