"""The numba decode-attention kernel against paged.decode_attention (gather + SDPA).

Tolerance: both compute fp32 softmax attention; they differ in summation order only, so
|kernel - ref| <= 1e-5 (values are O(1))."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.attention import cpu_decode, paged
from tests.unit.attention.kv_views import layer_kv


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 90), min_size=1, max_size=5), st.sampled_from([1, 2, 4, 16]),
       st.sampled_from([(4, 4), (8, 2), (9, 3)]), st.sampled_from([16, 64]), st.integers(0, 99),
       st.sampled_from(["float32", "float16", "int8"]))
def test_cpu_decode_matches_paged_reference(lens, block_size, heads, d, seed, fmt):
    """fp16 caches (--kv-cache-dtype float16): the reference gathers and widens the same halves,
    so the tolerance is the fp32 one. int8 caches: the reference dequantizes the codes (code *
    scale) before the dot products, the kernel applies the scales to the score and the softmax
    weight; the same values up to fp32 rounding of the products (~1e-6 relative)."""
    g = torch.Generator().manual_seed(seed)
    h, k = heads
    num_blocks = 64
    kc = torch.randn(num_blocks * block_size * 8, k, d, generator=g)[: num_blocks * block_size]
    vc = torch.randn(num_blocks * block_size, k, d, generator=g)
    kv = layer_kv(kc.contiguous(), vc, block_size, fmt)
    nb = (max(lens) + block_size - 1) // block_size
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:  # distinct blocks per request, padded with block 0 like the runner does
        need = (n + block_size - 1) // block_size
        t = [perm[(used + i) % num_blocks] for i in range(need)]
        used += need
        tables.append(t + [0] * (nb - need))
    ids = torch.tensor([b for t in tables for b in t])
    ctx = torch.tensor(lens)
    mask = (torch.arange(nb * block_size)[None, :] < ctx[:, None])[:, None, None, :]
    q = torch.randn(len(lens), h, d, generator=g)
    ref = paged.decode_attention(q, kv, ids, mask, d ** -0.5)
    got = cpu_decode.decode_attention(q, kv.kernel, ids, ctx, block_size, d ** -0.5)
    err = (got - ref).abs().max().item()
    print(f"{fmt}: max abs err {err:.3g}")
    assert err <= 1e-5


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_rows_do_not_depend_on_the_batch(fmt):
    g = torch.Generator().manual_seed(0)
    kv = layer_kv(torch.randn(32 * 16, 3, 64, generator=g),
                  torch.randn(32 * 16, 3, 64, generator=g),
                  16, fmt).kernel
    q = torch.randn(2, 9, 64, generator=g)
    ids = torch.tensor([1, 2, 3, 4, 5, 0])
    both = cpu_decode.decode_attention(q, kv, ids, torch.tensor([40, 10]), 16, 0.125)
    alone = cpu_decode.decode_attention(q[1:], kv, ids[3:4], torch.tensor([10]), 16, 0.125)
    assert torch.equal(both[1], alone[0])


@pytest.mark.parametrize("fmt", ["float32", "int8"])
def test_rows_do_not_depend_on_the_task_split(fmt):
    """Under 4 requests a request's KV heads are split over tasks, from 4 on they are not: the
    same request gives the same bits either way."""
    g = torch.Generator().manual_seed(1)
    kv = layer_kv(torch.randn(64 * 16, 3, 64, generator=g),
                  torch.randn(64 * 16, 3, 64, generator=g),
                  16, fmt).kernel
    lens = torch.tensor([37, 16, 5, 90, 64])
    q = torch.randn(5, 9, 64, generator=g)
    ids = torch.arange(5 * 6).flip(0)  # 6 blocks per request, reversed order
    batch = cpu_decode.decode_attention(q, kv, ids, lens, 16, 0.125)
    for b in range(5):
        alone = cpu_decode.decode_attention(q[b:b + 1], kv, ids[b * 6:(b + 1) * 6],
                                            lens[b:b + 1], 16, 0.125)
        assert torch.equal(batch[b], alone[0]), b


def test_vsum16_equals_sixteen_vsums():
    """simd.vsum16 reduces 16 vectors in the same pairwise order as vsum: bit-identical."""
    import numpy as np
    from numba import njit

    from kvwise.kernels.cpu.simd import vload, vstore, vsum, vsum16

    @njit
    def run(x, tree, single):
        vstore(tree, 0, vsum16(vload(x, 0), vload(x, 16), vload(x, 32), vload(x, 48),
                               vload(x, 64), vload(x, 80), vload(x, 96), vload(x, 112),
                               vload(x, 128), vload(x, 144), vload(x, 160), vload(x, 176),
                               vload(x, 192), vload(x, 208), vload(x, 224), vload(x, 240)))
        for j in range(16):
            single[j] = vsum(vload(x, 16 * j))

    x = (torch.randn(256, generator=torch.Generator().manual_seed(2)) * 1e3).numpy()
    tree, single = np.empty(16, np.float32), np.empty(16, np.float32)
    run(x, tree, single)
    assert np.array_equal(tree, single)
    assert np.allclose(tree, x.reshape(16, 16).astype(np.float64).sum(1), rtol=1e-5, atol=1e-2)


def test_vexp_matches_torch_exp():
    """simd.vexp (the softmax exponential of the kernel) within 4e-7 relative of torch.exp over
    the range softmax feeds it (x - max <= 0), and saturating instead of overflowing above."""
    import numpy as np
    from numba import njit

    from kvwise.kernels.cpu.simd import vexp, vload, vstore

    @njit
    def run(x, out):
        for i in range(0, x.shape[0], 16):
            vstore(out, i, vexp(vload(x, i)))

    x = torch.cat([torch.linspace(-100.0, 0.0, 4096), torch.linspace(0.0, 80.0, 512)])
    out = np.empty(x.shape[0], np.float32)
    run(x.numpy(), out)
    ref = torch.exp(x.double())
    rel = ((torch.from_numpy(out).double() - ref).abs() / ref.clamp_min(1e-38))
    assert rel[x > -87].max() < 4e-7
    assert (torch.from_numpy(out)[x <= -87.3] < 1e-37).all()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(4, 4), (8, 2), (9, 3)]), st.sampled_from([4, 16]),
       st.integers(0, 99), st.sampled_from(["float32", "float16", "int8"]), st.data())
def test_per_head_tables_read_each_heads_own_blocks(batch, heads, block_size, seed, fmt, data):
    """Per-head groups (G = K tables per request, FastGen's layout): KV head h of request b reads
    table b * K + h for lens[b * K + h] positions. Its query heads get exactly the bits of a
    one-table call over that head's table (the same arithmetic), and match the gather + SDPA
    reference; heads of one request keep different numbers of tokens in different blocks."""
    g = torch.Generator().manual_seed(seed)
    h, k = heads
    group = h // k
    num_blocks = 96
    d = 64
    kv = layer_kv(torch.randn(num_blocks * block_size, k, d, generator=g),
                  torch.randn(num_blocks * block_size, k, d, generator=g), block_size, fmt)
    lens = data.draw(st.lists(st.integers(1, 70), min_size=batch * k, max_size=batch * k))
    nb = (max(lens) + block_size - 1) // block_size
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for i, n in enumerate(lens):  # each (request, head) its own blocks, in its own order
        need = (n + block_size - 1) // block_size
        t = [perm[(3 * i + j) % num_blocks] for j in range(need)]
        tables.append(t + [0] * (nb - need))
    ids = torch.tensor([b for t in tables for b in t])
    q = torch.randn(batch, h, d, generator=g)
    got = cpu_decode.decode_attention(q, kv.kernel, ids, torch.tensor(lens), block_size,
                                      d ** -0.5)
    for b in range(batch):
        for kh in range(k):
            t = tables[b * k + kh]
            n = lens[b * k + kh]
            one = cpu_decode.decode_attention(q[b:b + 1], kv.kernel, torch.tensor(t),
                                              torch.tensor([n]), block_size, d ** -0.5)
            heads_of = slice(kh * group, (kh + 1) * group)
            assert torch.equal(got[b, heads_of], one[0, heads_of]), (b, kh)
            mask = (torch.arange(nb * block_size) < n)[None, None, None, :]
            ref = paged.decode_attention(q[b:b + 1], kv, torch.tensor(t), mask, d ** -0.5)
            assert (got[b, heads_of] - ref[0, heads_of]).abs().max().item() <= 1e-5
