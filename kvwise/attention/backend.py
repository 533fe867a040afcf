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
- Per-head tables (`heads`, FastGen-style compressed requests whose (layer, KV head) planes
  keep different tokens): such a request is only ever a decode row, and every layer reads its
  own view `meta.for_layer(i)`, where the new tokens' rows are per KV head
  (`slot_mapping_heads` [T, K]; `slot_mapping` is None there, so a path that would write or
  read one row for all heads fails loudly instead of touching another group's plane) and the
  decode tables are per (row, KV head) (`decode_block_ids` [Bd*K*nb], `decode_context_lens`
  [Bd*K]; a dense row repeats its table K times, `decode_mask` is None). Without such a
  request `heads` is None and `for_layer` returns the metadata itself (no cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
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
    # Steps with per-head (many-group) decode rows (module docstring); None otherwise.
    heads: Optional[HeadTables] = None
    # Set only in a layer's view (`for_layer`) of such a step: [T, K] long, each new token's
    # row in each KV head's plane of this layer, and the layer the view is for.
    slot_mapping_heads: Optional[torch.Tensor] = None
    layer: Optional[int] = None
    # Called by the model after each layer's attention, when set (FastGen profiling and its
    # decode-time scores; None on every other step, no cost):
    # observer(layer, q [T, H, D], k_new, v_new [T, K, D] or None, kv, layer_meta, scale)
    observer: Optional[Callable[..., None]] = None

    def for_layer(self, layer: int) -> AttentionMetadata:
        """The metadata layer `layer` reads: itself, or with per-head tables its own view."""
        h = self.heads
        if h is None:
            return self
        return replace(self, slot_mapping=None, slot_mapping_heads=h.slots[layer],
                       decode_block_ids=h.decode_block_ids[layer],
                       decode_context_lens=h.decode_context_lens[layer], decode_mask=None,
                       layer=layer)

    def head_table(self, row: int, kv_head: int) -> tuple[list[int], int]:
        """(block table, context length) that KV head `kv_head` of request row `row` reads in
        this layer view (a dense row's one table for every head)."""
        h = self.heads
        if h is None or h.tables[row] is None:
            return self.block_tables[row], self.context_lens[row]
        assert self.layer is not None, "per-head tables are read through for_layer(i)"
        g = self.layer * h.num_kv_heads + kv_head
        return h.tables[row][g], h.context_lens[row][g]


@dataclass
class HeadTables:
    """Per-(layer, KV head) tables of a step that has many-group decode rows.

    slots [L, T, K] long: every new token's row in each plane (a dense row's slot repeated);
    decode_block_ids [L, Bd*K*nb] long and decode_context_lens [L, Bd*K] long: the CPU decode
    kernel's per-head tables (row b, head h: table b*K + h), padded with block 0; tables[r]
    / context_lens[r]: the L*K tables (group g = layer * K + head) and context lengths of
    request row r, or None for a dense row (it reads block_tables[r] in every plane)."""

    num_kv_heads: int
    slots: torch.Tensor
    decode_block_ids: torch.Tensor
    decode_context_lens: torch.Tensor
    tables: list[Optional[list[list[int]]]]
    context_lens: list[Optional[list[int]]]


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
