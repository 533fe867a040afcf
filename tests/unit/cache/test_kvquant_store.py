"""The KVQuant KV format: open tail, seal-on-full quantization, sink, RoPE on read, sizing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.cache.kv_store import format_class, make_kv_store
from kvwise.cache.kvquant.calibration import LayerActivations, fit_calibration
from kvwise.cache.kvquant.quantizer import dequantize, quantize_keys, quantize_values
from kvwise.kv_names import parse_format_name
from kvwise.model.rope import apply_rope, rope_tables

SHAPE = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
S = 4  # block size
FORMATS = ["nuq3-1%", "nuq2", "int4", "nuq4-5%"]


def _calibration(names):
    g = torch.Generator().manual_seed(0)
    k, d = SHAPE.num_kv_heads, SHAPE.head_dim
    layers = [LayerActivations(torch.randn(2, 32, k, d, generator=g) * 2,
                               torch.randn(2, 32, k, d, generator=g),
                               torch.rand(2, 32, k, d, generator=g),
                               torch.rand(2, 32, k, d, generator=g))
              for _ in range(SHAPE.num_layers)]
    ident = {"model": "t", "num_layers": SHAPE.num_layers, "num_kv_heads": k, "head_dim": d}
    return fit_calibration(layers, [parse_format_name(n) for n in names], seed=0,
                           model_identity=ident, source={})


CAL = _calibration(FORMATS)
COS, SIN = rope_tables(SHAPE.head_dim, 10000.0, None, 256, torch.float32, torch.device("cpu"))


def _store(name, num_blocks=8, sink=1, max_num_seqs=2):
    return make_kv_store(name, SHAPE, num_blocks, S, torch.float32, torch.device("cpu"),
                         calibration=CAL, sink_tokens=sink, rope=(COS, SIN),
                         max_num_seqs=max_num_seqs)


def _write_all_layers(store, slots, positions, ks, vs):
    """Write per layer like the model does; -> what each layer's write returned."""
    return [store.write(i, slots, ks[i], vs[i], positions) for i in range(store.num_layers)]


