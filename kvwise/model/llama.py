"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) over a paged KV store.

forward(input_ids [T], positions [T], kv, meta, logits_indices [R]) -> logits [R, V].
The step's tokens of all requests form one flat batch; attention is the only place where
requests are told apart, through `meta` (see kvwise.attention.backend).

Invariants:
- Q/K/V and gate/up projections are fused into one matmul each (weights concatenated at load).
- Logits are computed only for `logits_indices` (the last token of each request that samples,
  and the prompt positions of a request that asks for prompt logprobs).
- The model holds no per-request state; the KV store and metadata arrive as arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from kvwise.attention.backend import AttentionBackend, AttentionMetadata
from kvwise.cache.kv_store import KVStore
from kvwise.model import cpu_ops
from kvwise.model.config import ModelConfig
from kvwise.model.fused_decode import FusedDecode
from kvwise.model.linear import DenseLinear
from kvwise.model.rope import apply_rope, rope_tables

# Steps up to this many tokens write rotated k and v straight into the cache from the rope
# kernel: 64-row decode steps save the index_copy (~0.12 ms per layer). Measured slower for
# 1024-token prefill (fp32 prefill@1024: 585-601 vs 613-628 tok/s), which keeps rope + index_copy.
ROPE_INTO_CACHE_MAX_TOKENS = 256


