"""Quantized-weight kernels against their PyTorch references, and the format conversions.

Tolerances: the kernels dequantize exactly (same fp32 values as the reference) and differ only
in the fp32 summation order of the dot products, so |kernel - ref| <= 1e-5 * max|ref| + 1e-5
(K <= 1024; observed ~1e-7 relative). Dequantize kernels and GGUF block mappings are bit-exact.
The bf16 large-T path is held to a bf16 bound (2^-7 relative to max|ref|: inputs and outputs
rounded to 8 significant bits).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from kvwise.kernels.cpu.features import cpu_features, isa_cap
from kvwise.model.gguf_dequant import dequantize
from kvwise.model.gguf_reader import RawTensor
from kvwise.model.quant import (
    Int4Linear,
    Int8Linear,
    Workspace,
    kernels,
    reference,
)
from kvwise.model.quant.convert import (
    int4_from_gguf,
    int4_group_size,
    int8_group_size,
    quantize_int4,
    quantize_int8,
    to_int4,
    to_int8,
)
from kvwise.model.quant.dispatch import BF16_NATIVE, SMALL_BATCH_MAX

RTOL = 1e-5
SETTINGS = settings(max_examples=25, deadline=None)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    err = (got.double() - ref.double()).abs().max().item()
    bound = RTOL * ref.abs().max().item() + 1e-5
    print(f"max abs err {err:.3g} (bound {bound:.3g})")
    assert err <= bound


def _int8_weight(rng: np.random.Generator, n: int, k: int, gs: int) -> tuple[torch.Tensor, ...]:
    q = torch.from_numpy(rng.integers(-127, 128, (n, k), dtype=np.int8))
    scale = torch.from_numpy(rng.uniform(1e-3, 1e-2, (n, k // gs)).astype(np.float16))
    return q, scale


def _int4_weight(rng: np.random.Generator, n: int, k: int, gs: int) -> tuple[torch.Tensor, ...]:
    q = torch.from_numpy(rng.integers(0, 256, (n, k // 2), dtype=np.uint8))
    scale = torch.from_numpy(rng.uniform(1e-3, 2e-2, (n, k // gs)).astype(np.float16))
    minv = torch.from_numpy(rng.uniform(-0.15, 0.0, (n, k // gs)).astype(np.float16))
    return q, scale, minv


shapes = st.tuples(st.integers(1, 2 * SMALL_BATCH_MAX), st.integers(1, 160),
                   st.sampled_from([32, 64, 96, 256, 576]), st.booleans(), st.integers(0, 2**31))


@SETTINGS
@given(shapes, st.sampled_from([None, 32, 64]))
def test_int8_matmul_matches_reference(shape, gs):
    t, n, k, with_bias, seed = shape
    gs = k if gs is None or k % gs else gs  # None: one scale per row
    rng = np.random.default_rng(seed)
    q, scale = _int8_weight(rng, n, k, gs)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    x = torch.from_numpy(rng.standard_normal((t, k)).astype(np.float32))
    out = torch.empty(t, n)
    b = bias.numpy() if bias is not None else np.empty(0, np.float32)
    s16 = scale.numpy().view(np.uint16)
    kernels.check_int8(x.numpy(), q.numpy(), s16, b, out.numpy())
    kernels.int8_matmul(x.numpy(), q.numpy(), s16, b, out.numpy())
    _close(out, reference.int8_linear(x, q, scale, bias))


@SETTINGS
@given(shapes, st.sampled_from([32, 64, 128]))
def test_int4_matmul_matches_reference(shape, gs):
    t, n, k, with_bias, seed = shape
    if k % gs:
        gs = 32
    rng = np.random.default_rng(seed)
    q, scale, minv = _int4_weight(rng, n, k, gs)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    x = torch.from_numpy(rng.standard_normal((t, k)).astype(np.float32))
    out = torch.empty(t, n)
    b = bias.numpy() if bias is not None else np.empty(0, np.float32)
    s16, m16 = scale.numpy().view(np.uint16), minv.numpy().view(np.uint16)
    kernels.check_int4(x.numpy(), q.numpy(), s16, m16, b, out.numpy())
    kernels.int4_matmul(x.numpy(), q.numpy(), s16, m16, b, out.numpy())
    _close(out, reference.int4_linear(x, q, scale, minv, bias))


@SETTINGS
@given(st.integers(1, SMALL_BATCH_MAX), st.integers(1, 96), st.sampled_from([32, 64, 96, 576]),
       st.sampled_from([32, 64, 96]), st.booleans(), st.integers(0, 2**31))
def test_int4_int8_activation_kernel_matches_reference(t, n, k, gs, with_bias, seed):
    """a8 (int8 activations): the kernel equals the float64 reference of the same quantized
    inputs to fp32 accumulation, and a token's row is bit-identical alone and in the batch."""
    if k % gs:
        gs = 32
    rng = np.random.default_rng(seed)
    q, scale, minv = _int4_weight(rng, n, k, gs)
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) if with_bias else None
    x = torch.from_numpy(rng.standard_normal((t, k)).astype(np.float32) * 3)
    x[0, : min(k, 32)] = 0.0  # an all-zero block (scale 0)
    b = bias.numpy() if bias is not None else np.empty(0, np.float32)
    s16, m16 = scale.numpy().view(np.uint16), minv.numpy().view(np.uint16)
    out = torch.empty(t, n)
    kernels.int4_matmul(x.numpy(), q.numpy(), s16, m16, b, out.numpy(), a8=True)
    _close(out, reference.int4_linear_a8(x, q, scale, minv, bias))
    i = int(rng.integers(0, t))
    one = np.empty((1, n), np.float32)
    kernels.int4_matmul(x[i:i + 1].contiguous().numpy(), q.numpy(), s16, m16, b, one, a8=True)
    assert np.array_equal(one[0], out[i].numpy())


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([32, 64, 96, 576, 1536]), st.integers(0, 2**31))
def test_quantize_activations_matches_reference_codes(t, k, seed):
    """The kernel's int8 codes and scales are exactly the reference's (same rounding), in the
    pair order the dot product reads."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, k)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[:, :32] = np.round(x[:, :32])  # ties (x.5 * 127 / max) are exercised less than integers
    codes, d = reference.quantize_activations(torch.from_numpy(x))
    xq, dxp = kernels.act_scratch(t, k)
    for row in range(t):
        kernels.quantize_activations(x, row, xq[row], dxp[row])
    nb = k // 32
    for row in range(t):
        for blk in range(nb):
            pair, second = divmod(blk, 2)
            if blk == nb - 1 and nb % 2:
                lo, hi = blk * 32, blk * 32 + 16
            else:
                lo, hi = pair * 64 + second * 16, pair * 64 + 32 + second * 16
            want = codes[row, blk * 32:(blk + 1) * 32].numpy()
            assert np.array_equal(np.concatenate([xq[row, lo:lo + 16], xq[row, hi:hi + 16]]),
                                  want)
            lanes = dxp[row, pair * 16:(pair + 1) * 16].reshape(2, 2, 4)[:, second]
            assert (lanes == d[row, blk].item()).all()


@SETTINGS
@given(st.integers(1, 100), st.sampled_from([32, 64, 576]), st.integers(0, 2**31))
def test_dequant_kernels_are_exact(n, k, seed):
    rng = np.random.default_rng(seed)
    q, scale, minv = _int4_weight(rng, n, k, 32)
    row0 = int(rng.integers(0, n))
    buf = np.empty((n - row0, k), np.float32)
    kernels.int4_dequant(q.numpy(), scale.numpy().view(np.uint16), minv.numpy().view(np.uint16),
                         row0, buf)
    assert torch.equal(torch.from_numpy(buf), reference.dequantize_int4(q, scale, minv)[row0:])
    q8, s8 = _int8_weight(rng, n, k, 32)
    kernels.int8_dequant(q8.numpy(), s8.numpy().view(np.uint16), row0, buf)
    assert torch.equal(torch.from_numpy(buf), reference.dequantize_int8(q8, s8)[row0:])


def test_small_batch_rows_equal_single_token_rows():
    """A token's output is bit-identical alone (T=1) and in a small batch (batch invariance)."""
    rng = np.random.default_rng(0)
    n, k, t = 99, 576, 7
    q, scale, minv = _int4_weight(rng, n, k, 32)
    q8, s8 = _int8_weight(rng, n, k, 32)
    q8, s8 = q8.numpy(), s8.numpy().view(np.uint16)
    x = rng.standard_normal((t, k)).astype(np.float32)
    s16, m16 = scale.numpy().view(np.uint16), minv.numpy().view(np.uint16)
    nob = np.empty(0, np.float32)
    for run in (lambda xx, out: kernels.int4_matmul(xx, q.numpy(), s16, m16, nob, out),
                lambda xx, out: kernels.int8_matmul(xx, q8, s8, nob, out)):
        full = np.empty((t, n), np.float32)
        run(x, full)
        for i in range(t):
            one = np.empty((1, n), np.float32)
            run(np.ascontiguousarray(x[i:i + 1]), one)
            assert np.array_equal(one[0], full[i])


