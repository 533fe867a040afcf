"""Integer dot products for the quantized GEMV: 4-bit (or 8-bit) weight codes against 8-bit
activation codes, as LLVM vector IR through `numba.extending.intrinsic`.

Why: at batch 1 the float kernels convert every weight code to fp32 before a multiply-add, ~20
vector instructions per 32 weights per row, and run compute-bound well below the memory
bandwidth. Quantizing the activation row once to int8 per 32 inputs (`quantize_q8`) turns a
32-weight sub-block into one unsigned x signed byte multiply-add to int32 lanes, ~8 instructions
(the same scheme llama.cpp uses for its Q4/Q8 dot products).

Lowering, chosen once from the host CPU's features (the kernels are compiled for the host):
- AVX512-VNNI (+VL): `vpdpbusd` on 256-bit vectors, one instruction per 32 byte products.
- AVX2: `vpmaddubsw` (u8 x s8 -> pairs summed to i16) then `vpmaddwd` with ones (-> i32).
- otherwise: widen to i32, multiply, add neighbouring lanes (any LLVM target).
All three compute the same exact int32 lane sums: lane i = sum of products 4i .. 4i+3. The u8 x s8
pair sums cannot saturate i16: weight codes are <= 15 (int4) or |w| <= 127 via the sign trick
(int8, `dot_q8q8`): 2 * 127 * 128 = 32512 < 32767.

Invariants:
- Loads are raw pointer arithmetic at flat element offsets the caller has bounds-checked.
- Results are exact integers converted to fp32 (|sum| < 2^24), so every lowering gives the
  same bits: the fp32 accumulation order is the caller's and fixed.
"""

from __future__ import annotations

from typing import Any

import llvmlite.binding as llvm
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_F32 = ir.FloatType()
_V8F = ir.VectorType(_F32, 8)
_V8I = ir.VectorType(_I32, 8)
_V16B = ir.VectorType(_I8, 16)
_V32B = ir.VectorType(_I8, 32)
_V16S = ir.VectorType(_I16, 16)


def _host_lowering() -> str:
    try:
        feats = llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover - platforms without feature detection
        return "generic"
    if feats.get("avx512vnni") and feats.get("avx512vl"):
        return "vnni"
    if feats.get("avx2"):
        return "avx2"
    return "generic"


LOWERING = _host_lowering()


class F32x8Type(types.Type):
    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8Type()


@register_model(F32x8Type)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _V8F)


def _ptr(context: Any, builder: ir.IRBuilder, arr_type: Any, arr: Any, offset: Any,
         elem_ir: ir.Type) -> Any:
    ary = context.make_array(arr_type)(context, builder, arr)
    p = builder.gep(ary.data, [offset])
    return builder.bitcast(p, elem_ir.as_pointer())


def _call(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[Any]) -> Any:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    return builder.call(fn, args)


def _sum_quads(builder: ir.IRBuilder, v: Any, width: int) -> Any:
    """<width x i32> -> <width/4 x i32>, lane i = v[4i] + v[4i+1] + v[4i+2] + v[4i+3]."""
    for _ in range(2):
        half = width // 2
        mask = ir.VectorType(_I32, half)
        even = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(0, width, 2))))
        odd = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(1, width, 2))))
        v = builder.add(even, odd)
        width = half
    return v


def _dot_u8s8(builder: ir.IRBuilder, u: Any, s: Any) -> Any:
    """<32 x i8> unsigned u, signed s -> <8 x i32> sums of 4 neighbouring products."""
    if LOWERING == "vnni":
        zero = ir.Constant(_V8I, [0] * 8)
        return _call(builder, "llvm.x86.avx512.vpdpbusd.256", _V8I,
                     [zero, builder.bitcast(u, _V8I), builder.bitcast(s, _V8I)])
    if LOWERING == "avx2":
        p16 = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16S, [u, s])
        ones = ir.Constant(_V16S, [1] * 16)
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8I, [p16, ones])
    v32 = ir.VectorType(_I32, 32)
    prod = builder.mul(builder.zext(u, v32), builder.sext(s, v32))
    return _sum_quads(builder, prod, 32)


