"""A whole decode step of a quantized Llama model on CPU in one numba call.

At batch 1 a SmolLM2 decode step is ~5 ms of quantized matmuls behind ~8 ms of Python and
PyTorch dispatch: 30 layers x ~40 small ops (norm, rope, cache write, attention, residual adds,
silu, four projections). `FusedDecode` runs the same kernels (cpu_ops, quant.kernels,
attention.cpu_decode) from one compiled function, with every activation buffer preallocated.

The step is one parallel region: a team of `Workspace.num_threads` members (kernels/cpu/team.py)
walks 9 phases per layer (4 projections split in 32-row chunks, attention split by request / KV
head, 4 serial ones: rope + cache write, residual + norm, silu) with spin barriers between them. A
numba launch per projection woke a sleeping TBB worker each time, too late to share a 10-60 us
projection; as a team, 30 layers x 4 int4 projections (66 MB) went from 5.3 to 4.6 ms (fp32
activations), and the whole step at batch 1 from ~6.5 to ~4.9 ms with int8 activations.

When it runs (`FusedDecode.applies`): CPU, fp32 activations, a KV format the CPU kernels read
(fp32, fp16, int8), every decoder projection int4 or every one int8 (the LM head int4 or int8), the
paged attention backend, and a step whose tokens are all decode tokens, at most SMALL_BATCH_MAX of
them. Anything else goes through LlamaModel.forward.

Invariants:
- Bit-identical to LlamaModel.forward for the same step: the same kernels run in the same order
  on the same inputs (every output row is computed by one call of the same row-range kernel,
  whichever member runs it) (tests/unit/model/test_fused_decode.py checks exact equality), so greedy
  outputs do not depend on which path a step took.
- PyTorch runs single-threaded while fused steps run (`__call__` sets it;
  `LlamaModel.release_threads`, called on the other path and when the engine goes idle, restores
  the engine's count): torch's OpenMP workers spin after each parallel op and took the cores from
  the numba kernels (measured: a 7.5 ms step became 11.5 ms next to the sampler's two-thread
  reductions). The sampler's ops on one row of logits lose nothing on one thread.
- The kernels read the layers' own weight buffers (numpy views, no copy); `FusedDecode` is built
  after the model is materialised and never outlives it.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange
from numba.typed import List

from kvwise.attention import cpu_decode
from kvwise.attention.backend import AttentionMetadata
from kvwise.cache.kv_store import KVStore
from kvwise.kernels.cpu import runtime, team
from kvwise.model import cpu_ops
from kvwise.model.quant import kernels
from kvwise.model.quant.dispatch import SMALL_BATCH_MAX
from kvwise.model.quant.int4 import Int4Linear
from kvwise.model.quant.int8 import Int8Linear

_FASTMATH = set(runtime.EXACT_FASTMATH)


CHUNK_ROWS = 32  # output rows per claimed chunk of a projection (a few us of work)


@njit(fastmath=True, cache=True, nogil=True, error_model="numpy")
def _linear(sync, phase, member, members, x, w, is_int4, a8, out, scratch):
    """Phase `phase`: out [T, N] = x [T, K] @ W.T for one quantized layer w = (q, scale, minv,
    bias), CHUNK_ROWS rows per chunk; int8 codes arrive as uint8 bits (the kernels load them as
    signed bytes). a8: int4 with int8 activations. `scratch` = (xsum, codes, xq, dxp): this
    member's buffers (each member prepares the input itself: the same values, no extra phase)."""
    q, scale, minv, bias = w
    xsum, codes, xq, dxp = scratch
    n = scale.shape[0]
    chunks = (n + CHUNK_ROWS - 1) // CHUNK_ROWS
    c = team.claim(sync, phase, member, members, chunks)
    if c >= 0 and is_int4:
        kernels.int4_prepare(x, scale.shape[1], xsum, xq, dxp, a8)
    done = 0
    while c >= 0:
        r0 = c * CHUNK_ROWS
        r1 = min(n, r0 + CHUNK_ROWS)
        if is_int4:
            kernels.int4_rows(x, q, scale, minv, bias, out, xsum, codes, xq, dxp, a8, r0, r1)
        else:
            kernels.int8_rows(x, q, scale, bias, out, codes, r0, r1)
        done += 1
        c = team.claim(sync, phase, member, members, chunks)
    team.finish(sync, phase, members, done)
    team.wait(sync, phase, members, chunks)


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def _add(x, y):
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] = x[t, i] + y[t, i]


