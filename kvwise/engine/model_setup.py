"""Build the runnable model from an EngineConfig: load weights, fuse, place, build RoPE tables.

With `weight_dtype` / `lm_head_dtype` int8 or int4 the projections and the LM head are built
quantized straight from the source (GGUF raw blocks where the format allows, else one dequantized
tensor at a time), so no fp32 copy of the model is made; embedding, norms and RoPE stay in `dtype`.

`weight_dtype="auto"` (the default) keeps a GGUF's own blocks, as llama.cpp runs a file's own
quantization: when every decoder projection is stored in one block type that a kvwise format holds
bit-exactly (`LOSSLESS_FORMATS`: Q4_0/Q4_1 -> int4, Q8_0 -> int8, see kvwise.model.quant.convert)
the projections use that format, else fp32 (F16/F32/BF16 files, K-quants, mixed files and HF
directories: dequantized, which is exact). The LM head then follows `quant.lm_head_dtype`.

Invariants:
- The module is created on the meta device and materialised once on the target device, so no
  random initialisation or second full copy of the weights is made (quantized projections are
  detached before materialising and attached already built).
- The numba kernels (quantized matmuls, cpu_ops) are compiled or loaded from numba's cache here,
  never inside a timed step (the paged backend warms its decode kernel when it is created).
- `auto` is resolved here, once, into `model.weight_formats` (a runtime value the engine reports
  as `weight_dtype_resolved`); the frozen EngineConfig keeps "auto".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kvwise.config import EngineConfig
from kvwise.errors import ConfigError
from kvwise.model import cpu_ops
from kvwise.model.config import ModelConfig
from kvwise.model.gguf_reader import gguf_to_hf_name
from kvwise.model.llama import LlamaModel, projection_bias_names, projection_weight_names
from kvwise.model.loader import load_model
from kvwise.model.tokenizer import Tokenizer

_PROJECTIONS = ("qkv", "o_proj", "gate_up", "down")
_EMBED = "model.embed_tokens.weight"
# GGUF block types that a kvwise weight format holds bit-exactly (quant.convert's GGUF fast paths)
LOSSLESS_FORMATS = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


@dataclass(frozen=True)
class WeightFormats:
    """The formats a model's weights were built in (`auto` resolved)."""

    projections: str  # fp32 | int8 | int4
    lm_head: str  # fp32 | int8 | int4


def build_model(config: EngineConfig, dtype: torch.dtype, device: torch.device
                ) -> tuple[LlamaModel, Tokenizer, ModelConfig, str]:
    """Load and build the model; its resolved formats are `model.weight_formats`."""
    lazy = config.weight_dtype != "fp32" or config.lm_head_dtype not in (None, "fp32")
    loaded = load_model(config.model, dtype=dtype, tokenizer=config.tokenizer, lazy=lazy)
    mc = loaded.config
    formats = resolve_weight_formats(config, loaded.weights, mc)
    quantized = formats != WeightFormats("fp32", "fp32")
    max_positions = max(config.max_model_len or 0, mc.max_position_embeddings)
    with torch.device("meta"):
        model = LlamaModel(mc, max_positions)
    if quantized:
        for layer in model.layers:
            for attr in _PROJECTIONS:
                setattr(layer, attr, None)
        model.lm_head = None
    model = model.to_empty(device=device).to(dtype)
    if quantized:
        _load_quantized(model, loaded.weights, config, formats, device, dtype)
    else:
        model.load_hf_weights(loaded.weights)
    model.weight_formats = formats
    model.build_rope()
    model.eval()
    if device.type == "cpu":
        cpu_ops.warmup()
        model.enable_fused_decode()
        for module in model.modules():
            # quantized projections: large-T GEMMs in bf16 (unused in batch-invariant mode)
            if hasattr(module, "build_bf16") and not config.batch_invariant:
                module.build_bf16()
    return model, loaded.tokenizer, mc, loaded.source