def _kv(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(SHAPE.num_layers, t, SHAPE.num_kv_heads, SHAPE.head_dim, generator=g) * 2
    return k, torch.randn(k.shape, generator=g)


def _expected(store, layer, k, v, positions, quantized, sink_rows):
    """Rows as a reader must see them: fp16 (open or sink) or the quantizer's round trip."""
    t = store.tables[layer]
    k16, v16 = k.half().float(), v.half().float()
    if quantized:
        kc, ki, kv_ = quantize_keys(k16, t.k_zero, t.k_scale, t.k_dtype, store.num_k_outliers)
        vc, vz, vsc, vi, vv = quantize_values(v16, t.v_dtype, store.num_v_outliers)
        kq = dequantize(kc, t.k_zero, t.k_scale, t.k_dtype, ki, kv_)
        vq = dequantize(vc, vz[..., None], vsc[..., None], t.v_dtype, vi, vv)
        keep = torch.tensor(sink_rows, dtype=torch.bool)[:, None, None]
        k16, v16 = torch.where(keep, k16, kq), torch.where(keep, v16, vq)
    return apply_rope(k16, COS[positions], SIN[positions]), v16


@pytest.mark.parametrize("name", FORMATS)
def test_open_block_reads_fp16_then_quantized_once_sealed(name):
    store = _store(name)
    k, v = _kv(S)
    slots = torch.tensor([8, 9, 10])  # block 2, not full
    pos = torch.tensor([0, 1, 2])
    outs = _write_all_layers(store, slots, pos, k[:, :3], v[:, :3])
    for i in range(store.num_layers):
        want = _expected(store, i, k[i, :3], v[i, :3], pos, False, [])
        assert torch.equal(outs[i][0], want[0]) and torch.equal(outs[i][1], want[1])
    assert store.tail.num_used == 1 and store.sink.num_used == 0
    _write_all_layers(store, torch.tensor([11]), torch.tensor([3]), k[:, 3:], v[:, 3:])
    rows = torch.arange(8, 12)
    before = [store.gather_rows(i, rows) for i in range(store.num_layers)]
    sealed_view = [store.gather_rows_sealed(i, rows) for i in range(store.num_layers)]
    store.seal([2])  # full and committed: every reader now sees the codes (row 0: sink)
    assert store.tail.num_used == 0 and store.sink.num_used == 1
    for i in range(store.num_layers):
        fp16 = _expected(store, i, k[i], v[i], torch.arange(4), False, [])
        assert torch.equal(before[i][0], fp16[0]) and torch.equal(before[i][1], fp16[1])
        got = store.gather_rows(i, rows)
        want = _expected(store, i, k[i], v[i], torch.arange(4), True, [True, False, False, False])
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
        # what a later block saw before the seal is exactly what everyone reads after it
        assert torch.equal(sealed_view[i][0], got[0]) and torch.equal(sealed_view[i][1], got[1])


def _seal_full(store, slots):
    """What commit does after a step: seal the blocks whose last row is written."""
    full = sorted({int(r) // S for r in slots if int(r) % S == S - 1})
    store.seal(full)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(FORMATS), n=st.integers(1, 3 * S), cut=st.integers(0, 3 * S),
       sink=st.integers(0, 2))
def test_chunked_writes_read_like_one_write(name, n, cut, sink):
    """A prompt written in one step or in two (chunked prefill), full blocks sealed after each
    step: every row reads the same; a row's sealed view never changes when it is sealed."""
    cut = min(cut, n)
    k, v = _kv(n, seed=n)
    pos = torch.arange(n)
    slots = torch.arange(S, S + n)  # blocks 1.. of the pool, position 0 at offset 0
    one, two = _store(name, sink=sink), _store(name, sink=sink)
    _write_all_layers(one, slots, pos, k, v)
    views = [one.gather_rows_sealed(i, slots) for i in range(SHAPE.num_layers)]
    _seal_full(one, slots)
    for p in (slice(0, cut), slice(cut, n)):
        if p.stop > p.start:
            _write_all_layers(two, slots[p], pos[p], k[:, p], v[:, p])
            _seal_full(two, slots[p])
    for i in range(SHAPE.num_layers):
        a, b = one.gather_rows(i, slots), two.gather_rows(i, slots)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        full_rows = (slots - S) < (n // S) * S  # rows of full (sealed) blocks
        assert torch.equal(views[i][0][full_rows], a[0][full_rows])
        assert torch.equal(views[i][1][full_rows], a[1][full_rows])


def test_release_and_rewrite_drop_side_entries():
    store = _store("nuq3-1%")
    k, v = _kv(S)
    _write_all_layers(store, torch.arange(0, S), torch.arange(S), k, v)  # block 0: full, sink
    store.seal([0])
    _write_all_layers(store, torch.tensor([4]), torch.tensor([4]), k[:, :1], v[:, :1])
    assert store.sink.num_used == 1 and store.tail.num_used == 1
    store.release([1])  # the KV manager freed the open block 1
    assert store.tail.num_used == 0
    # block 0 reused by a request whose first row there is at position 8: no sink any more
    _write_all_layers(store, torch.tensor([0]), torch.tensor([8]), k[:, :1], v[:, :1])
    assert store.sink.num_used == 0 and store.tail.num_used == 1


def test_side_pools_grow_past_their_reservation():
    store = _store("nuq2", num_blocks=16, max_num_seqs=1)
    k, v = _kv(5)
    for b in range(5):  # five open blocks at once
        _write_all_layers(store, torch.tensor([b * S]), torch.tensor([b * S + 1]),
                          k[:, b:b + 1], v[:, b:b + 1])
    assert store.tail.num_used == 5 and store.tail.capacity >= 5
    for b in range(5):
        got = store.gather_rows(1, torch.tensor([b * S]))
        want = _expected(store, 1, k[1, b:b + 1], v[1, b:b + 1], torch.tensor([b * S + 1]),
                         False, [])
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("name", FORMATS)
def test_block_bytes_count_the_storage(name):
    store = _store(name, num_blocks=6)
    per_block = sum(t.numel() * t.element_size() for t in store.tensors().values()) / 6
    per_block += store.positions.numel() * store.positions.element_size() / 6
    assert per_block == format_class(name).block_bytes(SHAPE, S)


def test_bytes_per_token_against_fp16():
    shape = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    fp16 = format_class("float16").block_bytes(shape, 16)
    ratios = {n: fp16 / format_class(n).block_bytes(shape, 16)
              for n in ("nuq4-1%", "nuq3-1%", "nuq2-1%", "nuq3", "int2")}
    assert 3.2 < ratios["nuq4-1%"] < 3.8  # the paper: 3.7x with D = 128 (fewer bytes of ranges)
    assert 4.0 < ratios["nuq3-1%"] < 4.8  # the 4x capacity target
    assert ratios["nuq2-1%"] > 5.5 and ratios["int2"] > ratios["nuq2-1%"]


def test_bad_names_and_missing_calibration():
    with pytest.raises(ValueError, match="unknown"):
        format_class("nuq5")
    with pytest.raises(ValueError, match="write"):
        format_class("nuq3-1.0%")
    with pytest.raises(ValueError, match="calibration"):
        make_kv_store("nuq3", SHAPE, 4, S, torch.float32, torch.device("cpu"),
                      rope=(COS, SIN))
    with pytest.raises(ValueError, match="no tables"):
        make_kv_store("nuq3-0.5%", SHAPE, 4, S, torch.float32, torch.device("cpu"),
                      calibration=CAL, rope=(COS, SIN))
