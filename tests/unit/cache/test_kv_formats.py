"""KV formats (kvwise.cache.kv_store registry): sizes, the write/read contract, int8 codes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.cache.int8_kv import KERNEL_WRITE_MAX_TOKENS
from kvwise.cache.kv_store import available_formats, format_class, make_kv_store
from kvwise.config import KV_CACHE_DTYPES
from kvwise.kernels.cpu import kv_rows

SHAPE = SimpleNamespace(num_layers=2, num_kv_heads=3, head_dim=64)
CPU = torch.device("cpu")


def test_registry_matches_config_names():
    assert sorted(n for n in KV_CACHE_DTYPES if n != "auto") == available_formats()
    for bad in ("int5", "fp8", "nuq8"):
        with pytest.raises(ValueError, match=f"kv_cache_dtype: unknown '{bad}'"):
            format_class(bad)


@pytest.mark.parametrize("fmt,elem_bytes", [("float32", 4 * 64), ("float16", 2 * 64),
                                            ("bfloat16", 2 * 64), ("int8", 64 + 2)])
def test_bytes_per_block(fmt, elem_bytes):
    """L * S * K * (K and V) * bytes per head row; int8 adds one fp16 scale per row."""
    store = make_kv_store(fmt, SHAPE, 5, 16, torch.float32, CPU)
    assert store.bytes_per_block == 2 * 16 * 3 * 2 * elem_bytes
    assert sum(t.element_size() * t.numel() for t in store.tensors().values()) == \
        5 * store.bytes_per_block


@pytest.mark.parametrize("fmt", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("num_tokens", [3, KERNEL_WRITE_MAX_TOKENS + 7])
def test_write_returns_what_readers_see(fmt, num_tokens):
    """The invariant backends rely on: `write`'s fresh rows == the rows read back later."""
    store = make_kv_store(fmt, SHAPE, 8, 16, torch.float32, CPU)
    g = torch.Generator().manual_seed(num_tokens)
    slots = torch.randperm(8 * 16, generator=g)[:num_tokens]
    k = torch.randn(num_tokens, 3, 64, generator=g)
    v = torch.randn(num_tokens, 3, 64, generator=g)
    k_seen, v_seen = store.write(1, slots, k, v)
    k_back, v_back = store.gather_rows(1, slots)
    assert torch.equal(k_seen, k_back) and torch.equal(v_seen, v_back)
    if fmt == "float32":
        assert torch.equal(k_seen, k)
    blocks = torch.unique(slots // 16)
    kb, _ = store.gather_blocks(1, blocks)
    rows = (blocks[:, None] * 16 + torch.arange(16)).reshape(-1)
    assert torch.equal(kb, store.gather_rows(1, rows)[0])
    assert torch.count_nonzero(store.gather_rows(0, slots)[0]) == 0  # other layers untouched


_values = st.sampled_from([0.0, 1e-30, 1e-7, 1e-3, 1.0, 7.5, 300.0, 6e4])


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.sampled_from([1, 3, 8]), st.sampled_from([16, 64, 128]), _values,
       st.integers(0, 10_000), st.booleans())