@pytest.mark.parametrize("t", [1, 5, SMALL_BATCH_MAX + 1, 300])
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_layers_match_reference_on_every_path(kind, t):
    """T=1 GEMV, small-batch kernel, and dequantize-into-scratch + sgemm (multi-chunk)."""
    torch.manual_seed(0)
    n, k = 2100, 576  # > one 1M-element scratch chunk: exercises chunking
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n)
    ws = Workspace(2)
    if kind == "int8":
        qw = quantize_int8(w)  # one scale per row
        layer = Int8Linear(qw, bias, ws)
        ref = lambda x: reference.int8_linear(x, qw.q, qw.scale, bias)  # noqa: E731
    else:
        qw = quantize_int4(w, 64)
        layer = Int4Linear(qw, bias, ws)
        ref = lambda x: reference.int4_linear(x, qw.q, qw.scale, qw.minv, bias)  # noqa: E731
    x = torch.randn(t, k)
    _close(layer(x), ref(x))
    x3 = x.view(1, t, k).to(torch.bfloat16)  # any leading shape and activation dtype
    y3 = layer(x3)
    assert y3.shape == (1, t, n) and y3.dtype == torch.bfloat16


@pytest.mark.skipif(not BF16_NATIVE, reason="no native bf16 (AVX512-BF16 or AMX) on this CPU "
                    f"(KVWISE_CPU_ISA={isa_cap()}): the layers keep fp32")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_bf16_large_batch_path(kind):
    """T > SMALL_BATCH_MAX with the bf16 copy: close to the exact reference at bf16 precision,
    and each row independent of the rest of the batch."""
    torch.manual_seed(1)
    n, k, t = 300, 576, 40
    w = torch.randn(n, k) * 0.05
    bias = torch.randn(n)
    if kind == "int8":
        qw = quantize_int8(w)
        layer = Int8Linear(qw, bias, Workspace(2))
        exact = lambda x: reference.int8_linear(x, qw.q, qw.scale, bias)  # noqa: E731
    else:
        qw = quantize_int4(w, 64)
        layer = Int4Linear(qw, bias, Workspace(2))
        exact = lambda x: reference.int4_linear(x, qw.q, qw.scale, qw.minv, bias)  # noqa: E731
    assert layer.build_bf16() and layer.weight_bf16.dtype == torch.bfloat16
    x = torch.randn(t, k)
    got, ref = layer(x), exact(x)
    err = (got - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item(), err
    assert err > 0  # it really took the bf16 path


def test_pack_unpack_roundtrip_and_gguf_order():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = reference.pack_int4(codes)
    assert torch.equal(reference.unpack_int4(packed), codes)
    # byte j of a 32-element sub-block: element j low nibble, element j + 16 high nibble
    assert packed[0, 5].item() == codes[0, 5].item() | (codes[0, 21].item() << 4)


def test_quantize_error_bounds():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.1
    for gs in (None, 32):
        q8 = quantize_int8(w, gs)
        err8 = (reference.dequantize_int8(q8.q, q8.scale) - w).abs()
        step = q8.scale.float().repeat_interleave(q8.group_size, dim=1)
        assert (err8 <= step / 2 + 1e-6).all()
        assert q8.group_size == (gs or 256)
    q4 = quantize_int4(w, 64)
    err4 = (reference.dequantize_int4(q4.q, q4.scale, q4.minv) - w).abs()
    step = q4.scale.float().repeat_interleave(64, dim=1)
    assert (err4 <= step / 2 + 2e-3 * w.abs().max()).all()  # + fp16 rounding of min/scale
    assert q4.group_size == 64


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1])
def test_gguf_4bit_blocks_map_exactly(qtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 128)).astype(np.float32)
    raw = RawTensor(qtype, quants.quantize(w, qtype), w.shape)
    q4 = int4_from_gguf(raw)
    assert q4.group_size == 32
    got = reference.dequantize_int4(q4.q, q4.scale, q4.minv)
    assert torch.equal(got, torch.from_numpy(dequantize(raw.data, qtype)))
    assert int4_group_size([raw]) == 32
    # fused parts: a GGUF part and a float part share the group size of the exact mapping
    fused = to_int4([raw, torch.from_numpy(w[:16])], int4_group_size([raw]))
    assert fused.q.shape == (64, 64) and fused.group_size == 32


