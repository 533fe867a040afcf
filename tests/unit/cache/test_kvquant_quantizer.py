"""KVQuant's quantizer against a float64 reference written here element by element."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.cache.kvquant.quantizer import (
    NO_OUTLIER,
    Datatype,
    dequantize,
    fp16_range,
    pack_codes,
    quantize_keys,
    quantize_values,
    uniform_datatype,
    unpack_codes,
)


def _datatype(bits: int, seed: int, uniform: bool) -> Datatype:
    if uniform:
        return uniform_datatype(bits)
    g = torch.Generator().manual_seed(seed)
    levels = torch.sort(torch.rand(1 << bits, generator=g) * 2 - 1).values
    return Datatype(levels, levels * 0.9 + 0.01)  # values != levels, as after Q-Norm


def _ref_code(u: float, levels: np.ndarray) -> int:
    """Nearest level in float64, the lower on ties."""
    dist = np.abs(levels - u)
    return int(np.flatnonzero(dist == dist.min())[0])


def _near_boundary(u: float, levels: np.ndarray, eps: float = 1e-5) -> bool:
    bounds = (levels[1:] + levels[:-1]) / 2
    return bool(np.any(np.abs(bounds - u) < eps))


shapes = st.tuples(st.integers(1, 6), st.integers(1, 3), st.sampled_from([8, 16, 32, 64]))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 3, 4]), num_outliers=st.integers(0, 3),
       seed=st.integers(0, 2**16), uniform=st.booleans())
def test_keys_match_float64_reference(shape, bits, num_outliers, seed, uniform):
    t, k, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, d, generator=g) * 3  # [T, K, D]
    lo = torch.randn(k, d, generator=g) - 2
    hi = lo + torch.rand(k, d, generator=g) * 4 + 0.1
    zero, scale = fp16_range(lo, hi)
    dt = _datatype(bits, seed, uniform)
    codes, idx, val = quantize_keys(x, zero, scale, dt, num_outliers)
    got = dequantize(codes, zero, scale, dt, idx, val)
    xs = x.double().numpy()
    z, s = zero.double().numpy(), scale.double().numpy()
    levels, values = dt.levels.double().numpy(), dt.values.double().numpy()
    for ti in range(t):
        for h in range(k):
            u = (xs[ti, h] - z[h]) / s[h]
            out = [c for c in range(d) if abs(u[c]) > 1]
            out.sort(key=lambda c: (-abs(u[c]), c))
            kept = set(out[:num_outliers])
            assert {int(c) for c in idx[ti, h] if c != NO_OUTLIER} == kept
            assert int((idx[ti, h] != NO_OUTLIER).sum()) == len(kept)
            for c in range(d):
                if c in kept:  # exact in fp16
                    assert got[ti, h, c].item() == np.float16(xs[ti, h, c]).item()
                    continue
                uc = min(max(u[c], -1.0), 1.0)
                if _near_boundary(uc, levels):
                    continue
                code = _ref_code(uc, levels)
                assert int(codes[ti, h, c]) == code
                want = values[code] * s[h, c] + z[h, c]
                assert math.isclose(got[ti, h, c].item(), want, rel_tol=1e-6, abs_tol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bits=st.sampled_from([2, 3, 4]), num_outliers=st.integers(0, 3),
       seed=st.integers(0, 2**16), uniform=st.booleans())
def test_values_match_float64_reference(shape, bits, num_outliers, seed, uniform):
    t, k, d = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, d, generator=g) * torch.rand(t, k, 1, generator=g) * 4
    x[0, 0, 0] = 40.0  # a real outlier
    dt = _datatype(bits, seed, uniform)
    codes, zero, scale, idx, val = quantize_values(x, dt, num_outliers)
    got = dequantize(codes, zero[..., None], scale[..., None], dt, idx, val)
    levels, values = dt.levels.double().numpy(), dt.values.double().numpy()
    for ti in range(t):
        for h in range(k):
            v = x[ti, h].double().numpy()
            srt = np.sort(v)
            # the narrowest range left after removing a lowest and C - a highest elements
            widths = [srt[d - 1 - (num_outliers - a)] - srt[a] for a in range(num_outliers + 1)]
            a = int(np.argmin(widths))
            lo, hi = srt[a], srt[d - 1 - (num_outliers - a)]
            z, s = np.float16((hi + lo) / 2), np.float16((hi - lo) / 2)
            assert zero[ti, h].item() == z.item() and scale[ti, h].item() == s.item()
            kept = [int(c) for c in idx[ti, h]]
            assert len(set(kept)) == num_outliers
            for c in kept:
                assert v[c] <= lo or v[c] >= hi  # removed elements lie outside the range
                assert got[ti, h, c].item() == np.float16(v[c]).item()
            for c in range(d):
                if c in kept:
                    continue
                u = (v[c] - float(z)) / float(s) if s > 0 else 0.0
                u = min(max(u, -1.0), 1.0)
                if _near_boundary(u, levels):
                    continue
                code = _ref_code(u, levels)
                assert int(codes[ti, h, c]) == code
                want = values[code] * float(s) + float(z)
                assert math.isclose(got[ti, h, c].item(), want, rel_tol=1e-6, abs_tol=1e-5)


def test_outliers_keep_the_error_small_where_uniform_rounding_fails():
    x = torch.randn(4, 2, 64, generator=torch.Generator().manual_seed(1))
    x[:, :, 5] = 25.0  # one huge element per vector
    dt = uniform_datatype(3)
    no = quantize_values(x, dt, 0)
    yes = quantize_values(x, dt, 1)
    err_no = (dequantize(no[0], no[1][..., None], no[2][..., None], dt, no[3], no[4]) - x)
    err_yes = (dequantize(yes[0], yes[1][..., None], yes[2][..., None], dt, yes[3], yes[4]) - x)
    assert err_yes.abs().max() < err_no.abs().max() / 5


def test_constant_vector_reads_back_as_itself():
    x = torch.full((1, 1, 16), 0.75)
    dt = uniform_datatype(2)
    codes, zero, scale, idx, val = quantize_values(x, dt, 0)
    assert scale.item() == 0
    got = dequantize(codes, zero[..., None], scale[..., None], dt, idx, val)
    assert torch.equal(got, x)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       d=st.sampled_from([8, 16, 64, 128]), bits=st.sampled_from([2, 3, 4]),
       seed=st.integers(0, 2**16))
def test_pack_roundtrip_and_layout(lead, d, bits, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, d), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (*lead, d * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, d), codes)
    # little-endian bit order: bit i of code j is bit (j*bits + i) of the byte stream
    flat_codes = codes.reshape(-1, d)[0].tolist()
    stream = packed.reshape(-1, d * bits // 8)[0].tolist()
    for j, c in enumerate(flat_codes):
        for i in range(bits):
            p = j * bits + i
            assert (stream[p // 8] >> (p % 8)) & 1 == (c >> i) & 1


def test_pack_refuses_a_ragged_vector():
    with pytest.raises(AssertionError):
        pack_codes(torch.zeros(1, 5, dtype=torch.uint8), 3)


def test_an_outlier_on_channel_0_survives_unused_slots():
    """Regression: unused slots once scattered onto channel 0, erasing its exact outlier."""
    x = torch.zeros(1, 1, 16)
    x[0, 0, 0] = 7.0  # far outside the key range below; the only outlier, two slots
    zero, scale = fp16_range(torch.full((1, 16), -1.0), torch.full((1, 16), 1.0))
    dt = uniform_datatype(3)
    codes, idx, val = quantize_keys(x, zero, scale, dt, 2)
    assert sorted(idx[0, 0].tolist()) == [0, NO_OUTLIER]
    assert dequantize(codes, zero, scale, dt, idx, val)[0, 0, 0].item() == 7.0
