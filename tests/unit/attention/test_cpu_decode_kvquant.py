"""The KVQuant CPU decode kernel against a float64 reference over the same stored KV
(quantizer.dequantize -> RoPE -> softmax attention, all after the dequantize in float64), and
its batch / thread invariance; the SIMD pieces it adds.

Tolerance: the kernel dequantizes and rotates in fp32 with FMAs and sums in a different order
than the reference, which reads the same stored codes, outliers, sink and tail rows; outputs
are O(1), so |kernel - ref| <= 1e-4 * max|ref| (observed ~1e-6).

Compile time: the kernel is one numba specialization for every code width and head dim (a
cold compile is ~25 s of CPU), so these tests compile it once."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from kvwise.attention import cpu_decode_kvquant
from kvwise.attention.cpu_decode_kvquant import decode_attention_kvquant
from kvwise.cache.kv_store import make_kv_store
from kvwise.cache.kvquant.calibration import LayerActivations, fit_calibration
from kvwise.cache.kvquant.quantizer import (
    NO_OUTLIER,
    Datatype,
    dequantize,
    pack_codes,
    unpack_codes,
)
from kvwise.cache.kvquant_kv import KVQuantArrays
from kvwise.kernels.cpu import simd
from kvwise.kernels.cpu.features import cpu_features
from kvwise.kv_names import parse_format_name
from kvwise.model.rope import rope_tables

# 4, 3, 2 bits; no outliers, 1% and 5% (d = 16: 1 or 2 key slots, so rows with unused slots)
FORMATS = ["nuq3-1%", "nuq2", "int4", "nuq4-5%", "int3", "int2-5%"]
HEADS = [(3, 1), (9, 3), (4, 4), (8, 2)]  # (H, K)
S = 4  # block size: requests of 1 .. 3 blocks and more
LAYERS = 2
COS, SIN = rope_tables(64, 10000.0, None, 64, torch.float32, torch.device("cpu"))


@functools.cache
def _calibration(num_kv_heads: int, head_dim: int):
    g = torch.Generator().manual_seed(0)
    k, d = num_kv_heads, head_dim
    layers = [LayerActivations(torch.randn(2, 32, k, d, generator=g) * 2,
                               torch.randn(2, 32, k, d, generator=g),
                               torch.rand(2, 32, k, d, generator=g),
                               torch.rand(2, 32, k, d, generator=g))
              for _ in range(LAYERS)]
    ident = {"model": "t", "num_layers": LAYERS, "num_kv_heads": k, "head_dim": d}
    return fit_calibration(layers, [parse_format_name(n) for n in FORMATS], seed=0,
                           model_identity=ident, source={})


def _f16(x: np.ndarray) -> torch.Tensor:
    """fp16 bits (uint16, as KVQuantArrays holds them) -> a float16 tensor."""
    return torch.from_numpy(np.ascontiguousarray(x).view(np.float16))


def _read_rows(a: KVQuantArrays, rows: list[int], block_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 k (rotated), v [n, K, D] of these rows as KVQuantArrays defines them: codes
    through quantizer.dequantize (unused outlier slots included), replaced by the fp16 tail row
    of an open block or the sink row, then RoPE (rotate-half) at the row's position."""
    t = torch.from_numpy
    r = torch.tensor(rows)
    d = a.k_zero.shape[1]
    k_dt = Datatype(t(a.k_values), t(a.k_values))
    v_dt = Datatype(t(a.v_values), t(a.v_values))
    k = dequantize(unpack_codes(t(a.k_codes)[r], a.bits, d), t(a.k_zero), t(a.k_scale), k_dt,
                   t(a.k_out_idx)[r], _f16(a.k_out_val)[r]).double()  # [n, K, D] pre-RoPE
    v = dequantize(unpack_codes(t(a.v_codes)[r], a.bits, d), _f16(a.v_zero)[r][..., None],
                   _f16(a.v_scale)[r][..., None], v_dt, t(a.v_out_idx)[r],
                   _f16(a.v_out_val)[r]).double()
    for i, row in enumerate(rows):
        b, off = divmod(row, block_size)
        if a.open[b]:
            src, pk, pv = a.tail_slot[b] * block_size + off, a.tail_k, a.tail_v
        elif a.sink_slot[b] >= 0 and a.positions[row] < a.sink_tokens and off < a.sink_rows:
            src, pk, pv = a.sink_slot[b] * a.sink_rows + off, a.sink_k, a.sink_v
        else:
            continue
        k[i], v[i] = _f16(pk[src]).double(), _f16(pv[src]).double()
    pos = torch.from_numpy(a.positions[rows])
    cos, sin = t(a.cos).double()[pos][:, None], t(a.sin).double()[pos][:, None]  # [n, 1, D]
    h = d // 2
    k = k * cos + torch.cat([-k[..., h:], k[..., :h]], dim=-1) * sin
    return k, v