def test_gguf_q8_0_maps_exactly_and_q4_1_to_int8_is_close():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    raw = RawTensor(GGMLQuantizationType.Q8_0, quants.quantize(w, GGMLQuantizationType.Q8_0),
                    w.shape)
    assert int8_group_size([raw]) == 32 and int8_group_size([torch.from_numpy(w)]) is None
    q8 = to_int8([raw], 32)
    deq = torch.from_numpy(dequantize(raw.data, raw.ggml_type))
    assert torch.equal(reference.dequantize_int8(q8.q, q8.scale), deq)
    raw4 = RawTensor(GGMLQuantizationType.Q4_1, quants.quantize(w, GGMLQuantizationType.Q4_1),
                     w.shape)
    q8 = to_int8([raw4], int8_group_size([raw4]))
    deq = torch.from_numpy(dequantize(raw4.data, raw4.ggml_type))
    err = (reference.dequantize_int8(q8.q, q8.scale) - deq).abs()
    assert (err <= q8.scale.float().repeat_interleave(32, dim=1) / 2 + 1e-6).all()


# LLVM aborts the whole interpreter (not a Python error) when asked to lower vpdpbusd for a target
# without VNNI, so the VNNI form is compiled only where the CPU, as capped, has it.
_NO_VNNI = pytest.mark.skipif(
    not cpu_features().avx512vnni,
    reason=f"no AVX-512 VNNI on this CPU (KVWISE_CPU_ISA={isa_cap()}): vpdpbusd cannot be compiled")


@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=_NO_VNNI)],
                         ids=["portable", "vnni"])
def test_integer_dot_product_vnni_and_portable_forms_agree(monkeypatch, vnni):
    """simd.vdot_q4q8 lowers to vpdpbusd where the CPU has AVX-512 VNNI and to plain vector
    integer ops elsewhere; both give the exact partial sums numpy computes."""
    from numba import njit

    from kvwise.kernels.cpu import simd

    monkeypatch.setattr(simd, "VNNI", vnni)  # read when the intrinsic is lowered, below

    @njit(cache=False)
    def dot(q, xq, out):
        simd.vstore(out, 0, simd.vdot_q4q8(q, 0, xq, 0))

    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, 32, dtype=np.uint8)
    xq = rng.integers(-128, 128, 64, dtype=np.int8)
    codes = np.concatenate([q & 15, q >> 4]).astype(np.int64)  # [low nibbles, high nibbles]
    want = (codes * xq.astype(np.int64)).reshape(16, 4).sum(axis=1).astype(np.float32)
    out = np.empty(16, np.float32)
    dot(q, xq, out)
    assert np.array_equal(out, want)
    assert ("vpdpbusd" in next(iter(dot.inspect_asm().values()))) == vnni