@intrinsic
def v8zero(typingctx: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return ir.Constant(_V8F, [0.0] * 8)
    return f32x8(), codegen


@intrinsic
def v8splat(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        u = builder.insert_element(ir.Constant(_V8F, ir.Undefined), v, ir.Constant(_I32, 0))
        return builder.shuffle_vector(u, ir.Constant(_V8F, ir.Undefined),
                                      ir.Constant(_V8I, [0] * 8))
    return f32x8(value), codegen


@intrinsic
def v8fma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c, lane-wise, fused."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _call(builder, "llvm.fma.v8f32", _V8F, list(args))
    return f32x8(a, b, c), codegen


@intrinsic
def v8sum(typingctx: Any, a: Any) -> Any:
    """Sum of the 8 lanes, pairwise (4+4, 2+2, 1+1) -> float32."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = args[0]
        width = 8
        while width > 1:
            half = width // 2
            mask = ir.VectorType(_I32, half)
            lo = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(half, width))))
            v = builder.fadd(lo, hi)
            width = half
        return builder.extract_element(v, ir.Constant(_I32, 0))
    return types.float32(a), codegen


@intrinsic
def dot_q4q8(typingctx: Any, q: Any, q_offset: Any, xq: Any, x_offset: Any) -> Any:
    """One 32-weight int4 sub-block (16 bytes of uint8 `q` at `q_offset`: element j in the low
    nibble of byte j, element 16 + j in the high nibble) times 32 int8 activation codes (`xq` at
    `x_offset`) -> f32x8 of exact partial sums (lane i: elements 4i .. 4i+3)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        qo = context.cast(builder, args[1], sig.args[1], types.intp)
        xo = context.cast(builder, args[3], sig.args[3], types.intp)
        b = builder.load(_ptr(context, builder, sig.args[0], args[0], qo, _V16B), align=1)
        lo = builder.and_(b, ir.Constant(_V16B, [15] * 16))
        hi = builder.lshr(b, ir.Constant(_V16B, [4] * 16))
        w = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        x = builder.load(_ptr(context, builder, sig.args[2], args[2], xo, _V32B), align=1)
        return builder.sitofp(_dot_u8s8(builder, w, x), _V8F)
    return f32x8(q, q_offset, xq, x_offset), codegen


@intrinsic
def dot_q8q8(typingctx: Any, w: Any, w_offset: Any, xq: Any, x_offset: Any) -> Any:
    """32 int8 weights (`w` at `w_offset`) times 32 int8 activation codes -> f32x8 of exact
    partial sums (lane i: elements 4i .. 4i+3). Signed x signed via |w| x (x * sign(w))."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        wo = context.cast(builder, args[1], sig.args[1], types.intp)
        xo = context.cast(builder, args[3], sig.args[3], types.intp)
        wv = builder.load(_ptr(context, builder, sig.args[0], args[0], wo, _V32B), align=1)
        x = builder.load(_ptr(context, builder, sig.args[2], args[2], xo, _V32B), align=1)
        zero = ir.Constant(_V32B, [0] * 32)
        neg = builder.icmp_signed("<", wv, zero)
        absw = builder.select(neg, builder.sub(zero, wv), wv)  # -128 -> 128 as unsigned
        sx = builder.select(neg, builder.sub(zero, x), x)  # x codes are in [-127, 127]
        return builder.sitofp(_dot_u8s8(builder, absw, sx), _V8F)
    return f32x8(w, w_offset, xq, x_offset), codegen


__all__ = ["LOWERING", "dot_q4q8", "dot_q8q8", "f32x8", "v8fma", "v8splat", "v8sum", "v8zero"]