@njit(fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def _member(sync, member, members, tokens, positions, slots, block_ids, lens, block_size,
            attn_scale, eps, embed, cos, sin, norms_in, norms_post, norm_final, qkv_w, o_w, gu_w,
            down_w, head_w, dec_int4, head_int4, dec_a8, head_a8, k_cache, v_cache, k_scale,
            v_scale, kv_buf, num_heads, x, h, qkv, q, attn, tmp, gu, act, logits):
    """One team member's walk through the step's phases (team.py); every member runs this.
    k_cache, v_cache [L, N*S, K, D] and k_scale, v_scale [L, N*S, K] (int8 caches; [L, 0, 0]
    for dense ones) as `KVStore.kernel_all` gives them; kv_buf [2, T, K, D] fp32 scratch for
    the int8 write."""
    t_count = tokens.shape[0]
    num_layers = norms_in.shape[0]
    flat_attn = attn.reshape(t_count, attn.shape[1] * attn.shape[2])
    k_max = max(x.shape[1], act.shape[1])
    xsum = np.empty((t_count, k_max // 32), np.float32)
    codes = np.empty(k_max, np.float32)
    xq = np.empty((t_count, k_max), np.int8)
    dxp = np.empty((t_count, (k_max // 32 + 1) // 2 * 16), np.float32)
    scr = (xsum, codes, xq, dxp)
    tasks, split = cpu_decode.num_tasks(q, k_cache[0])
    p = 0
    if team.serial(sync, p, members):
        for t in range(t_count):
            x[t, :] = embed[tokens[t]]
        cpu_ops.rms_norm_serial(x, norms_in[0], eps, h)
        team.finish(sync, p, members, 1)
    team.wait(sync, p, members, 1)
    p += 1
    for layer in range(num_layers):
        _linear(sync, p, member, members, h, qkv_w[layer], dec_int4, dec_a8, qkv, scr)
        p += 1
        if team.serial(sync, p, members):
            cpu_ops.rope_write(qkv, positions, cos, sin, num_heads, q, k_cache[layer],
                               v_cache[layer], k_scale[layer], v_scale[layer], slots, kv_buf[0],
                               kv_buf[1])
            team.finish(sync, p, members, 1)
        team.wait(sync, p, members, 1)
        p += 1
        c = team.claim(sync, p, member, members, tasks)
        done = 0
        while c >= 0:
            cpu_decode.attention_task(q, k_cache[layer], v_cache[layer], k_scale[layer],
                                      v_scale[layer], block_ids, lens, block_size, attn_scale,
                                      attn, c, split)
            done += 1
            c = team.claim(sync, p, member, members, tasks)
        team.finish(sync, p, members, done)
        team.wait(sync, p, members, tasks)
        p += 1
        _linear(sync, p, member, members, flat_attn, o_w[layer], dec_int4, dec_a8, tmp, scr)
        p += 1
        if team.serial(sync, p, members):
            _add(x, tmp)
            cpu_ops.rms_norm_serial(x, norms_post[layer], eps, h)
            team.finish(sync, p, members, 1)
        team.wait(sync, p, members, 1)
        p += 1
        _linear(sync, p, member, members, h, gu_w[layer], dec_int4, dec_a8, gu, scr)
        p += 1
        if team.serial(sync, p, members):
            cpu_ops.silu_mul_serial(gu, act)
            team.finish(sync, p, members, 1)
        team.wait(sync, p, members, 1)
        p += 1
        _linear(sync, p, member, members, act, down_w[layer], dec_int4, dec_a8, tmp, scr)
        p += 1
        if team.serial(sync, p, members):
            _add(x, tmp)
            if layer + 1 < num_layers:
                cpu_ops.rms_norm_serial(x, norms_in[layer + 1], eps, h)
            else:
                cpu_ops.rms_norm_serial(x, norm_final, eps, h)
            team.finish(sync, p, members, 1)
        team.wait(sync, p, members, 1)
        p += 1
    _linear(sync, p, member, members, h, head_w, head_int4, head_a8, logits, scr)


PHASES_PER_LAYER = 9  # phases `_member` walks per layer (4 projections, 5 others)


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True, error_model="numpy")
def _step(members, tokens, positions, slots, block_ids, lens, block_size, attn_scale, eps, embed,
          cos, sin, norms_in, norms_post, norm_final, qkv_w, o_w, gu_w, down_w, head_w, dec_int4,
          head_int4, dec_a8, head_a8, k_cache, v_cache, k_scale, v_scale, kv_buf, num_heads, x, h,
          qkv, q, attn, tmp, gu, act, logits):
    sync = team.counters(2 + PHASES_PER_LAYER * norms_in.shape[0], members)
    for member in prange(members):
        _member(sync, member, members, tokens, positions, slots, block_ids, lens, block_size,
                attn_scale, eps, embed, cos, sin, norms_in, norms_post, norm_final, qkv_w, o_w,
                gu_w, down_w, head_w, dec_int4, head_int4, dec_a8, head_a8, k_cache, v_cache,
                k_scale, v_scale, kv_buf, num_heads, x, h, qkv, q, attn, tmp, gu, act, logits)


def _arrays(layer: torch.nn.Module) -> Optional[tuple[np.ndarray, ...]]:
    """(q as uint8, scale, minv, bias) numpy views of a quantized layer; None if not quantized."""
    if isinstance(layer, Int4Linear):
        return layer._arrays
    if isinstance(layer, Int8Linear):
        q, scale, bias = layer._arrays
        return q.view(np.uint8), scale, np.empty((0, 0), np.uint16), bias
    return None


class FusedDecode:
    """The fused step for one LlamaModel; `build` returns None when the model does not qualify."""

    def __init__(self, model: torch.nn.Module, dec_int4: bool, head_int4: bool,
                 lists: tuple[List, ...], head: tuple[np.ndarray, ...]) -> None:
        cfg = model.cfg
        self.model = model
        self.dec_int4, self.head_int4 = dec_int4, head_int4
        self.qkv_w, self.o_w, self.gu_w, self.down_w = lists
        self.head_w = head
        self.norms_in = torch.stack([layer.input_norm for layer in model.layers]).numpy()
        self.norms_post = torch.stack([layer.post_norm for layer in model.layers]).numpy()
        self.norm_final = model.norm.detach().numpy()
        self.embed = model.embed.weight.detach().numpy()
        self.num_steps = 0  # steps run fused (tests and stats read it)
        self.workspace = model.layers[0].qkv.workspace
        self.eps = np.float32(cfg.rms_norm_eps)
        self.attn_scale = np.float32(model.scale)
        n, e, hd = SMALL_BATCH_MAX, cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
        self._bufs = [np.empty((n,) + shape, np.float32) for shape in (
            (e,), (e,), (qkv_out,), (cfg.num_heads, hd), (cfg.num_heads, hd), (e,),
            (2 * cfg.intermediate_size,), (cfg.intermediate_size,))]
        self._kv_buf = np.empty((2, n, cfg.num_kv_heads, hd), np.float32)  # int8 caches' write

    @classmethod
    def build(cls, model: torch.nn.Module) -> Optional[FusedDecode]:
        if model.embed.weight.device.type != "cpu" or model.embed.weight.dtype != torch.float32:
            return None
        kinds, lists = set(), []
        for attr in ("qkv", "o_proj", "gate_up", "down"):
            items = List()
            for layer in model.layers:
                proj = getattr(layer, attr)
                arrays = _arrays(proj)
                if arrays is None:
                    return None
                kinds.add(type(proj))
                items.append(arrays)
            lists.append(items)
        head = _arrays(model.lm_head)
        if len(kinds) != 1 or head is None:
            return None
        return cls(model, Int4Linear in kinds, isinstance(model.lm_head, Int4Linear),
                   tuple(lists), head)

    @staticmethod
    def applies(meta: AttentionMetadata, backend_name: str, kv: KVStore, num_tokens: int,
                num_logits: int) -> bool:
        return (num_logits == num_tokens and not meta.prefills and meta.heads is None
                and meta.observer is None
                and 0 < num_tokens <= SMALL_BATCH_MAX and num_tokens == meta.num_decode_tokens
                and backend_name == "paged"
                and kv.kernel_all() is not None and meta.decode_context_lens is not None)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVStore,
                 meta: AttentionMetadata) -> torch.Tensor:
        """-> logits [T, V] fp32 for every (decode) token of the step."""
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        self.workspace.use_threads()
        self.num_steps += 1
        t = input_ids.shape[0]
        x, h, qkv, q, attn, tmp, gu, act = (b[:t] for b in self._bufs)
        logits = torch.empty(t, self.embed.shape[0])
        a8 = self.workspace.act_int8
        members = min(self.workspace.num_threads, runtime.num_threads())  # threads numba has
        kern = kv.kernel_all()
        _step(members, input_ids.numpy(), positions.numpy(),
              meta.slot_mapping.numpy(), meta.decode_block_ids.numpy(),
              meta.decode_context_lens.numpy(), meta.block_size,
              self.attn_scale, self.eps, self.embed, self.model.cos.numpy(),
              self.model.sin.numpy(), self.norms_in, self.norms_post, self.norm_final,
              self.qkv_w, self.o_w, self.gu_w, self.down_w, self.head_w, self.dec_int4,
              self.head_int4, self.dec_int4 and a8, self.head_int4 and a8, kern.k, kern.v,
              kern.k_scale, kern.v_scale, self._kv_buf[:, :t], self.model.cfg.num_heads, x, h,
              qkv, q, attn, tmp, gu, act, logits.numpy())
        return logits