def resolve_weight_formats(config: EngineConfig, weights: Mapping[str, Any],
                           mc: ModelConfig) -> WeightFormats:
    """The projections' and LM head's formats for `config` on these weights (`auto` resolved
    from the GGUF block types of the projections; see the module docstring)."""
    projections = config.weight_dtype
    if projections == "auto":
        projections = _lossless_format(weights, mc)
    if projections == "fp32" and config.lm_head_dtype in (None, "fp32"):
        formats = WeightFormats("fp32", "fp32")  # no numba import for an unquantized model
    else:
        from kvwise.model import quant

        formats = WeightFormats(projections, quant.lm_head_dtype(projections, config.lm_head_dtype))
    if config.activation_quant != "none" and "int4" not in (formats.projections, formats.lm_head):
        raise ConfigError(
            f"activation_quant: {config.activation_quant} applies to int4 layers, but "
            f"weight_dtype={config.weight_dtype!r} resolved to {formats.projections} for "
            f"{config.model!r} (set weight_dtype=int4)", "activation_quant")
    return formats


def _lossless_format(weights: Mapping[str, Any], mc: ModelConfig) -> str:
    """int4 / int8 when every decoder projection is stored in block types that format holds
    exactly, else fp32 (HF directories, float or K-quant GGUFs, mixed block types)."""
    reader = getattr(weights, "reader", None)  # a lazy GGUF; HF directories load dense tensors
    if reader is None:
        return "fp32"
    names = {n for i in range(mc.num_layers) for group in projection_weight_names(i).values()
             for n in group}
    kinds = {LOSSLESS_FORMATS.get(info.ggml_type.name, "fp32")
             for info in reader.tensor_infos.values() if gguf_to_hf_name(info.name) in names}
    return kinds.pop() if len(kinds) == 1 else "fp32"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all weights as stored (quantized codes and scales, fp32 embedding and norms)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _load_quantized(model: LlamaModel, weights: Mapping[str, Any], config: EngineConfig,
                    formats: WeightFormats, device: torch.device, dtype: torch.dtype) -> None:
    """Fill a model whose projections were detached: dense weights copied, projections and LM
    head built quantized. Consumes `weights` (a dict or a LazyGGUFWeights)."""
    from kvwise.model import quant  # numba is imported only when a quantized format is used

    workspace = quant.Workspace(config.threads, act_int8=config.activation_quant == "int8")
    head_dtype = formats.lm_head
    raw = getattr(weights, "raw", None)  # GGUF blocks when the source is a lazy GGUF

    def take(name: str) -> torch.Tensor:
        if name not in weights:
            raise KeyError(f"missing weight {name}")
        return weights.pop(name)  # type: ignore[attr-defined]

    def part(name: str) -> Any:
        return raw(name) if raw is not None else take(name)

    def build(names: list[str], bias: Optional[torch.Tensor] = None,
              weight_dtype: str = formats.projections) -> nn.Module:
        layer = quant.make_linear(weight_dtype, [part(n) for n in names], bias, workspace,
                                  dtype=dtype)
        return layer.to(device)

    cfg = model.cfg
    model.embed.weight.copy_(take(_EMBED))
    model.norm.copy_(take("model.norm.weight"))
    if cfg.tie_word_embeddings:
        head = raw(_EMBED) if raw is not None else model.embed.weight.float().cpu()
        model.lm_head = quant.make_linear(head_dtype, [head], None, workspace,
                                          dtype=dtype).to(device)
    else:
        model.lm_head = build(["lm_head.weight"], weight_dtype=head_dtype)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.input_norm.copy_(take(p + "input_layernorm.weight"))
        layer.post_norm.copy_(take(p + "post_attention_layernorm.weight"))
        biases = projection_bias_names(cfg, i)
        for attr, names in projection_weight_names(i).items():
            bias = torch.cat([take(n) for n in biases[attr]]) if attr in biases else None
            setattr(layer, attr, build(names, bias))
    if device.type == "cpu":
        quant.warmup()