@dataclass
class StepState:
    """What flows between the layers of one step (LlamaModel.embed_step / layer_step)."""

    x: torch.Tensor  # [T, E] residual stream
    positions: torch.Tensor  # [T] long
    tables: Optional[tuple[torch.Tensor, torch.Tensor]]  # cos, sin [T, D]; None: CPU kernels


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        self.q_size, self.kv_size = h * d, k * d
        self.input_norm = nn.Parameter(torch.ones(e), requires_grad=False)
        self.post_norm = nn.Parameter(torch.ones(e), requires_grad=False)
        self.qkv = DenseLinear(e, (h + 2 * k) * d, bias=cfg.attention_bias)
        self.o_proj = DenseLinear(h * d, e)
        self.gate_up = DenseLinear(e, 2 * cfg.intermediate_size)
        self.down = DenseLinear(cfg.intermediate_size, e)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size), requires_grad=False)
        # The LM head is its own transposed copy even when tied: a batch-1 head GEMV over the
        # [V, E] embedding runs at half the bandwidth of x @ [E, V] (10.4 vs 5.2 ms on SmolLM2).
        self.lm_head = DenseLinear(cfg.hidden_size, cfg.vocab_size)
        self.max_positions = max_positions
        self.scale = cfg.head_dim ** -0.5
        self.requires_grad_(False)
        self.cos: torch.Tensor = torch.empty(0)
        self.sin: torch.Tensor = torch.empty(0)
        self._fused: Optional[FusedDecode] = None
        self.num_threads = torch.get_num_threads()  # the engine sets its own (set_num_threads)
        self.batch_invariant = False  # see set_batch_invariant

    def set_batch_invariant(self, on: bool) -> None:
        """Batch-invariant mode (docs/architecture.md, "Batch-invariant mode"): every projection,
        the LM head and SiLU compute each row independently of how many rows the step has.
        Projections already invariant for T <= SMALL_BATCH_MAX (the fused kernels) keep those
        kernels for any T."""
        self.batch_invariant = on
        for module in self.modules():
            if isinstance(module, DenseLinear):
                module.row_invariant = on
            elif hasattr(module, "workspace"):  # quantized projections (kvwise.model.quant)
                module.workspace.row_invariant = on

    def enable_fused_decode(self) -> bool:
        """Run qualifying decode steps as one numba call (fused_decode.py); call once the weights
        are loaded. -> whether this model qualifies (CPU, fp32, int4 or int8 projections)."""
        self._fused = FusedDecode.build(self)
        return self._fused is not None

    def build_rope(self) -> None:
        """(Re)build rope tables on the weights' device and dtype; call after `.to()`."""
        w = self.embed.weight
        self.cos, self.sin = rope_tables(self.cfg.head_dim, self.cfg.rope_theta,
                                         self.cfg.rope_scaling, self.max_positions,
                                         w.dtype, w.device)  # [P, D] each

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # one numba call on CPU fp32 instead of F.rms_norm's ~10 aten ops (~30 us at batch 1)
        return cpu_ops.rms_norm(x, w, self.cfg.rms_norm_eps)

    def _rope(self, qkv: torch.Tensor, positions: torch.Tensor,
              tables: Optional[tuple[torch.Tensor, torch.Tensor]], layer: nn.Module
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> q [T, H, D], k [T, K, D] rotated, v [T, K, D]. `tables` = cos, sin gathered at
        `positions` for the torch path; None for the CPU kernel (the fused decode step runs the
        same kernel)."""
        cfg = self.cfg
        t = qkv.shape[0]
        if tables is None:
            return cpu_ops.rope_qkv(qkv, positions, self.cos, self.sin, cfg.num_heads,
                                    cfg.num_kv_heads, cfg.head_dim)
        cos, sin = tables
        qk_size = layer.q_size + layer.kv_size
        # one rope call for q and k together: half the small-op overhead at batch 1
        qk = apply_rope(qkv[:, :qk_size].view(t, -1, cfg.head_dim), cos, sin)  # [T, H+K, D]
        q, k = qk.split([cfg.num_heads, cfg.num_kv_heads], dim=1)  # [T, H, D], [T, K, D]
        return q, k, qkv[:, qk_size:].view(t, cfg.num_kv_heads, cfg.head_dim)

    def _rope_store(self, i: int, qkv: torch.Tensor, positions: torch.Tensor,
                    tables: Optional[tuple[torch.Tensor, torch.Tensor]], layer: nn.Module,
                    kv: KVStore, meta: AttentionMetadata
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Rotate q and k, store k and v of layer i at the step's slots through the format;
        -> q [T, H, D] and the step's k, v [T, K, D] as stored (None, None when the rope kernel
        wrote them straight into a dense cache: reading them back is exact)."""
        t = qkv.shape[0]
        if meta.slot_mapping_heads is not None:  # per-head rows (many-group requests)
            if kv.pre_rope:
                raise NotImplementedError(f"kv_cache_dtype {kv.name!r}: per-head KV groups "
                                          "are not supported with this format")
            q, k, v = self._rope(qkv, positions, tables, layer)
            k, v = kv.write_heads(i, meta.slot_mapping_heads, k, v)
            return q, k, v
        kern = kv.kernel_layer(i)
        if (tables is None and t <= ROPE_INTO_CACHE_MAX_TOKENS and kern is not None
                and kern.k.dtype != np.int8 and cpu_ops.supported(qkv)):
            # the rope kernel writes k and v straight into their dense cache rows (no copy)
            q = torch.empty(t, self.cfg.num_heads, self.cfg.head_dim)
            cpu_ops.rope_split(qkv.numpy(), positions.numpy(), self.cos.numpy(), self.sin.numpy(),
                               self.cfg.num_heads, q.numpy(), kern.k, kern.v,
                               meta.slot_mapping.numpy())
            return q, None, None
        if kv.pre_rope:  # the format keeps keys before RoPE and rotates them on read
            q = self._rope_queries(qkv, positions, tables)  # [T, H, D]
            qk_size = layer.q_size + layer.kv_size
            shape = (t, self.cfg.num_kv_heads, self.cfg.head_dim)
            k, v = qkv[:, layer.q_size:qk_size].reshape(shape), qkv[:, qk_size:].reshape(shape)
            k, v = kv.write(i, meta.slot_mapping, k, v, positions)  # k rotated, as read back
            return q, k, v
        q, k, v = self._rope(qkv, positions, tables, layer)  # [T, H, D], [T, K, D] x 2
        k, v = kv.write(i, meta.slot_mapping, k, v)  # as a reader of the store will see them
        return q, k, v

    def _rope_queries(self, qkv: torch.Tensor, positions: torch.Tensor,
                      tables: Optional[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """-> q [T, H, D] rotated (for formats that rotate keys themselves)."""
        t, d = qkv.shape[0], self.cfg.head_dim
        q = qkv[:, :self.cfg.num_heads * d].reshape(t, self.cfg.num_heads, d)
        cos, sin = tables if tables is not None else (self.cos[positions], self.sin[positions])
        return apply_rope(q, cos, sin)

    def set_num_threads(self, n: int) -> None:
        """The engine's torch thread count, applied by every per-op step (`release_threads`)."""
        self.num_threads = n

    def release_threads(self) -> None:
        """Give torch back the engine's thread count (the fused decode step runs it on one, and
        another engine in the process may have set its own)."""
        if torch.get_num_threads() != self.num_threads:
            torch.set_num_threads(self.num_threads)

    # -- the step, layer by layer (a runner may drive these itself, e.g. to overlap loads) ----

    def embed_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> StepState:
        """Start a step: input_ids, positions [T] -> the residual stream x [T, E] and the RoPE
        tables the layers share."""
        kernels = input_ids.device.type == "cpu" and self.cos.dtype == torch.float32
        tables = None if kernels else (self.cos[positions], self.sin[positions])  # [T, D] each
        return StepState(self.embed(input_ids), positions, tables)  # x [T, E]

    def layer_step(self, i: int, state: StepState, kv: KVStore, meta: AttentionMetadata,
                   backend: AttentionBackend) -> None:
        """Run decoder layer i on the step (state.x [T, E] updated in place of the state)."""
        layer = self.layers[i]
        meta = meta.for_layer(i)
        x = state.x
        t = x.shape[0]
        h = self._rms(x, layer.input_norm)  # [T, E]
        qkv = layer.qkv(h)  # [T, (H+2K)D]
        q, k, v = self._rope_store(i, qkv, state.positions, state.tables, layer, kv, meta)
        attn = backend.forward(q, k, v, kv.layer(i), meta, self.scale)  # [T, H, D]
        if meta.observer is not None:  # e.g. FastGen reading the prompt's attention
            meta.observer(i, q, k, v, kv.layer(i), meta, self.scale)
        x = x + layer.o_proj(attn.reshape(t, -1))  # [T, E]
        h = self._rms(x, layer.post_norm)
        gu = layer.gate_up(h)  # [T, 2I]
        state.x = x + layer.down(cpu_ops.silu_mul(gu, self.batch_invariant))  # silu(gate)*up

    def head_step(self, state: StepState, logits_indices: torch.Tensor) -> torch.Tensor:
        """Finish a step: -> logits [R, V] fp32 of the rows `logits_indices` [R]."""
        x = self._rms(state.x[logits_indices], self.norm)  # [R, E]
        return self.lm_head(x).float()  # [R, V]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVStore,
                meta: AttentionMetadata, backend: AttentionBackend,
                logits_indices: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[0]
        fused = self._fused
        if fused is not None and fused.applies(meta, backend.name, kv, t, logits_indices.shape[0]):
            return fused(input_ids, positions, kv, meta)  # same kernels, one call
        self.release_threads()
        state = self.embed_step(input_ids, positions)
        for i in range(len(self.layers)):
            self.layer_step(i, state, kv, meta, backend)
        return self.head_step(state, logits_indices)

    def load_hf_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HF-named weights in, fusing q/k/v and gate/up. Consumes `weights`."""
        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"missing weight {name}")
            return weights.pop(name)

        self.embed.weight.copy_(take("model.embed_tokens.weight"))
        self.norm.copy_(take("model.norm.weight"))
        if self.cfg.tie_word_embeddings:
            self.lm_head.load(self.embed.weight)
        else:
            self.lm_head.load(take("lm_head.weight"))
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            layer.input_norm.copy_(take(p + "input_layernorm.weight"))
            layer.post_norm.copy_(take(p + "post_attention_layernorm.weight"))
            for attr, names in projection_weight_names(i).items():
                bias_names = projection_bias_names(self.cfg, i).get(attr)
                bias = torch.cat([take(n) for n in bias_names]) if bias_names else None
                getattr(layer, attr).load(torch.cat([take(n) for n in names]), bias)


def projection_weight_names(layer: int) -> dict[str, list[str]]:
    """HF weights fused (concatenated along rows, in this order) into each projection of a layer."""
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    return {
        "qkv": [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
        "o_proj": [a + "o_proj.weight"],
        "gate_up": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "down": [p + "mlp.down_proj.weight"],
    }


def projection_bias_names(cfg: ModelConfig, layer: int) -> dict[str, list[str]]:
    """HF biases of the projections that have one (Qwen2: q/k/v)."""
    if not cfg.attention_bias:
        return {}
    return {"qkv": [n.replace(".weight", ".bias") for n in projection_weight_names(layer)["qkv"]]}
