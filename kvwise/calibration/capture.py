"""Calibration activations for KVQuant: each layer's pre-RoPE keys and values, and their Fisher.

KVQuant (Hooper et al. 2024, §3.3; the `gradients` step of its code) fits per-layer datatypes
on the k and v projection outputs of a few samples of text, weighting each element by its
diagonal Fisher information F = (dL/da)^2, L the sample's mean next-token NLL. The engine's
forward runs numba kernels under inference_mode, which have no autograd, so this module has its
own pure-PyTorch forward of the Llama decoder (`decoder_forward`) over the same weight tensors;
tests/unit/calibration/test_capture.py checks its logits against the engine's.

Invariants:
- `decoder_forward` computes `LlamaModel.forward` for one sequence at positions 0..T-1 (SmolLM2
  fp32: logits within ~1e-4 of the engine's); it reads the model's weights, never writes them.
- A Fisher value is the squared gradient through every path, later layers' k and v included: the
  gradient is taken w.r.t. a zero offset added to each layer's k and v, nothing is detached.
- Sample windows are a pure function of (num_tokens, num_samples, context_len, seed)
  (`sample_offsets`), disjoint whenever num_samples * context_len <= num_tokens.
- One sample's autograd graph is freed before the next sample runs; the captured tensors are
  float32 on CPU, sample-major ([num_samples, context_len, K, D], see LayerActivations).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from kvwise.cache.kvquant.calibration import LayerActivations
from kvwise.errors import ConfigError, InvalidRequestError
from kvwise.model.linear import DenseLinear
from kvwise.model.llama import LlamaModel
from kvwise.model.rope import apply_rope

logger = logging.getLogger(__name__)

# (layer index, pre-RoPE k [T, K, D], v [T, K, D]) -> the k, v the layer continues with
KVHook = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def check_capturable(model: LlamaModel) -> None:
    """Raise ConfigError unless every projection and the LM head are dense (fp32 weights)."""
    dense = [model.lm_head] + [getattr(layer, attr) for layer in model.layers
                               for attr in ("qkv", "o_proj", "gate_up", "down")]
    if not all(isinstance(m, DenseLinear) for m in dense):
        raise ConfigError("weight_dtype: calibration needs dense projections (load the model "
                          "with weight_dtype='fp32')", "weight_dtype")


def _dense(layer: DenseLinear, x: torch.Tensor) -> torch.Tensor:
    y = x @ layer.weight_t  # weight_t is [in, out]: [T, in] -> [T, out]
    return y if layer.bias is None else y + layer.bias


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """q [T, H, D], k and v [T, K, D] (rotated k) -> [T, H, D]; query head h reads KV head
    h // (H / K), as the engine's backends do. 4-D inputs let SDPA pick its fused CPU kernel,
    whose backward keeps no [H, T, T] probabilities."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                         enable_gqa=True)  # [1, H, T, D]
    return out[0].transpose(0, 1)  # [T, H, D]


