"""Weight-only quantization of the decoder's projections (and LM head), chosen by name.

`--weight-dtype fp32 | int8 | int4` (EngineConfig.weight_dtype) sets the decoder projections,
`--lm-head-dtype` the LM head (default: see `lm_head_dtype`); the default `auto` is resolved to
one of these formats from the source's block types when the model loads (kvwise.engine.model_setup):
- fp32: DenseLinear (kvwise.model.linear); parity with HF holds only here.
- int8: Int8Linear, symmetric per output row (per 32 inputs from GGUF Q8_0/Q4_x blocks).
- int4: Int4Linear, asymmetric per group (32 from GGUF Q4_0/Q4_1 blocks, else 64).

A quantized layer has DenseLinear's interface (forward(x [T, in]) -> [T, out], in_features,
out_features, optional bias) and is built from "parts" (HF [out, in] float tensors or GGUF raw
blocks) that are fused along rows, like q|k|v and gate|up in LlamaModel.

Invariants:
- The registry `WEIGHT_FORMATS` is the single list of formats; `make_linear` is the only factory.
- Embedding tables are not quantized (a gather, not a matmul); the LM head is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvwise.config import WEIGHT_FORMATS
from kvwise.model.linear import DenseLinear
from kvwise.model.quant.convert import (
    DEFAULT_GROUP_SIZE,
    Part,
    dense,
    int4_group_size,
    int8_group_size,
    to_int4,
    to_int8,
)
from kvwise.model.quant.dispatch import Workspace
from kvwise.model.quant.int4 import Int4Linear
from kvwise.model.quant.int8 import Int8Linear


def lm_head_dtype(weight_dtype: str, override: Optional[str] = None) -> str:
    """The LM head's format: `override`, else `weight_dtype` except int4 -> int8.

    Why: the head (SmolLM2's tied embedding, stored Q8_0 in the GGUF) is the one matrix that
    4 bits hurt. Perplexity on pydoc topics (4 x 512) with exact Q4_1 projections: fp32 head
    15.259, int8 head 15.274 (+0.1%), int4 g32 15.983 (+4.7%), int4 g64 16.493 (+8.1%);
    least-squares refined scales lower the MSE but raise perplexity further. llama.cpp keeps
    output.weight at >= 6 bits in its 4-bit mixes for the same reason.
    """
    if override is not None:
        return override
    return "int8" if weight_dtype == "int4" else weight_dtype


def make_linear(weight_dtype: str, parts: list[Part], bias: Optional[torch.Tensor] = None,
                workspace: Optional[Workspace] = None, group_size: int = DEFAULT_GROUP_SIZE,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """A projection in `weight_dtype` whose weight is `parts` concatenated along rows; `dtype` is
    the storage of an unquantized (fp32 format) layer, e.g. bfloat16 with --dtype bfloat16."""
    if weight_dtype == "fp32":
        w = torch.cat([dense(p) for p in parts])  # [out, in]
        layer = DenseLinear(w.shape[1], w.shape[0], bias=bias is not None).requires_grad_(False)
        layer.load(w, bias)
        return layer.to(dtype)
    if weight_dtype == "int8":
        return Int8Linear(to_int8(parts, int8_group_size(parts)), bias, workspace)
    if weight_dtype == "int4":
        return Int4Linear(to_int4(parts, int4_group_size(parts, group_size)), bias, workspace)
    raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {WEIGHT_FORMATS}")


def warmup() -> None:
    """JIT-compile (or load from cache) the CPU kernels; call at engine start."""
    from kvwise.model.quant import kernels

    kernels.warmup()


__all__ = ["WEIGHT_FORMATS", "Int4Linear", "Int8Linear", "Workspace", "lm_head_dtype",
           "make_linear", "warmup"]
