"""Attention backend interface and the per-step metadata every backend reads.

A step's T tokens are laid out decode-first: the first `num_decode_tokens` tokens are single-token
queries of distinct requests, then each prefill span (a chunk of one request's prompt, possibly
continuing earlier chunks or a prefix-cache hit) follows contiguously.

Invariants:
- Metadata is built once per step by the runner and shared by all layers; backends never mutate it.
- The new tokens' K/V are written to their slots (`slot_mapping`) before the backend runs. The
  model also passes them as `k_new`, `v_new` [T, K, D] (exactly the values the store keeps, see
  kvwise.cache.kv_store), so a prefill attends to its own tokens without reading them back
  through a lossy format; None means the rope kernel wrote them straight into a dense cache
  and reading them back is exact. Decode kernels read everything from the store.
- History is read through the layer's `LayerKV` view, whatever the format: `gather_blocks` /
  `gather_rows` give compute-dtype rows, `kernel` the arrays the CPU kernels take.
- Slot s of block b is flat row `b * block_size + s` of every layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch

from kvwise.cache.kv_store import LayerKV


@dataclass
class PrefillSpan:
    start: int  # first row of this span in the step's T tokens
    num_query_tokens: int
    num_context_tokens: int  # tokens with KV after this step (earlier chunks + this span)
    # [ceil(C/S)] long block ids of the context, None when the span is its own context
    context_block_ids: Optional[torch.Tensor]

    @property
    def num_prior_tokens(self) -> int:
        return self.num_context_tokens - self.num_query_tokens


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: flat cache row of each new token
    num_decode_tokens: int  # Bd
    # [Bd * nb] long: each decode's block table padded to nb blocks (pad = block 0, masked out)
    decode_block_ids: Optional[torch.Tensor]
    decode_mask: Optional[torch.Tensor]  # [Bd, 1, 1, nb * S] bool, True = attend
    decode_context_lens: Optional[torch.Tensor]  # [Bd] long
    prefills: list[PrefillSpan]
    block_size: int
    # Per-request block tables (decode rows first, then prefills), for backends that work on
    # whole blocks (two-phase) and for the reference oracle.
    block_tables: list[list[int]]
    context_lens: list[int]
    # What the backend's optional `prepare(meta)` hook returned for this step (None without one).
    backend_data: Optional[Any] = None
    # Batch-invariant mode, steps with prefill spans: every one of the T rows as a decode-style
    # query over the cache (its K/V written first): [T * nb] block ids (each row's table padded
    # to nb) and [T] context lengths (its position in the request + 1). Backends that honour it
    # compute each row as a decode row would, whatever the step's size (paged).
    row_block_ids: Optional[torch.Tensor] = None
    row_context_lens: Optional[torch.Tensor] = None


class AttentionBackend(Protocol):
    """A backend may also define `prepare(meta) -> Any`: the runner then calls it once per step,
    after building `meta`, and stores the result in `meta.backend_data` for every layer (extra
    per-step metadata such as two-phase's shared-chunk plan). Backends without it cost nothing.
    Likewise an optional `warm(store: KVStore) -> None`, called once when the runner is built:
    compile (or load from numba's cache) the kernels the backend will run on that store."""

    name: str

    def forward(self, q: torch.Tensor, k_new: Optional[torch.Tensor],
                v_new: Optional[torch.Tensor], kv: LayerKV, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [T, H, D]; k_new, v_new [T, K, D] or None; kv one layer's store view -> out
        [T, H, D]."""
        ...


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _REGISTRY[name] = factory


def get_backend(name: str) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(f"attention_backend: unknown {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available_backends() -> list[str]:
    return sorted(_REGISTRY)
