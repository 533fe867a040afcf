"""KVQuant KV formats (`--kv-cache-dtype nuq4|nuq3|nuq2[-X%]|int4|int2[-X%]`): keys per channel
before RoPE, values per token, packed codes of a calibrated datatype, sparse fp16 outliers, an
fp16 attention sink and an fp16 open tail (Hooper et al. 2024; quantizer in
kvwise.cache.kvquant.quantizer, tables from kvwise.cache.kvquant.calibration).

Where a token's K/V live:
- **Open tail.** A block that is not full keeps its rows in fp16 in a side pool (one entry of
  S rows per open block, claimed by the block's first write). The step that writes a block's
  last row quantizes the block from those fp16 rows, once per layer as that layer's write
  lands (so later blocks of the same prompt read the codes without quantizing again), and
  `seal` releases the entry after the step: from then on every reader sees the codes. Cost:
  one fp16 block per open block (about one per running request), `reserved_bytes` ahead for
  `max_num_seqs` of them; the pool grows if more are open (counted in `side_bytes`).
- **Sink.** Rows at positions < `sink_tokens` (the first token by default) keep their fp16
  values after their block is quantized, in a second side pool of `sink_tokens` rows per block
  holding them (again about one per request; a prefix-shared first block shares its entry).
- **Codes.** Everything else: keys as packed codes + up to Ck fp16 outliers per (token, KV
  head) with the layer's calibrated per-channel zero/scale; values as packed codes + fp16
  zero/scale per (token, KV head) + Cv outliers.

Keys are stored before RoPE (`pre_rope`), with each row's position; readers get them rotated
at that position (the rotate-half convention of kvwise.model.rope).

Invariants:
- A row reads back its fp16 value while its block is open and its quantized value once the
  block is full (sink rows: fp16 always). `write` returns exactly what readers will see, so a
  prompt's tokens see the same K/V whether their context came from this step, an earlier
  chunk or a prefix-cache hit (which only shares full blocks).
- Side-pool entries belong to a block id; they are released when the block fills (tail), is
  rewritten from scratch or freed (`release`, the KV manager's on_free hook).
- Not supported here, refused where configured: KV compression (evicting rows of a quantized
  block), batch-invariant mode, export/import of requests (no transfer format yet).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kvwise.cache.kv_store import KVStore, ModelShape, register_format_family
from kvwise.cache.kvquant.calibration import (
    Calibration,
    LayerTables,
    key_outliers,
    value_outliers,
)
from kvwise.cache.kvquant.quantizer import (
    dequantize,
    pack_codes,
    quantize_keys,
    quantize_values,
    unpack_codes,
)
from kvwise.kv_names import KVQuantSpec, parse_format_name


@dataclass(frozen=True)
class KVQuantArrays:
    """One layer of a KVQuant store as the CPU kernels read it: numpy views, no copy, valid for
    one step (a side pool may be reallocated when it grows). fp16 arrays are uint16 bits.

    k_codes, v_codes [N*S, K, D*bits/8] uint8 (packed, see quantizer); k_values, v_values
    [2^bits] float32 (the read datatype); k_zero, k_scale [K, D] float32; v_zero, v_scale
    [N*S, K] fp16; k_out_idx [N*S, K, Ck] uint8 (NO_OUTLIER = unused), k_out_val [N*S, K, Ck]
    fp16; v_out_idx, v_out_val likewise with Cv; positions [N*S] int64; open [N] bool (the
    layer's rows of the block are in the tail pool, fp16); tail_slot [N] int64, tail_k,
    tail_v [M*S, K, D] fp16 (pre-RoPE keys; row = tail_slot[b] * S + offset); sink_slot [N]
    int64, sink_k, sink_v [M'*R, K, D] fp16 (row = sink_slot[b] * R + offset; a row at
    offset < sink_tokens of a block whose first position is < sink_tokens reads the sink
    pool when the block is not open); cos, sin [P, D] float32 (rotate-half RoPE)."""

    bits: int
    k_codes: np.ndarray
    v_codes: np.ndarray
    k_values: np.ndarray
    v_values: np.ndarray
    k_zero: np.ndarray
    k_scale: np.ndarray
    v_zero: np.ndarray
    v_scale: np.ndarray
    k_out_idx: np.ndarray
    k_out_val: np.ndarray
    v_out_idx: np.ndarray
    v_out_val: np.ndarray
    positions: np.ndarray
    open: np.ndarray
    tail_slot: np.ndarray
    tail_k: np.ndarray
    tail_v: np.ndarray
    sink_slot: np.ndarray
    sink_rows: int
    sink_k: np.ndarray
    sink_v: np.ndarray
    sink_tokens: int
    cos: np.ndarray
    sin: np.ndarray


class SidePool:
    """fp16 K/V rows for some blocks: entry e holds rows e*R .. e*R+R-1 of [L, M*R, K, D]
    tensors; `slot_of[block]` is the block's entry or -1. Grows (doubling) when full."""

    def __init__(self, num_blocks: int, rows: int, num_layers: int, num_kv_heads: int,
                 head_dim: int, capacity: int, device: torch.device) -> None:
        self.rows = rows
        self._dims = (num_layers, num_kv_heads, head_dim)
        self.slot_of = torch.full((num_blocks,), -1, dtype=torch.long)  # [N] entry or -1
        self.k = torch.zeros(0)
        self.v = torch.zeros(0)
        self._free: list[int] = []
        self._device = device
        self.capacity = 0
        self._grow(max(1, capacity))

    def _grow(self, capacity: int) -> None:
        layers, kh, d = self._dims
        k = torch.zeros((layers, capacity * self.rows, kh, d), dtype=torch.float16,
                        device=self._device)  # [L, M*R, K, D] fp16
        v = torch.zeros_like(k)
        if self.capacity:
            k[:, :self.k.shape[1]] = self.k
            v[:, :self.v.shape[1]] = self.v
        self._free.extend(range(capacity - 1, self.capacity - 1, -1))
        self.k, self.v, self.capacity = k, v, capacity

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (every entry, used or not)."""
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def used_bytes(self) -> int:
        return self.nbytes * self.num_used // self.capacity

    def claim(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self.slot_of[b] < 0:
                if not self._free:
                    self._grow(2 * self.capacity)
                self.slot_of[b] = self._free.pop()

    def release(self, block_ids: list[int]) -> None:
        for b in block_ids:
            e = int(self.slot_of[b])
            if e >= 0:
                self._free.append(e)
                self.slot_of[b] = -1

    def row_index(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Pool rows of (block, offset) pairs whose block has an entry ([R] long)."""
        return self.slot_of[blocks] * self.rows + offsets


class KVQuantKV(KVStore):
    """Base of the generated per-name classes (`spec` set by `format_for`)."""

    spec: KVQuantSpec
    pre_rope = True
    takes_options = True
    seals_later = True

    def __init__(self, shape: ModelShape, num_blocks: int, block_size: int,
                 compute_dtype: torch.dtype, device: torch.device, *,
                 calibration: Optional[Calibration] = None, sink_tokens: int = 1,
                 rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                 max_num_seqs: int = 16) -> None:
        super().__init__(shape, num_blocks, block_size, compute_dtype, device)
        if calibration is None:
            raise ValueError(f"kv_cache_dtype {self.name!r} needs a calibration "
                             "(kv_quant_calibration)")
        if rope is None:
            raise ValueError(f"kv_cache_dtype {self.name!r} stores keys before RoPE and needs "
                             "the model's RoPE tables")
        if not 0 <= sink_tokens <= block_size:
            raise ValueError(f"kv_quant_sink must be within 0..block_size ({block_size}), "
                             f"got {sink_tokens}")
        calibration.check_model(shape.num_layers, shape.num_kv_heads, shape.head_dim)
        self.tables: list[LayerTables] = calibration.layer_tables(self.spec)
        self.sink_tokens = sink_tokens
        self.cos, self.sin = rope[0].float(), rope[1].float()  # [P, D] each
        d, kh, b = shape.head_dim, shape.num_kv_heads, self.spec.bits
        self.num_k_outliers = key_outliers(self.spec, d)
        self.num_v_outliers = value_outliers(self.spec, d)
        rows = self._rows_shape()
        u8, f16 = torch.uint8, torch.float16
        self.k_codes = torch.zeros((*rows, kh, d * b // 8), dtype=u8, device=device)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.v_zero = torch.zeros((*rows, kh), dtype=f16, device=device)  # [L, N*S, K]
        self.v_scale = torch.zeros_like(self.v_zero)
        self.k_out_idx = torch.zeros((*rows, kh, self.num_k_outliers), dtype=u8, device=device)
        self.k_out_val = torch.zeros((*rows, kh, self.num_k_outliers), dtype=f16, device=device)
        self.v_out_idx = torch.zeros((*rows, kh, self.num_v_outliers), dtype=u8, device=device)
        self.v_out_val = torch.zeros((*rows, kh, self.num_v_outliers), dtype=f16, device=device)
        self.positions = torch.zeros(rows[1], dtype=torch.long, device=device)  # [N*S]
        args = (shape.num_layers, kh, d)
        self.tail = SidePool(num_blocks, block_size, *args, max_num_seqs, device)
        # [L, N]: whether a layer of a block reads its tail entry (written, not yet quantized)
        self.open = torch.zeros((shape.num_layers, num_blocks), dtype=torch.bool)
        # [L, N]: an open block's codes are already written (its last row came this step, so
        # `write` quantized it once; `seal` and the sealed view reuse the codes)
        self.coded = torch.zeros_like(self.open)
        self.sink = SidePool(num_blocks, max(1, sink_tokens), *args, max_num_seqs, device)

    # -- sizing ------------------------------------------------------------------------------

    @classmethod
    def token_head_bytes(cls, head_dim: int) -> int:
        s = cls.spec
        codes = 2 * head_dim * s.bits // 8  # K and V codes
        v_range = 2 * 2  # fp16 zero and scale of the value vector
        outliers = 3 * (key_outliers(s, head_dim) + value_outliers(s, head_dim))  # u8 + fp16
        return codes + v_range + outliers

    @classmethod
    def block_bytes(cls, shape: ModelShape, block_size: int) -> int:
        # + one int64 position per row (shared by layers and heads)
        return super().block_bytes(shape, block_size) + 8 * block_size

    @classmethod
    def reserved_bytes(cls, shape: ModelShape, block_size: int, max_num_seqs: int,
                       sink_tokens: int) -> int:
        """The side pools' initial fp16 entries: an open tail and a sink per running request."""
        row = 2 * 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim  # K+V fp16
        return max_num_seqs * row * (block_size + max(1, sink_tokens))

    @property
    def side_bytes(self) -> int:
        """Bytes of the side-pool entries in use (open tails, sinks)."""
        return self.tail.used_bytes + self.sink.used_bytes

    # -- writing -------------------------------------------------------------------------------

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """k pre-RoPE, v [T, K, D] at `slots` [T] (positions [T] required) -> the rotated k and
        v [T, K, D] a reader of these rows sees (compute dtype)."""
        if positions is None:
            raise ValueError(f"{self.name}: write needs the tokens' positions (pre-RoPE keys)")
        s = self.block_size
        slots = slots.long()
        blocks, offsets = slots // s, slots % s
        if layer == 0:
            fresh = [int(b) for b in torch.unique(blocks) if self.tail.slot_of[b] < 0]
            self.sink.release(fresh)  # a tail-less block being written holds new content
            self.tail.claim(fresh)
            self.positions[slots] = positions.long()
        trow = self.tail.row_index(blocks, offsets)
        self.open[layer, blocks] = True
        self.tail.k[layer, trow] = k.half()
        self.tail.v[layer, trow] = v.half()
        self._code_filled(layer, blocks[offsets == s - 1])
        return self.gather_rows(layer, slots)

    def _code_filled(self, layer: int, blocks: torch.Tensor) -> None:
        """Blocks whose last row this step wrote will be sealed at its end: quantize this
        layer of them now, once, from their fp16 tail rows (a row's codes depend on its own
        values only), so the sealed view a later block of the same prompt reads and `seal`
        reuse the codes. Readers still see the tail rows until `seal`."""
        if not blocks.numel():
            return
        s = self.block_size
        nb = blocks.numel()
        rows = (blocks[:, None] * s + torch.arange(s)).reshape(-1)
        trow = self.tail.row_index(blocks.repeat_interleave(s), torch.arange(s).repeat(nb))
        codes = self._quantize(layer, self.tail.k[layer, trow], self.tail.v[layer, trow])
        for name, value in codes.items():
            getattr(self, name)[layer, rows] = value
        self.coded[layer, blocks] = True

    def seal(self, block_ids: list[int]) -> None:
        """These blocks are full and immutable: quantize every layer from the tail entries,
        keep their sink rows in the sink pool, release the entries."""
        blocks = torch.tensor([b for b in block_ids if self.tail.slot_of[b] >= 0],
                              dtype=torch.long)
        if not blocks.numel():
            return
        s, n = self.block_size, self.sink_tokens
        rows = (blocks[:, None] * s + torch.arange(s)).reshape(-1)  # [nb*S]
        trow = self.tail.row_index(blocks.repeat_interleave(s), torch.arange(s).repeat(
            blocks.numel()))
        sink_blocks = [int(b) for b in blocks if n and self.positions[int(b) * s] < n]
        self.sink.claim(sink_blocks)
        for layer in range(self.num_layers):
            todo = ~self.coded[layer, blocks].repeat_interleave(s)  # [nb*S] rows to quantize
            if todo.any():
                codes = self._quantize(layer, self.tail.k[layer, trow[todo]],
                                       self.tail.v[layer, trow[todo]])
                for name, value in codes.items():
                    getattr(self, name)[layer, rows[todo]] = value
            for b in sink_blocks:
                src = self.tail.row_index(torch.full((n,), b), torch.arange(n))
                dst = self.sink.row_index(torch.full((n,), b), torch.arange(n))
                self.sink.k[layer, dst] = self.tail.k[layer, src]
                self.sink.v[layer, dst] = self.tail.v[layer, src]
        self.open[:, blocks] = False
        self.coded[:, blocks] = False
        self.tail.release(blocks.tolist())

    def _quantize(self, layer: int, k: torch.Tensor, v: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """fp16 pre-RoPE k, v [R, K, D] -> the stored tensors' rows, by attribute name."""
        t, bits = self.tables[layer], self.spec.bits
        kc, ki, kv_ = quantize_keys(k.float(), t.k_zero, t.k_scale, t.k_dtype,
                                    self.num_k_outliers)
        vc, vz, vs, vi, vv = quantize_values(v.float(), t.v_dtype, self.num_v_outliers)
        return {"k_codes": pack_codes(kc, bits), "v_codes": pack_codes(vc, bits),
                "k_out_idx": ki, "k_out_val": kv_, "v_zero": vz, "v_scale": vs,
                "v_out_idx": vi, "v_out_val": vv}

    def release(self, block_ids: list[int]) -> None:
        """The KV manager freed these blocks: drop their side-pool entries."""
        self.tail.release(block_ids)
        self.sink.release(block_ids)
        self.open[:, block_ids] = False
        self.coded[:, block_ids] = False

    # -- reading -------------------------------------------------------------------------------

    def gather_rows(self, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows [R] -> k rotated at each row's position, v [R, K, D] in the compute dtype, as
        stored now: fp16 rows of open blocks, codes of sealed ones (sink rows fp16)."""
        return self._read(layer, rows.long(), sealed=False)

    def gather_rows_sealed(self, layer: int, rows: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """As gather_rows, but rows of open blocks as they will read once sealed (quantized now
        from their fp16 values: a row's codes depend on its own values only)."""
        return self._read(layer, rows.long(), sealed=True)

    def _read(self, layer: int, rows: torch.Tensor, sealed: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
        s, d, t = self.block_size, self.head_dim, self.tables[layer]
        blocks, offsets = rows // s, rows % s
        open_ = self.open[layer, blocks]
        stored = {name: getattr(self, name)[layer, rows] for name in _CODE_TENSORS}
        uncoded = open_ & ~self.coded[layer, blocks]  # open rows without codes yet
        if sealed and uncoded.any():
            trow = self.tail.row_index(blocks[uncoded], offsets[uncoded])
            fresh = self._quantize(layer, self.tail.k[layer, trow], self.tail.v[layer, trow])
            for name in _CODE_TENSORS:
                stored[name][uncoded] = fresh[name]
        bits = self.spec.bits
        k = dequantize(unpack_codes(stored["k_codes"], bits, d), t.k_zero, t.k_scale,
                       t.k_dtype, stored["k_out_idx"], stored["k_out_val"])  # [R, K, D] fp32
        v = dequantize(unpack_codes(stored["v_codes"], bits, d), stored["v_zero"][..., None],
                       stored["v_scale"][..., None], t.v_dtype, stored["v_out_idx"],
                       stored["v_out_val"])
        pos = self.positions[rows]
        sink = (self.sink.slot_of[blocks] >= 0) & (pos < self.sink_tokens) & (offsets < max(
            1, self.sink_tokens)) & ~open_
        if sink.any():
            srow = self.sink.row_index(blocks[sink], offsets[sink])
            k[sink] = self.sink.k[layer, srow].float()
            v[sink] = self.sink.v[layer, srow].float()
        # fp16 from the tail: rows of open blocks, or (sealed view) their sink rows
        tail = open_ & (pos < self.sink_tokens) if sealed else open_
        if tail.any():
            trow = self.tail.row_index(blocks[tail], offsets[tail])
            k[tail] = self.tail.k[layer, trow].float()
            v[tail] = self.tail.v[layer, trow].float()
        k = _rotate(k, self.cos[pos], self.sin[pos])
        c = self.compute_dtype
        return k.to(c), v.to(c)

    def kernel_arrays(self, layer: int) -> KVQuantArrays:
        """The arrays the CPU KVQuant kernels read for one layer (see KVQuantArrays)."""
        t = self.tables[layer]

        def h(x: torch.Tensor) -> np.ndarray:
            return x.numpy().view(np.uint16)

        return KVQuantArrays(
            self.spec.bits, self.k_codes[layer].numpy(), self.v_codes[layer].numpy(),
            t.k_dtype.values.numpy(), t.v_dtype.values.numpy(),
            t.k_zero.float().numpy(), t.k_scale.float().numpy(),
            h(self.v_zero[layer]), h(self.v_scale[layer]), self.k_out_idx[layer].numpy(),
            h(self.k_out_val[layer]), self.v_out_idx[layer].numpy(), h(self.v_out_val[layer]),
            self.positions.numpy(), self.open[layer].numpy(), self.tail.slot_of.numpy(),
            h(self.tail.k[layer]), h(self.tail.v[layer]), self.sink.slot_of.numpy(),
            self.sink.rows, h(self.sink.k[layer]), h(self.sink.v[layer]), self.sink_tokens,
            self.cos.numpy(), self.sin.numpy())

    # -- what is not supported yet ---------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k_codes": self.k_codes, "v_codes": self.v_codes, "v_zero": self.v_zero,
                "v_scale": self.v_scale, "k_out_idx": self.k_out_idx,
                "k_out_val": self.k_out_val, "v_out_idx": self.v_out_idx,
                "v_out_val": self.v_out_val}

    def copy_rows(self, src_rows: list[int], dst_rows: list[int],
                  plane: Optional[tuple[int, int]] = None) -> None:
        raise NotImplementedError(f"kv_cache_dtype {self.name!r}: rows of a quantized block "
                                  "cannot be compacted (KV compression is not supported with "
                                  "KVQuant formats yet)")

    def export_blocks(self, block_ids: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"kv_cache_dtype {self.name!r}: exporting requests is not "
                                  "supported with KVQuant formats yet")

    def import_blocks(self, block_ids: list[int], data: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError(f"kv_cache_dtype {self.name!r}: importing requests is not "
                                  "supported with KVQuant formats yet")


_CODE_TENSORS = ("k_codes", "v_codes", "k_out_idx", "k_out_val", "v_zero", "v_scale",
                 "v_out_idx", "v_out_val")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, rotate-half convention: x [R, K, D]; cos, sin [R, D] at each row's position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


_CLASSES: dict[str, type[KVQuantKV]] = {}


def format_for(name: str) -> Optional[type[KVQuantKV]]:
    """The class of a KVQuant format name (one per name, made on first use), or None."""
    spec = parse_format_name(name)
    if spec is None:
        return None
    if spec.name != name:
        raise ValueError(f"kv_cache_dtype: write {name!r} as {spec.name!r}")
    if name not in _CLASSES:
        _CLASSES[name] = type(f"KVQuantKV_{spec.kind}{spec.bits}", (KVQuantKV,),
                              {"name": name, "spec": spec})
    return _CLASSES[name]


register_format_family("KVQuant (nuq4|nuq3|nuq2|int4|int3|int2, optional -X% outliers)",
                       format_for)
