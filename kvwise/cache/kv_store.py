"""The KV store: one preallocated pool of blocks per layer in a named format, and its registry.

A *format* (`--kv-cache-dtype`) owns its storage tensors and decides everything about how a
token's K and V are kept: the bytes a block takes (which sizes the pool from
`--kv-cache-memory`), how the step's new K/V are written (rounded, quantized, ...), how history
is read back (`LayerKV.gather_blocks`: compute-dtype rows for the PyTorch backends and the
reference oracle; `LayerKV.kernel`: the arrays the CPU numba kernels read in place;
`LayerKV.kvquant`: a KVQuant store's arrays for its own kernel), and what
happens when a block becomes full and immutable (`seal`). Formats are registered by name, like
attention backends (`register_format`, `make_kv_store`).

Keys are stored after RoPE by every format here (`pre_rope = False`); a format that stores them
before RoPE (KVQuant) says so and rotates on read with the tables the attention side passes.

Invariants:
- Block b owns rows b*S .. b*S+S-1 of every layer ("one block id spans all layers"); each
  storage tensor is [L, N*S, ...] with the row axis second.
- Every slot always holds finite values (zero until first written).
- `write` returns the step's K/V exactly as a later reader of those rows will see them
  ("fresh" rows). Backends attend to these for the step's own tokens instead of reading them
  back, and because they equal the stored values, a token's output does not depend on whether
  its context came from this step, an earlier chunk, or a shared prefix-cache chunk.
- The store never decides which block a token goes to: the KV manager does, the runner turns
  that into slot rows, and the model writes them with `write`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Protocol

import numpy as np
import torch

if TYPE_CHECKING:  # kvquant_kv imports this module
    from kvwise.cache.kvquant_kv import KVQuantArrays


class ModelShape(Protocol):
    """What the store needs of a model's config (kvwise.model.config.ModelConfig has it; the
    cache layer does not import the model layer)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


# Storage dtypes of dense caches the CPU numba kernels (rope-into-cache, decode attention, fused
# decode step) read and write; bfloat16 goes through the PyTorch paths.
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


def kernel_dtype(cache: torch.Tensor) -> bool:
    """Whether the CPU kernels take this dense cache tensor."""
    return cache.device.type == "cpu" and cache.dtype in KERNEL_KV_DTYPES


def kernel_view(cache: torch.Tensor) -> np.ndarray:
    """The numpy array the kernels take for a CPU tensor (no copy): fp16 as its uint16 bits
    (numba has no half type; simd.vload_kv / store_kv / load_f16 convert), others as they are."""
    a = cache.numpy()
    return a.view(np.uint16) if cache.dtype == torch.float16 else a


def no_scale(ndim: int = 2) -> np.ndarray:
    """The (empty) scale array of a format without scales."""
    return np.zeros((0,) * ndim, np.uint16)


@dataclass(frozen=True)
class KernelKV:
    """One layer's cache as the CPU kernels read it (numpy views, no copy).

    k, v [N*S, K, D]: float32, float16 as uint16, or int8 codes. k_scale, v_scale [N*S, K]
    float16 as uint16 (one scale per token and KV head: value = code * scale) for int8; empty
    [0, 0] arrays for dense formats."""

    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray = field(default_factory=no_scale)
    v_scale: np.ndarray = field(default_factory=no_scale)