def _build(fmt, heads, d, lens, sink, seal, seed):
    """A store with one request per length (blocks from a shuffled pool), every layer written
    through `store.write` in one or two chunks and the full blocks sealed where `seal` says
    (an unsealed full block reads fp16 from its tail, like a block filled this step); the
    last, partial block stays open. -> store, block tables, padded block ids."""
    h, k = heads
    shape = SimpleNamespace(num_layers=LAYERS, num_kv_heads=k, head_dim=d)
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // S) for n in lens) + 2
    cos, sin = COS[:, :d].contiguous(), SIN[:, :d].contiguous()
    if d != COS.shape[1]:
        cos, sin = rope_tables(d, 10000.0, None, 64, torch.float32, torch.device("cpu"))
    store = make_kv_store(fmt, shape, num_blocks, S, torch.float32, torch.device("cpu"),
                          calibration=_calibration(k, d), sink_tokens=sink, rope=(cos, sin),
                          max_num_seqs=2)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for i, n in enumerate(lens):
        table = perm[used:used + -(-n // S)]
        used += len(table)
        tables.append(table)
        slots = torch.tensor([table[p // S] * S + p % S for p in range(n)])
        pos = torch.arange(n)
        cut = int(torch.randint(0, n + 1, (1,), generator=g))
        ks = torch.randn(LAYERS, n, k, d, generator=g) * 2
        vs = torch.randn(LAYERS, n, k, d, generator=g)
        for part in (slice(0, cut), slice(cut, n)):  # e.g. a chunked prefill
            if part.stop > part.start:
                for layer in range(LAYERS):
                    store.write(layer, slots[part], ks[layer, part], vs[layer, part], pos[part])
        if seal[i % len(seal)]:
            store.seal(table[:n // S])
    nb = max(len(t) for t in tables)
    ids = torch.tensor([b for t in tables for b in t + [0] * (nb - len(t))])
    return store, tables, ids


def _reference(store, layer, q, tables, lens, scale):
    """float64 softmax attention over `_read_rows`; its rows are checked against the store's
    own reading (KVQuantKV.gather_rows, fp32) on the way, so the two definitions agree."""
    arrays = store.kernel_arrays(layer)
    out = []
    h = q.shape[1]
    for b, (table, n) in enumerate(zip(tables, lens)):
        rows = [table[p // S] * S + p % S for p in range(n)]
        k, v = _read_rows(arrays, rows, S)  # [n, K, D] float64
        k32, v32 = store.gather_rows(layer, torch.tensor(rows))
        assert (k - k32.double()).abs().max() <= 1e-5 * max(1.0, k.abs().max().item())
        assert (v - v32.double()).abs().max() <= 1e-5 * max(1.0, v.abs().max().item())
        group = h // k.shape[1]
        k = k.repeat_interleave(group, dim=1)  # [n, H, D]
        v = v.repeat_interleave(group, dim=1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, dim=-1)
        out.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(out)  # [B, H, D]


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS), heads=st.sampled_from(HEADS), d=st.sampled_from([16, 64]),
       lens=st.lists(st.integers(1, 3 * S + 3), min_size=1, max_size=5),
       sink=st.integers(0, 2), seal=st.lists(st.booleans(), min_size=1, max_size=3),
       seed=st.integers(0, 99))
def test_kernel_matches_the_store_reference(fmt, heads, d, lens, sink, seal, seed):
    """Open blocks (the partial last one; full ones left unsealed), sealed blocks with outliers
    and sink rows, GQA groups of 1..4 query heads, head dims on both rotation paths."""
    store, tables, ids = _build(fmt, heads, d, lens, sink, seal, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(lens), heads[0], d, generator=g)
    scale = d ** -0.5
    for layer in range(LAYERS):
        got = decode_attention_kvquant(q, store.kernel_arrays(layer), ids, torch.tensor(lens),
                                       S, scale)
        ref = _reference(store, layer, q, tables, lens, scale)
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        print(f"{fmt} {heads} D={d} layer {layer}: max rel err {err:.2e}")
        assert err <= 1e-4


def test_a_key_outlier_on_channel_0_beside_an_unused_slot():
    """Rows whose one key outlier is on channel 0 and whose other slot is unused (NO_OUTLIER):
    the kernel reads the outlier exactly, as the fixed quantizer.dequantize does (the bug of
    19fa544: unused slots were written to channel 0, so it read back clamped)."""
    d, n = 16, 2 * S
    shape = SimpleNamespace(num_layers=LAYERS, num_kv_heads=1, head_dim=d)
    cos, sin = rope_tables(d, 10000.0, None, 64, torch.float32, torch.device("cpu"))
    store = make_kv_store("nuq4-5%", shape, 3, S, torch.float32, torch.device("cpu"),
                          calibration=_calibration(1, d), sink_tokens=0, rope=(cos, sin),
                          max_num_seqs=2)
    g = torch.Generator().manual_seed(7)
    slots, pos = torch.arange(n), torch.arange(n)
    for layer in range(LAYERS):
        t = store.tables[layer]
        k = (t.k_zero.float() + 0.5 * t.k_scale.float()).expand(n, 1, d).clone()  # in range
        k[:, 0, 0] = t.k_zero[0, 0].float() + 7.0 * t.k_scale[0, 0].float()
        store.write(layer, slots, k, torch.randn(n, 1, d, generator=g), pos)
    store.seal([0, 1])
    q = torch.randn(1, 3, d, generator=g) * 2.0
    for layer in range(LAYERS):
        arrays = store.kernel_arrays(layer)
        assert arrays.k_out_idx.shape[2] == 2
        assert (arrays.k_out_idx[:n, 0, 0] == 0).all()
        assert (arrays.k_out_idx[:n, 0, 1] == NO_OUTLIER).all()
        t = store.tables[layer]
        k0 = t.k_zero[0, 0].float() + 7.0 * t.k_scale[0, 0].float()  # as written above
        k_read, _ = _read_rows(arrays, [0], S)  # position 0: RoPE is the identity
        assert k_read[0, 0, 0].item() == k0.half().item()
        got = decode_attention_kvquant(q, arrays, torch.tensor([0, 1]), torch.tensor([n]), S,
                                       d ** -0.5)
        ref = _reference(store, layer, q, [[0, 1]], [n], d ** -0.5)
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        assert err <= 1e-4, err


def test_a_request_alone_equals_it_in_a_batch():
    """Five requests (one task each) and each alone (split over its KV heads): same bits."""
    lens = [13, 1, 9, 16, 6]
    store, tables, ids = _build("nuq4-5%", (9, 3), 64, lens, 1, [True, False], 3)
    arrays = store.kernel_arrays(1)
    q = torch.randn(5, 9, 64, generator=torch.Generator().manual_seed(4))
    nb = ids.shape[0] // 5
    batch = decode_attention_kvquant(q, arrays, ids, torch.tensor(lens), S, 0.125)
    for b in range(5):
        alone = decode_attention_kvquant(q[b:b + 1], arrays, ids[b * nb:(b + 1) * nb],
                                         torch.tensor(lens[b:b + 1]), S, 0.125)
        assert torch.equal(batch[b], alone[0]), b


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one numba thread")
def test_thread_count_does_not_change_the_bits():
    lens = [11, 7, 16, 3]
    store, _, ids = _build("nuq3-1%", (8, 2), 64, lens, 2, [True], 5)
    arrays = store.kernel_arrays(0)
    q = torch.randn(4, 8, 64, generator=torch.Generator().manual_seed(6))
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            outs.append(decode_attention_kvquant(q, arrays, ids, torch.tensor(lens), S, 0.125))
    finally:
        numba.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_warmup_compiles():
    cpu_decode_kvquant.warmup()
    cpu_decode_kvquant.warmup(2)  # the same specialization: no second compile


# -- the SIMD pieces ------------------------------------------------------------------------------

@njit
def _lut_all(table, packed, out, bits, strategy):
    t = simd.vload(table, 0)
    for g in range(out.shape[0] // 16):
        if bits == 4:
            o = g * 8
            if strategy == 0:
                v = simd.vload_lut(t, packed, o, 4)
            elif strategy == 1:
                v = simd.vload_lut_avx2(t, packed, o, 4)
            else:
                v = simd.vload_lut_generic(t, packed, o, 4)
        elif bits == 3:
            o = g * 6
            if strategy == 0:
                v = simd.vload_lut(t, packed, o, 3)
            elif strategy == 1:
                v = simd.vload_lut_avx2(t, packed, o, 3)
            else:
                v = simd.vload_lut_generic(t, packed, o, 3)
        else:
            o = g * 4
            if strategy == 0:
                v = simd.vload_lut(t, packed, o, 2)
            elif strategy == 1:
                v = simd.vload_lut_avx2(t, packed, o, 2)
            else:
                v = simd.vload_lut_generic(t, packed, o, 2)
        simd.vstore(out, g * 16, v)


@njit
def _lut_portable(table, packed, out, bits):
    t = simd.vload(table, 0)
    for g in range(out.shape[0] // 16):
        if bits == 4:
            v = simd.vload_lut_generic(t, packed, g * 8, 4)
        elif bits == 3:
            v = simd.vload_lut_generic(t, packed, g * 6, 3)
        else:
            v = simd.vload_lut_generic(t, packed, g * 4, 2)
        simd.vstore(out, g * 16, v)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_vload_lut_every_strategy_reads_the_packed_codes(bits):
    """simd.vload_lut (vpermps on AVX-512), its AVX2 form (two ymm permutes and a blend, run
    where the CPU as capped has AVX2) and the portable lane-by-lane form all give
    table[code] for codes packed as quantizer.pack_codes packs them."""
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (128,), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits).numpy()
    values = np.sort(torch.randn(1 << bits, generator=g).numpy())
    table = np.tile(values, 16 >> bits).astype(np.float32)
    want = values[codes.numpy()]
    out = np.empty(128, np.float32)
    _lut_portable(table, packed, out, bits)
    assert np.array_equal(out, want)
    strategies = [0, 1] if cpu_features().avx2 else [0]
    for strategy in strategies:
        out[:] = 0
        _lut_all(table, packed, out, bits, strategy)
        assert np.array_equal(out, want), (simd.LUT_STRATEGY, strategy)


@njit
def _put(x, base, index, value, out):
    simd.vstore(out, 0, simd.vput(simd.vload(x, 0), base, index, value))


@pytest.mark.parametrize("base,index", [(0, 0), (0, 15), (16, 20), (16, 15), (32, 48), (0, 255)])
def test_vput_sets_the_lane_whose_number_is_index(base, index):
    x = np.arange(16, dtype=np.float32)
    out = np.empty(16, np.float32)
    _put(x, base, index, np.float32(-7.5), out)
    want = x.copy()
    if 0 <= index - base < 16:
        want[index - base] = -7.5
    assert np.array_equal(out, want)


def test_vfnma():
    @njit
    def run(a, b, c, out):
        simd.vstore(out, 0, simd.vfnma(simd.vload(a, 0), simd.vload(b, 0), simd.vload(c, 0)))

    a, b, c = (np.random.default_rng(i).standard_normal(16).astype(np.float32) for i in range(3))
    out = np.empty(16, np.float32)
    run(a, b, c, out)
    np.testing.assert_allclose(out, c - a * b, rtol=1e-6, atol=1e-6)
