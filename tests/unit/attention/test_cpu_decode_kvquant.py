"""The KVQuant CPU decode kernel against the store's own reading (KVQuantKV.gather_rows) and a
float64 softmax attention, and its batch / thread invariance; the SIMD pieces it adds.

Tolerance: the kernel dequantizes and rotates in fp32 with FMAs and sums in a different order
than the reference, which reads the same stored codes, outliers, sink and tail rows; outputs
are O(1), so |kernel - ref| <= 1e-4 * max|ref| (observed ~1e-6)."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from unittest import mock

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
from kvwise.cache.kvquant.quantizer import NO_OUTLIER, pack_codes
from kvwise.kernels.cpu import simd
from kvwise.kernels.cpu.features import cpu_features
from kvwise.kv_names import parse_format_name
from kvwise.model.rope import rope_tables

FORMATS = ["nuq3-1%", "nuq2", "int4", "nuq4-5%", "int3"]
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


def _dequantize_exact(codes, zero, scale, dt, out_idx, out_val):
    """kvwise.cache.kvquant.quantizer.dequantize as its docstring defines it. That function
    scatters an unused outlier slot's current value back to channel 0, after the used slots
    (NO_OUTLIER maps to index 0), so a key outlier at channel 0 of a row that also has an
    unused slot reads its clamped value there; here unused slots go to a spare column."""
    x = dt.values[codes.long()] * scale.float() + zero.float()
    if out_idx.shape[-1]:
        d = x.shape[-1]
        ch = torch.where(out_idx != NO_OUTLIER, out_idx.long(),
                         torch.full_like(out_idx, d, dtype=torch.long))
        x = torch.cat([x, torch.zeros_like(x[..., :1])], -1).scatter(-1, ch, out_val.float())
        x = x[..., :d]
    return x


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
    """float64 softmax attention over the rows as `store.gather_rows` reads them."""
    out = []
    h = q.shape[1]
    for b, (table, n) in enumerate(zip(tables, lens)):
        rows = torch.tensor([table[p // S] * S + p % S for p in range(n)])
        with mock.patch("kvwise.cache.kvquant_kv.dequantize", _dequantize_exact):
            k, v = store.gather_rows(layer, rows)  # [n, K, D] rotated, fp32
        group = h // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v.double().repeat_interleave(group, dim=1)
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
