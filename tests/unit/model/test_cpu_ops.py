"""cpu_ops.rms_norm against F.rms_norm (fp32; tolerance 1e-5 relative: summation order only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvwise.model import cpu_ops


@pytest.mark.parametrize("t", [1, 3, 64, 200])
@pytest.mark.parametrize("e", [8, 576, 1000])
def test_rms_norm_matches_torch(t, e):
    g = torch.Generator().manual_seed(t * e)
    x = torch.randn(t, e, generator=g) * 3
    w = torch.randn(e, generator=g)
    ref = F.rms_norm(x, (e,), w, 1e-5)
    got = cpu_ops.rms_norm(x, w, 1e-5)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    # a row's value does not depend on the other rows (serial and parallel paths agree)
    assert torch.equal(cpu_ops.rms_norm(x[-1:].contiguous(), w, 1e-5)[0], got[-1])


def test_rms_norm_falls_back_for_other_dtypes():
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    w = torch.ones(16, dtype=torch.bfloat16)
    assert torch.equal(cpu_ops.rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5))


@pytest.mark.parametrize("t", [1, 5, 70])
def test_rope_qkv_matches_torch_rope(t):
    """Kernel vs rope.apply_rope (the torch path): same products and sum, so equal to rounding of
    the one fused multiply-add torch may use; positions index the tables per token."""
    from kvwise.model.rope import apply_rope, rope_tables

    h, k, d = 3, 1, 16
    g = torch.Generator().manual_seed(t)
    qkv = torch.randn(t, (h + 2 * k) * d, generator=g)
    positions = torch.randint(0, 50, (t,), generator=g)
    cos, sin = rope_tables(d, 10000.0, None, 50, torch.float32, torch.device("cpu"))
    q, kk, v = cpu_ops.rope_qkv(qkv, positions, cos, sin, h, k, d)
    ref = apply_rope(qkv[:, :(h + k) * d].view(t, h + k, d), cos[positions], sin[positions])
    assert torch.allclose(q, ref[:, :h], rtol=1e-6, atol=1e-6)
    assert torch.allclose(kk, ref[:, h:], rtol=1e-6, atol=1e-6)
    assert torch.equal(v, qkv[:, (h + k) * d:].view(t, k, d))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_split_into_cache_equals_store_write(dtype):
    """The decode path's rope kernel writing k/v straight into cache rows stores the same bits as
    rope_qkv followed by KVStore.write's conversion (fp16: round to nearest even, as torch)."""
    from kvwise.cache.kv_store import kernel_view
    from kvwise.model.rope import rope_tables

    h, k, d, t = 3, 2, 16, 6
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(t, (h + 2 * k) * d, generator=g) * 5
    positions = torch.randint(0, 50, (t,), generator=g)
    cos, sin = rope_tables(d, 10000.0, None, 50, torch.float32, torch.device("cpu"))
    rows = torch.tensor([9, 2, 30, 4, 17, 11])
    k_cache = torch.zeros(32, k, d, dtype=dtype)
    v_cache = torch.zeros(32, k, d, dtype=dtype)
    q = torch.empty(t, h, d)
    cpu_ops.rope_split(qkv.numpy(), positions.numpy(), cos.numpy(), sin.numpy(), h, q.numpy(),
                       kernel_view(k_cache), kernel_view(v_cache), rows.numpy())
    q_ref, k_ref, v_ref = cpu_ops.rope_qkv(qkv, positions, cos, sin, h, k, d)
    assert torch.equal(q, q_ref)
    assert torch.equal(k_cache[rows], k_ref.to(dtype))
    assert torch.equal(v_cache[rows], v_ref.to(dtype))
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[rows] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@pytest.mark.parametrize("t", [1, 5, 16, 100])
def test_silu_mul_matches_torch(t):
    g = torch.Generator().manual_seed(t)
    gu = torch.randn(t, 2 * 48, generator=g) * 4
    gate, up = gu.chunk(2, dim=-1)
    got = cpu_ops.silu_mul(gu)
    assert torch.allclose(got, F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    if t <= cpu_ops.SILU_KERNEL_MAX_ROWS:  # the kernel's rows are independent of the batch
        assert torch.equal(cpu_ops.silu_mul(gu[:1].contiguous())[0], got[0])


def test_silu_mul_keeps_nonfinite_values_instead_of_raising():
    """IEEE semantics inside the kernels (error_model="numpy"): a NaN or inf activation must not
    raise ZeroDivisionError out of an engine step."""
    gu = torch.tensor([[float("nan"), float("-inf"), 1.0, 1.0]])
    out = cpu_ops.silu_mul(gu)
    assert torch.isnan(out[0, 0])