def decoder_forward(model: LlamaModel, input_ids: torch.Tensor,
                    kv_hook: Optional[KVHook] = None) -> torch.Tensor:
    """input_ids [T] at positions 0..T-1 -> logits [T, V] in the weights' dtype, differentiable.
    `kv_hook(i, k, v)` sees layer i's pre-RoPE k (the k projection's output, bias included) and
    v [T, K, D] and returns the k and v the layer goes on with."""
    cfg = model.cfg
    t, h_count, k_count, d = input_ids.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    positions = torch.arange(t, device=input_ids.device)
    cos, sin = model.cos[positions], model.sin[positions]  # [T, D] each
    x = F.embedding(input_ids, model.embed.weight)  # [T, E]
    e = (x.shape[-1],)
    for i, layer in enumerate(model.layers):
        h = F.rms_norm(x, e, layer.input_norm, eps)  # [T, E]
        qkv = _dense(layer.qkv, h)  # [T, (H+2K)D]
        q, k, v = qkv.split([layer.q_size, layer.kv_size, layer.kv_size], dim=1)
        k, v = k.view(t, k_count, d), v.view(t, k_count, d)  # [T, K, D] each
        if kv_hook is not None:
            k, v = kv_hook(i, k, v)
        q = apply_rope(q.view(t, h_count, d), cos, sin)  # [T, H, D]
        attn = _causal_attention(q, apply_rope(k, cos, sin), v, model.scale)  # [T, H, D]
        x = x + _dense(layer.o_proj, attn.reshape(t, h_count * d))  # [T, E]
        h = F.rms_norm(x, e, layer.post_norm, eps)
        gate, up = _dense(layer.gate_up, h).chunk(2, dim=-1)  # [T, I] each
        x = x + _dense(layer.down, F.silu(gate) * up)  # [T, E]
    return _dense(model.lm_head, F.rms_norm(x, e, model.norm, eps))  # [T, V]


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL of the T-1 next-token predictions: logits [T, V], input_ids [T] -> scalar."""
    return F.cross_entropy(logits[:-1], input_ids[1:])


def sample_offsets(num_tokens: int, num_samples: int, context_len: int, seed: int) -> list[int]:
    """Start offsets of `num_samples` windows of `context_len` tokens in a text of `num_tokens`,
    drawn with numpy.random.default_rng(seed): disjoint and in increasing order when the text
    holds them all, else independent draws (overlapping; a warning is logged)."""
    if num_samples < 1:
        raise InvalidRequestError(f"num_samples must be >= 1, got {num_samples}", "num_samples")
    if context_len < 2:
        raise InvalidRequestError(f"context_len must be >= 2, got {context_len}", "context_len")
    if num_tokens < context_len:
        raise InvalidRequestError(f"text has {num_tokens} tokens, fewer than one sample of "
                                  f"context_len={context_len}", "context_len")
    rng = np.random.default_rng(seed)
    slack = num_tokens - num_samples * context_len
    if slack >= 0:
        # stars and bars: sorted gaps g_0 <= ... <= g_{S-1} in [0, slack] put window s at
        # g_s + s * context_len, so window s ends at or before window s + 1 starts
        gaps = np.sort(rng.integers(0, slack + 1, size=num_samples))
        return [int(g) + s * context_len for s, g in enumerate(gaps)]
    logger.warning("text has %d tokens, fewer than %d samples x %d: the windows overlap",
                   num_tokens, num_samples, context_len)
    return [int(o) for o in rng.integers(0, num_tokens - context_len + 1, size=num_samples)]


def capture_kv_activations(model: LlamaModel, token_ids: list[int], num_samples: int,
                           context_len: int, seed: int, progress: bool = True
                           ) -> list[LayerActivations]:
    """Run `num_samples` windows of `token_ids` (see `sample_offsets`) through
    `decoder_forward` -> per layer the pre-RoPE k, v and their Fisher (squared gradient of the
    window's mean next-token NLL), [num_samples, context_len, K, D] float32 on CPU each."""
    check_capturable(model)
    if context_len > model.max_positions:
        raise InvalidRequestError(f"context_len {context_len} exceeds the model's "
                                  f"{model.max_positions} positions", "context_len")
    offsets = sample_offsets(len(token_ids), num_samples, context_len, seed)
    cfg = model.cfg
    shape = (num_samples, context_len, cfg.num_kv_heads, cfg.head_dim)
    layers = [LayerActivations(torch.empty(shape), torch.empty(shape), torch.empty(shape),
                               torch.empty(shape)) for _ in range(cfg.num_layers)]
    ids = torch.tensor(token_ids, dtype=torch.long)  # [N]
    device = model.embed.weight.device
    for s, offset in enumerate(tqdm(offsets, desc="calibration samples", unit="sample",
                                    disable=not progress)):
        _capture_sample(model, ids[offset:offset + context_len].to(device), layers, s)
    return layers


def _capture_sample(model: LlamaModel, input_ids: torch.Tensor, layers: list[LayerActivations],
                    s: int) -> None:
    """Fill sample s of every layer's k, v, k_fisher, v_fisher from one forward + backward."""
    probes: list[torch.Tensor] = []  # zero offsets dk_0, dv_0, dk_1, ...: d loss / d probe

    def hook(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layers[i].k[s].copy_(k.detach())  # [C, K, D]
        layers[i].v[s].copy_(v.detach())
        dk = torch.zeros_like(k, requires_grad=True)
        dv = torch.zeros_like(v, requires_grad=True)
        probes.extend((dk, dv))
        return k + dk, v + dv

    with torch.inference_mode(False), torch.enable_grad():
        loss = next_token_nll(decoder_forward(model, input_ids, hook), input_ids)
        grads = torch.autograd.grad(loss, probes)  # frees the graph
    for i, layer in enumerate(layers):
        layer.k_fisher[s].copy_(grads[2 * i].float().square())  # [C, K, D]
        layer.v_fisher[s].copy_(grads[2 * i + 1].float().square())