class LayerKV:
    """One layer of a store, as an attention backend sees it."""

    __slots__ = ("store", "layer")

    def __init__(self, store: KVStore, layer: int) -> None:
        self.store = store
        self.layer = layer

    def gather_blocks(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [M] long -> k, v [M*S, K, D] in the compute dtype (whole blocks)."""
        return self.store.gather_blocks(self.layer, block_ids)

    def gather_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [R] long flat slot rows -> k, v [R, K, D] in the compute dtype."""
        return self.store.gather_rows(self.layer, rows)

    def gather_head_keys(self, rows: torch.Tensor, head: int) -> torch.Tensor:
        """rows [R] -> the keys of one KV head at those rows [R, D] (compute dtype, rotated)."""
        return self.store.gather_head_keys(self.layer, rows, head)

    def gather_blocks_sealed(self, block_ids: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
        """As gather_blocks, with rows of unsealed blocks as they will read once sealed (the
        view of a token in a later block; equal to gather_blocks unless `seals_later`)."""
        return self.store.gather_rows_sealed(self.layer,
                                             _block_rows_t(block_ids, self.store.block_size))

    @property
    def kernel(self) -> Optional[KernelKV]:
        """The arrays the CPU kernels read, or None when they cannot read this store."""
        return self.store.kernel_layer(self.layer)

    @property
    def kvquant(self) -> Optional[KVQuantArrays]:
        """A KVQuant store's arrays for its CPU kernel (views valid for this step), or None for
        other formats and off CPU."""
        arrays = getattr(self.store, "kernel_arrays", None)
        if arrays is None or self.store.device.type != "cpu":
            return None
        return arrays(self.layer)


class KVStore:
    """Base of the KV formats. Subclasses set `name`, `pre_rope`, create their tensors in
    `__init__` and implement `element_bytes`, `write`, `gather_rows`; the rest has defaults.

    Not thread-safe: the engine thread writes and reads it."""

    name: str = ""
    pre_rope: bool = False  # whether keys are stored before RoPE (see module docstring)
    takes_options: bool = False  # whether the constructor takes make_kv_store's options
    # whether a row reads differently once its block is sealed (KVQuant's fp16 open tail): a
    # token then reads the rows of its own block as stored and every earlier block sealed
    seals_later: bool = False

    def __init__(self, shape: ModelShape, num_blocks: int, block_size: int,
                 compute_dtype: torch.dtype, device: torch.device) -> None:
        self.num_layers = shape.num_layers
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.compute_dtype = compute_dtype
        self.device = device
        self.bytes_per_block = self.block_bytes(shape, block_size)
        self._layers = [LayerKV(self, i) for i in range(shape.num_layers)]
        self._kernel_all: Optional[KernelKV] = None  # set by `_enable_kernels`
        self._kernel_layers: Optional[list[KernelKV]] = None

    # -- sizing ------------------------------------------------------------------------------

    @classmethod
    def token_head_bytes(cls, head_dim: int) -> int:
        """Bytes one token's K and V of one KV head take (both together)."""
        raise NotImplementedError

    @classmethod
    def block_bytes(cls, shape: ModelShape, block_size: int) -> int:
        """Bytes one block takes across all layers, K and V."""
        return (shape.num_layers * block_size * shape.num_kv_heads
                * cls.token_head_bytes(shape.head_dim))

    @classmethod
    def reserved_bytes(cls, shape: ModelShape, block_size: int, max_num_seqs: int,
                       sink_tokens: int) -> int:
        """Bytes the format keeps beside its blocks (side pools), taken from the KV budget
        before it is divided into blocks; 0 for formats without side storage."""
        return 0

    @property
    def side_bytes(self) -> int:
        """Bytes held beside the blocks now (see reserved_bytes)."""
        return 0

    def release(self, block_ids: list[int]) -> None:
        """The KV manager freed these blocks (their rows will be rewritten by a new owner):
        the hook for formats keeping per-block side state. Nothing for the formats here."""

    def _rows_shape(self) -> tuple[int, int]:
        return self.num_layers, self.num_blocks * self.block_size

    # -- the layer views ---------------------------------------------------------------------

    def layer(self, i: int) -> LayerKV:
        return self._layers[i]

    def kernel_layer(self, layer: int) -> Optional[KernelKV]:
        """CPU kernel arrays of one layer; None when the kernels cannot read this format."""
        return None if self._kernel_layers is None else self._kernel_layers[layer]

    def kernel_all(self) -> Optional[KernelKV]:
        """CPU kernel arrays of every layer ([L, N*S, ...]), for the fused decode step."""
        return self._kernel_all

    def _enable_kernels(self, k: torch.Tensor, v: torch.Tensor,
                        k_scale: Optional[torch.Tensor] = None,
                        v_scale: Optional[torch.Tensor] = None) -> None:
        """Let the CPU kernels read these [L, N*S, ...] tensors (views built once, here);
        without scales the kernels get empty [L, 0, 0] ones, indexable by layer."""
        empty = np.zeros((self.num_layers, 0, 0), np.uint16)
        ks = empty if k_scale is None else kernel_view(k_scale)
        vs = empty if v_scale is None else kernel_view(v_scale)
        whole = KernelKV(kernel_view(k), kernel_view(v), ks, vs)
        self._kernel_all = whole
        self._kernel_layers = [KernelKV(whole.k[i], whole.v[i], whole.k_scale[i],
                                        whole.v_scale[i]) for i in range(self.num_layers)]

    # -- writing and reading -----------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """slots [T] long; k, v [T, K, D] compute dtype (k rotated unless `pre_rope`; then
        `positions` [T] are required) -> stored at those rows of layer `layer`; returns k
        (rotated), v [T, K, D] as a reader will see them."""
        raise NotImplementedError

    def write_heads(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `write` (rotated keys), but each KV head h of token t goes to row slots[t, h]
        of its own plane (slots [T, K]; per-head KV groups), touching no other head's data
        at those rows. Formats that store a row of all heads as one unit refuse."""
        raise NotImplementedError(f"kv_cache_dtype {self.name!r}: per-head KV groups are not "
                                  "supported with this format")

    def gather_rows(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def gather_blocks(self, layer: int, block_ids: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gather_rows(layer, _block_rows_t(block_ids, self.block_size))

    def gather_rows_sealed(self, layer: int, rows: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as they read once their blocks are sealed (see `seals_later`)."""
        return self.gather_rows(layer, rows)

    def gather_head_keys(self, layer: int, rows: torch.Tensor, head: int) -> torch.Tensor:
        """One KV head's keys at `rows` [R] -> [R, D] (formats may read less than a row)."""
        return self.gather_rows(layer, rows)[0][:, head]

    def copy_rows(self, src_rows: list[int], dst_rows: list[int],
                  plane: Optional[tuple[int, int]] = None) -> None:
        """Copy stored rows src_rows[i] -> dst_rows[i] (a compaction plan of the KV manager),
        in every layer and KV head, or only in `plane` = (layer, KV head). Bytes are copied as
        stored (no re-quantization). Sources are read before any destination is written."""
        if not src_rows:
            return
        src = torch.tensor(src_rows, dtype=torch.long, device=self.device)
        dst = torch.tensor(dst_rows, dtype=torch.long, device=self.device)
        for t in self.tensors().values():
            if plane is None:
                t[:, dst] = t[:, src]
            else:
                layer, head = plane
                t[layer, dst, head] = t[layer, src, head]

    def seal(self, block_ids: list[int]) -> None:
        """Called by the engine when these blocks became full and immutable (committed): the
        hook for quantize-on-seal, offload and send. The formats here store each row in its
        final form when written, so they do nothing."""

    # -- moving blocks between engines (export/import of a request) ---------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """The storage tensors by name, each [L, N*S, ...] (row axis second)."""
        raise NotImplementedError

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        """The stored bytes of these blocks, every layer, as CPU tensors (name -> tensor, each
        [L, len(block_ids) * S, ...] in the storage dtype), rows in table order."""
        rows = _block_rows(block_ids, self.block_size, self.device)
        return {name: t[:, rows].cpu() for name, t in self.tensors().items()}

    def import_blocks(self, block_ids: list[int], data: dict[str, torch.Tensor]) -> None:
        """Write what `export_blocks` returned (from an engine with the same format and model)
        into these blocks; names, shapes and dtypes must match exactly (ValueError otherwise,
        before anything is written)."""
        rows = _block_rows(block_ids, self.block_size, self.device)
        mine = self.tensors()
        if set(data) != set(mine):
            raise ValueError(f"KV import: format {self.name!r} stores {sorted(mine)}, got "
                             f"{sorted(data)}")
        for name, cache in mine.items():
            t = data[name]
            want = (cache.shape[0], rows.shape[0], *cache.shape[2:])
            if tuple(t.shape) != want or t.dtype != cache.dtype:
                raise ValueError(f"KV import: tensor {name!r} must be {want} {cache.dtype}, "
                                 f"got {tuple(t.shape)} {t.dtype}")
        for name, cache in mine.items():
            cache[:, rows] = data[name].to(cache.device)


def _block_rows(block_ids: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    """[len(block_ids) * S] long: the flat rows of these blocks, in order."""
    return _block_rows_t(torch.tensor(block_ids, dtype=torch.long, device=device), block_size)


def _block_rows_t(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    offsets = torch.arange(block_size, device=block_ids.device)
    return (block_ids[:, None] * block_size + offsets).reshape(-1)


# -- the registry ---------------------------------------------------------------------------------

_FORMATS: dict[str, Callable[..., KVStore]] = {}
_CLASSES: dict[str, type[KVStore]] = {}
# formats named by a pattern (e.g. KVQuant's nuq3-1%): description -> resolver(name) that
# returns the class of a name it owns, None for other names, or raises ValueError for a bad one
_FAMILIES: dict[str, Callable[[str], Optional[type[KVStore]]]] = {}


def register_format(name: str, cls: type[KVStore],
                    factory: Optional[Callable[..., KVStore]] = None) -> None:
    """Register a format class under `name`; `factory(shape, num_blocks, block_size,
    compute_dtype, device, **options)` builds it (default: the class itself)."""
    _CLASSES[name] = cls
    _FORMATS[name] = factory or cls


def register_format_family(description: str,
                           resolver: Callable[[str], Optional[type[KVStore]]]) -> None:
    """Register formats named by a pattern; the resolved class is its own factory."""
    _FAMILIES[description] = resolver


def available_formats() -> list[str]:
    return sorted(_FORMATS)


def format_class(name: str) -> type[KVStore]:
    if name in _CLASSES:
        return _CLASSES[name]
    for resolver in _FAMILIES.values():
        cls = resolver(name)
        if cls is not None:
            return cls
    raise ValueError(f"kv_cache_dtype: unknown {name!r}; known: {available_formats()} and "
                     f"{', '.join(_FAMILIES)}")


def make_kv_store(name: str, shape: ModelShape, num_blocks: int, block_size: int,
                  compute_dtype: torch.dtype, device: torch.device, **options: object
                  ) -> KVStore:
    """Build a format's store; `options` go to formats that take them (KVQuant: calibration,
    sink_tokens, rope, max_num_seqs) and are ignored by the others."""
    cls = format_class(name)  # the error for an unknown name
    factory = _FORMATS.get(name, cls)
    if not getattr(cls, "takes_options", False):
        return factory(shape, num_blocks, block_size, compute_dtype, device)
    return factory(shape, num_blocks, block_size, compute_dtype, device, **options)


# The built-in formats register themselves; imported last because they subclass KVStore.
from kvwise.cache import dense_kv, int8_kv, kvquant_kv  # noqa: E402, F401