def test_int8_kernel_and_torch_codes_are_identical(t, kh, d, magnitude, seed, zero_row):
    """numba quantize_rows == quantize_int8_reference bit for bit (codes and fp16 scales), for
    tiny (subnormal-scale), zero, ordinary and huge rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, kh, d, generator=g) * magnitude
    if zero_row:
        x[0, 0] = 0.0
    codes_ref, scale_ref = kv_rows.quantize_int8_reference(x)
    rows = np.random.default_rng(seed).permutation(2 * t)[:t]
    codes = np.zeros((2 * t, kh, d), np.int8)
    scales = np.zeros((2 * t, kh), np.uint16)
    kv_rows.quantize_rows(x.numpy(), rows, codes, scales)
    assert np.array_equal(codes[rows], codes_ref.numpy())
    assert np.array_equal(scales[rows], scale_ref.numpy().view(np.uint16))
    # round-to-nearest with the stored scale: half a step, plus (rows so small that the fp16
    # scale is subnormal or 0) an absolute 127 * 2**-24 for the clamped / flushed codes
    back = kv_rows.dequantize_int8_reference(codes_ref, scale_ref)
    bound = scale_ref.float()[..., None] * 0.5 * (1 + 1e-3) + 127 * 2.0 ** -24
    assert ((back - x).abs() <= bound).all()


def test_int8_all_zero_rows_store_zero():
    codes, scale = kv_rows.quantize_int8_reference(torch.zeros(2, 3, 64))
    assert not codes.any() and not scale.float().any()


def test_int8_writes_small_and_large_steps_store_the_same_bytes():
    """Small steps quantize with the numba kernel, large ones with torch ops: same tensors."""
    g = torch.Generator().manual_seed(0)
    n = KERNEL_WRITE_MAX_TOKENS * 2
    k, v = torch.randn(n, 3, 64, generator=g), torch.randn(n, 3, 64, generator=g)
    slots = torch.arange(n)
    big = make_kv_store("int8", SHAPE, 8, 16, torch.float32, CPU)
    big.write(0, slots, k, v)
    small = make_kv_store("int8", SHAPE, 8, 16, torch.float32, CPU)
    for i in range(0, n, 5):
        small.write(0, slots[i:i + 5], k[i:i + 5], v[i:i + 5])
    for name, t in big.tensors().items():
        assert torch.equal(t, small.tensors()[name]), name


@pytest.mark.parametrize("fmt", available_formats())
def test_export_import_round_trip(fmt):
    a = make_kv_store(fmt, SHAPE, 6, 4, torch.float32, CPU)
    g = torch.Generator().manual_seed(3)
    a.write(0, torch.arange(24), torch.randn(24, 3, 64, generator=g),
            torch.randn(24, 3, 64, generator=g))
    data = a.export_blocks([4, 1])
    b = make_kv_store(fmt, SHAPE, 6, 4, torch.float32, CPU)
    b.import_blocks([0, 5], data)
    rows_a = torch.tensor([16, 17, 18, 19, 4, 5, 6, 7])
    rows_b = torch.tensor([0, 1, 2, 3, 20, 21, 22, 23])
    assert torch.equal(a.gather_rows(0, rows_a)[0], b.gather_rows(0, rows_b)[0])
    bad = dict(data)
    name = sorted(bad)[0]
    bad[name] = bad[name][:, :-1]
    with pytest.raises(ValueError, match="KV import"):
        b.import_blocks([2, 3], bad)
    other = "int8" if fmt != "int8" else "float32"
    with pytest.raises(ValueError, match="KV import"):
        make_kv_store(other, SHAPE, 6, 4, torch.float32, CPU).import_blocks([0, 1], data)


@pytest.mark.parametrize("fmt", available_formats())
def test_copy_rows_moves_stored_bytes(fmt):
    """Compaction copies rows as stored, all planes or one (layer, head), sources first."""
    store = make_kv_store(fmt, SHAPE, 4, 4, torch.float32, CPU)
    g = torch.Generator().manual_seed(5)
    store.write(0, torch.arange(16), torch.randn(16, 3, 64, generator=g),
                torch.randn(16, 3, 64, generator=g))
    store.write(1, torch.arange(16), torch.randn(16, 3, 64, generator=g),
                torch.randn(16, 3, 64, generator=g))
    before = {n: t.clone() for n, t in store.tensors().items()}
    store.copy_rows([5, 6, 7], [4, 5, 6])  # overlapping: a shift by one row
    for n, t in store.tensors().items():
        assert torch.equal(t[:, 4:7], before[n][:, 5:8]), n
        assert torch.equal(t[:, 7:], before[n][:, 7:]), n
    store.copy_rows([12], [0], plane=(1, 2))
    for n, t in store.tensors().items():
        assert torch.equal(t[1, 0, 2], before[n][1, 12, 2]), n
        assert torch.equal(t[1, 0, :2], before[n][1, 0, :2]), n
        assert torch.equal(t[0, 0], before[n][0, 0]), n
