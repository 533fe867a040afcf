"""Explicit SIMD for numba kernels: a 16-lane float32 vector type and the few operations the
quantized matmul kernels need, written as LLVM vector IR through `numba.extending.intrinsic`.

Why not rely on auto-vectorization: LLVM fully unrolls the 16-byte inner loop of a 32-weight
int4 sub-block and the SLP vectorizer then gives up (scalar `vcvtsi2ss` per weight, ~2 G weights/s),
or it vectorizes the wrong loop with gathers. A vector *value* type keeps accumulators in registers
and lets each kernel say exactly which 16 lanes it loads. LLVM lowers `<16 x float>` to one zmm
register (AVX-512), two ymm (AVX2) or four xmm (SSE/NEON), so the kernels stay portable.

Invariants:
- Every load/store touches `VEC` consecutive elements starting at a flat element offset that the
  caller has bounds-checked (these intrinsics do no checking: they are raw pointer arithmetic).
- Arrays passed in are C-contiguous (any rank: offsets are flat element offsets); an int4 load
  reads 16 bytes = 32 nibbles (one sub-block).
"""

from __future__ import annotations

from typing import Any

from llvmlite import ir
from numba.core import cgutils, errors, types
from numba.extending import intrinsic, models, register_model

from kvwise.kernels.cpu.features import cpu_features

VEC = 16  # lanes of the vector type
_F32 = ir.FloatType()
_V16F = ir.VectorType(_F32, VEC)
_V16I8 = ir.VectorType(ir.IntType(8), VEC)


class F32x16Type(types.Type):
    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm: Any, fe_type: Any) -> None:
        super().__init__(dmm, fe_type, _V16F)


def _ptr(context: Any, builder: ir.IRBuilder, arr_type: Any, arr: Any, offset: Any,
         elem_ir: ir.Type) -> Any:
    """Pointer to element `offset` of 1-D array `arr`, cast to `elem_ir`*."""
    ary = context.make_array(arr_type)(context, builder, arr)
    p = builder.gep(ary.data, [offset])
    return builder.bitcast(p, elem_ir.as_pointer())


def _splat(builder: ir.IRBuilder, value: Any) -> Any:
    zero = ir.Constant(ir.IntType(32), 0)
    v = builder.insert_element(ir.Constant(_V16F, ir.Undefined), value, zero)
    return builder.shuffle_vector(v, ir.Constant(_V16F, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), VEC), [0] * VEC))


def _fma(builder: ir.IRBuilder, a: Any, b: Any, c: Any) -> Any:
    fnty = ir.FunctionType(_V16F, [_V16F, _V16F, _V16F])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
    return builder.call(fn, [a, b, c])


@intrinsic
def vzero(typingctx: Any) -> Any:
    """-> f32x16 of zeros."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return ir.Constant(_V16F, [0.0] * VEC)
    return f32x16(), codegen


@intrinsic
def vsplat(typingctx: Any, value: Any) -> Any:
    """float32 -> f32x16 with every lane = value."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return _splat(builder, v)
    return f32x16(value), codegen


@intrinsic
def vload(typingctx: Any, arr: Any, offset: Any) -> Any:
    """float32 arr[offset : offset + 16] -> f32x16."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        p = _ptr(context, builder, sig.args[0], args[0], off, _V16F)
        return builder.load(p, align=4)
    return f32x16(arr, offset), codegen


@intrinsic
def vstore(typingctx: Any, arr: Any, offset: Any, vec: Any) -> Any:
    """arr[offset : offset + 16] = vec (float32 arr)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        p = _ptr(context, builder, sig.args[0], args[0], off, _V16F)
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return types.void(arr, offset, vec), codegen


def _vload_i8(typingctx: Any, arr: Any, offset: Any) -> Any:
    """int8 arr[offset : offset + 16] -> f32x16 (exact conversion)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        p = _ptr(context, builder, sig.args[0], args[0], off, _V16I8)
        return builder.sitofp(builder.load(p, align=1), _V16F)
    return f32x16(arr, offset), codegen


vload_i8 = intrinsic(_vload_i8)


def _nibbles(high: bool) -> Any:
    def gen(typingctx: Any, arr: Any, offset: Any) -> Any:
        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            off = context.cast(builder, args[1], sig.args[1], types.intp)
            p = _ptr(context, builder, sig.args[0], args[0], off, _V16I8)
            b = builder.load(p, align=1)
            if high:
                b = builder.lshr(b, ir.Constant(_V16I8, [4] * VEC))
            else:
                b = builder.and_(b, ir.Constant(_V16I8, [15] * VEC))
            return builder.uitofp(b, _V16F)
        return f32x16(arr, offset), codegen
    return gen


# uint8 arr[offset : offset + 16] -> f32x16 of the low / high nibbles (values 0..15)
vload_lo4 = intrinsic(_nibbles(high=False))
vload_hi4 = intrinsic(_nibbles(high=True))


@intrinsic
def load_f16(typingctx: Any, arr: Any, offset: Any) -> Any:
    """IEEE half stored as uint16 arr[offset] -> float32 (exact; F16C `vcvtph2ps` on x86)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        h = builder.load(_ptr(context, builder, sig.args[0], args[0], off, ir.HalfType()))
        return builder.fpext(h, _F32)
    return types.float32(arr, offset), codegen


def _kv_elem(arr_type: Any) -> ir.Type:
    """LLVM element type of a KV cache array: float32, or IEEE half stored as uint16."""
    if arr_type.dtype == types.float32:
        return _F32
    if arr_type.dtype == types.uint16:
        return ir.HalfType()
    raise TypeError(f"KV cache arrays are float32 or float16 viewed as uint16, not {arr_type}")


@intrinsic
def vload_kv(typingctx: Any, arr: Any, offset: Any) -> Any:
    """KV cache arr[offset : offset + 16] -> f32x16: a float32 array, an IEEE half array viewed
    as uint16 (widened exactly; `vcvtph2ps` on x86), or int8 codes (converted exactly; the
    caller applies their scale)."""
    if arr.dtype == types.int8:
        return _vload_i8(typingctx, arr, offset)
    elem = _kv_elem(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        p = _ptr(context, builder, sig.args[0], args[0], off, ir.VectorType(elem, VEC))
        v = builder.load(p, align=2 if elem is not _F32 else 4)
        return v if elem is _F32 else builder.fpext(v, _V16F)
    return f32x16(arr, offset), codegen


@intrinsic
def store_kv(typingctx: Any, arr: Any, offset: Any, value: Any) -> Any:
    """KV cache arr[offset] = value (float32): stored as is, or rounded to the nearest half (ties
    to even, as torch's float -> float16 conversion) into a uint16-viewed half array."""
    elem = _kv_elem(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        v = context.cast(builder, args[2], sig.args[2], types.float32)
        if elem is not _F32:
            v = builder.fptrunc(v, elem)
        builder.store(v, _ptr(context, builder, sig.args[0], args[0], off, elem))
        return context.get_dummy_value()
    return types.void(arr, offset, value), codegen


def _prefetch(locality: int) -> Any:
    def gen(typingctx: Any, arr: Any, offset: Any) -> Any:
        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            off = context.cast(builder, args[1], sig.args[1], types.intp)
            p = _ptr(context, builder, sig.args[0], args[0], off, ir.IntType(8))
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, locality),
                              ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return types.void(arr, offset), codegen
    return intrinsic(gen)


# Hint the cache line holding element `offset` of `arr` into the caches (`llvm.prefetch`, read):
# prefetch with high locality (all levels: prefetcht0 on x86), prefetch_l2 one level lower
# (prefetcht1: L2 and below, for data needed later than the next few hundred cycles). No
# effect on results; an address past the array does not fault.
prefetch = _prefetch(3)
prefetch_l2 = _prefetch(2)


@intrinsic
def vfma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """a * b + c, lane-wise, fused."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _fma(builder, *args)
    return f32x16(a, b, c), codegen


@intrinsic
def vfnma(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """c - a * b, lane-wise, fused (one vfnmadd on x86)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return _fma(builder, builder.fneg(args[0]), args[1], args[2])
    return f32x16(a, b, c), codegen


@intrinsic
def vadd(typingctx: Any, a: Any, b: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.fadd(args[0], args[1])
    return f32x16(a, b), codegen


@intrinsic
def vsub(typingctx: Any, a: Any, b: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.fsub(args[0], args[1])
    return f32x16(a, b), codegen


@intrinsic
def vmul(typingctx: Any, a: Any, b: Any) -> Any:
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.fmul(args[0], args[1])
    return f32x16(a, b), codegen


@intrinsic
def vsum(typingctx: Any, a: Any) -> Any:
    """Sum of the 16 lanes (pairwise tree: 8+8, 4+4, 2+2, 1+1) -> float32."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = args[0]
        width = VEC
        while width > 1:
            half = width // 2
            mask = ir.VectorType(ir.IntType(32), half)
            lo = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(half))))
            hi = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(half, width))))
            v = builder.fadd(lo, hi)
            width = half
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    return types.float32(a), codegen


@intrinsic
def vsum16(typingctx: Any, a0: Any, a1: Any, a2: Any, a3: Any, a4: Any, a5: Any, a6: Any,
           a7: Any, a8: Any, a9: Any, a10: Any, a11: Any, a12: Any, a13: Any, a14: Any,
           a15: Any) -> Any:
    """16 vectors -> one vector whose lane j is the sum of the lanes of a_j, in the same pairwise
    order as `vsum` (bit-identical to 16 `vsum` calls) with 30 shuffles instead of 128: adjacent
    vectors are merged level by level, each keeping the half-sums of both inputs' segments."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        vecs = list(args)
        width = VEC  # lanes per source segment
        while len(vecs) > 1:
            half = width // 2
            per = VEC // width  # sources per vector
            lo_mask, hi_mask = [], []
            for side in (0, VEC):
                for src in range(per):
                    first = side + src * width
                    lo_mask += range(first, first + half)
                    hi_mask += range(first + half, first + width)
            i32 = ir.VectorType(ir.IntType(32), VEC)
            nxt = []
            for a, b in zip(vecs[0::2], vecs[1::2]):
                lo = builder.shuffle_vector(a, b, ir.Constant(i32, lo_mask))
                hi = builder.shuffle_vector(a, b, ir.Constant(i32, hi_mask))
                nxt.append(builder.fadd(lo, hi))
            vecs = nxt
            width = half
        return vecs[0]
    return f32x16(*([f32x16] * VEC)), codegen


def _vconst(value: float) -> Any:
    return ir.Constant(_V16F, [value] * VEC)


def _call_v(builder: ir.IRBuilder, name: str, args: list[Any]) -> Any:
    fnty = ir.FunctionType(_V16F, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


@intrinsic
def vexp(typingctx: Any, a: Any) -> Any:
    """e^x lane-wise, for softmax: x clamped to [-87.3, 88.3], x = n ln2 + r with |r| <= ln2/2
    (two-constant Cody-Waite split), e^r by a degree-7 polynomial (Cephes expf coefficients),
    times 2^n built in the exponent bits. Relative error ~2e-7 (tests compare with torch.exp).
    Why: a scalar libm expf per attention score was most of the decode attention time."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        i32v = ir.VectorType(ir.IntType(32), VEC)
        x = _call_v(builder, "llvm.maxnum.v16f32", [args[0], _vconst(-87.3)])
        x = _call_v(builder, "llvm.minnum.v16f32", [x, _vconst(88.3)])
        n = _call_v(builder, "llvm.floor.v16f32",
                    [_fma(builder, x, _vconst(1.44269504088896341), _vconst(0.5))])
        r = _fma(builder, n, _vconst(-0.693359375), x)
        r = _fma(builder, n, _vconst(2.12194440e-4), r)
        p = _vconst(1.9875691500e-4)
        for c in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                  5.0000001201e-1):
            p = _fma(builder, p, r, _vconst(c))
        r2 = builder.fmul(r, r)
        p = _fma(builder, p, r2, builder.fadd(r, _vconst(1.0)))
        bits = builder.shl(builder.add(builder.fptosi(n, i32v), ir.Constant(i32v, [127] * VEC)),
                           ir.Constant(i32v, [23] * VEC))
        return builder.fmul(p, builder.bitcast(bits, _V16F))
    return f32x16(a), codegen


# -- integer dot products (int4 weights x int8 activations) --------------------------------------

_V16I32 = ir.VectorType(ir.IntType(32), VEC)
_V64I8 = ir.VectorType(ir.IntType(8), 64)


def _vnni() -> bool:
    """Whether the CPU, as capped by KVWISE_CPU_ISA, has AVX-512 VNNI: LLVM cannot lower the
    vpdpbusd intrinsic for a target without it (it aborts the process), so this must follow
    the cap numba compiles for, not the host."""
    return cpu_features().avx512vnni


VNNI = _vnni()  # AVX-512 VNNI: vpdpbusd does 64 u8 x s8 products into 16 int32 lanes


def _dot_u8s8(builder: ir.IRBuilder, w: Any, x: Any) -> Any:
    """<64 x i8> unsigned w, signed x -> <16 x i32> with lane j = sum_{t<4} w[4j+t] * x[4j+t]
    (exact: |products| <= 255 * 128, four per lane)."""
    if VNNI:
        fnty = ir.FunctionType(_V16I32, [_V16I32] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [ir.Constant(_V16I32, [0] * VEC), builder.bitcast(w, _V16I32),
                                 builder.bitcast(x, _V16I32)])
    i32 = ir.VectorType(ir.IntType(32), VEC)
    acc = None
    for t in range(4):
        mask = ir.Constant(i32, [4 * j + t for j in range(VEC)])
        wt = builder.zext(builder.shuffle_vector(w, w, mask), _V16I32)
        xt = builder.sext(builder.shuffle_vector(x, x, mask), _V16I32)
        prod = builder.mul(wt, xt)
        acc = prod if acc is None else builder.add(acc, prod)
    return acc


def _codes64(builder: ir.IRBuilder, packed: Any) -> Any:
    """<32 x i8> packed int4 (two GGUF sub-blocks b, b+1) -> <64 x i8> codes [low nibbles of
    both, high nibbles of both] = elements [32b..+16, 32(b+1)..+16, 32b+16..+16, 32(b+1)+16..+16]
    (`pair_order`)."""
    v32 = ir.VectorType(ir.IntType(8), 32)
    lo = builder.and_(packed, ir.Constant(v32, [15] * 32))
    hi = builder.and_(builder.lshr(packed, ir.Constant(v32, [4] * 32)), ir.Constant(v32, [15] * 32))
    return builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(ir.IntType(32), 64),
                                                      list(range(64))))


@intrinsic
def vdot_q4q8(typingctx: Any, q: Any, qoff: Any, xq: Any, xoff: Any) -> Any:
    """Two 32-element blocks b, b+1: uint8 q[qoff : qoff + 32] (packed int4, sub-block order)
    against int8 xq[xoff : xoff + 64] holding the same elements in pair order (`_codes64`) ->
    f32x16 of exact integer partial sums: lanes 0-3 and 8-11 belong to block b, lanes 4-7 and
    12-15 to block b+1 (the layout of `vscale_pair`)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        qo = context.cast(builder, args[1], sig.args[1], types.intp)
        xo = context.cast(builder, args[3], sig.args[3], types.intp)
        v32 = ir.VectorType(ir.IntType(8), 32)
        packed = builder.load(_ptr(context, builder, sig.args[0], args[0], qo, v32), align=1)
        x = builder.load(_ptr(context, builder, sig.args[2], args[2], xo, _V64I8), align=1)
        return builder.sitofp(_dot_u8s8(builder, _codes64(builder, packed), x), _V16F)
    return f32x16(q, qoff, xq, xoff), codegen


@intrinsic
def vscale_pair(typingctx: Any, arr: Any, offset: Any) -> Any:
    """IEEE halves (uint16 arr) a = arr[offset], b = arr[offset + 1] -> f32x16 with a in lanes
    0-3 and 8-11, b in lanes 4-7 and 12-15 (the block layout of `vdot_q4q8`)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        h2 = ir.VectorType(ir.HalfType(), 2)
        v = builder.fpext(builder.load(_ptr(context, builder, sig.args[0], args[0], off, h2),
                                       align=2), ir.VectorType(_F32, 2))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), VEC), ([0] * 4 + [1] * 4) * 2)
        return builder.shuffle_vector(v, v, mask)
    return f32x16(arr, offset), codegen


@intrinsic
def vdot_q4q8_half(typingctx: Any, q: Any, qoff: Any, xq: Any, xoff: Any) -> Any:
    """One 32-element block (the last of a K that is an odd number of blocks): uint8
    q[qoff : qoff + 16] against int8 xq[xoff : xoff + 32] in element order -> f32x16 whose lanes
    0-3 and 8-11 hold its partial sums and lanes 4-7, 12-15 are 0 (`vdot_q4q8`'s layout)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        qo = context.cast(builder, args[1], sig.args[1], types.intp)
        xo = context.cast(builder, args[3], sig.args[3], types.intp)
        v16 = ir.VectorType(ir.IntType(8), 16)
        v32 = ir.VectorType(ir.IntType(8), 32)
        i32 = ir.IntType(32)
        packed = builder.load(_ptr(context, builder, sig.args[0], args[0], qo, v16), align=1)
        packed = builder.shuffle_vector(packed, ir.Constant(v16, [0] * 16),
                                        ir.Constant(ir.VectorType(i32, 32), list(range(32))))
        x = builder.load(_ptr(context, builder, sig.args[2], args[2], xo, v32), align=1)
        x = builder.shuffle_vector(x, ir.Constant(v32, [0] * 32),
                                   ir.Constant(ir.VectorType(i32, 64), list(range(64))))
        codes = _codes64(builder, packed)  # [lo 16, 0 x 16, hi 16, 0 x 16]
        x = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(i32, 64), list(range(16))
                                                     + list(range(32, 48)) + list(range(16, 32))
                                                     + list(range(48, 64))))
        return builder.sitofp(_dot_u8s8(builder, codes, x), _V16F)
    return f32x16(q, qoff, xq, xoff), codegen


@intrinsic
def vabsmax32(typingctx: Any, arr: Any, offset: Any) -> Any:
    """max |arr[offset : offset + 32]| of a float32 array -> float32."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        a = builder.load(_ptr(context, builder, sig.args[0], args[0], off, _V16F), align=4)
        off2 = builder.add(off, ir.Constant(off.type, VEC))
        b = builder.load(_ptr(context, builder, sig.args[0], args[0], off2, _V16F), align=4)
        a = _call_v(builder, "llvm.fabs.v16f32", [a])
        b = _call_v(builder, "llvm.fabs.v16f32", [b])
        v = _call_v(builder, "llvm.maxnum.v16f32", [a, b])
        fnty = ir.FunctionType(_F32, [_V16F])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.vector.reduce.fmax.v16f32")
        return builder.call(fn, [v])
    return types.float32(arr, offset), codegen


@intrinsic
def vstore_rint_i8(typingctx: Any, arr: Any, offset: Any, vec: Any) -> Any:
    """int8 arr[offset : offset + 16] = round-half-to-even(vec) (lanes must lie in -128..127)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        off = context.cast(builder, args[1], sig.args[1], types.intp)
        r = _call_v(builder, "llvm.rint.v16f32", [args[2]])
        builder.store(builder.fptosi(r, _V16I8),
                      _ptr(context, builder, sig.args[0], args[0], off, _V16I8), align=1)
        return context.get_dummy_value()
    return types.void(arr, offset, vec), codegen



@intrinsic
def vput(typingctx: Any, vec: Any, base: Any, index: Any, value: Any) -> Any:
    """vec with lane j set to value (float32) where base + j == index, the other lanes as they
    are (none changes when index is outside base .. base+15): a compare and a blend, no branch
    (sparse patches such as KVQuant's outliers). base and index must fit in int32."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        zero = ir.Constant(i32, 0)
        undef = ir.Constant(_V16I32, ir.Undefined)

        def splat_i32(x: Any, ty: Any) -> Any:
            x = builder.trunc(context.cast(builder, x, ty, types.int64), i32)
            return builder.shuffle_vector(builder.insert_element(undef, x, zero), undef,
                                          ir.Constant(_V16I32, [0] * VEC))

        lanes = builder.add(ir.Constant(_V16I32, list(range(VEC))),
                            splat_i32(args[1], sig.args[1]))
        hit = builder.icmp_signed("==", lanes, splat_i32(args[2], sig.args[2]))
        v = context.cast(builder, args[3], sig.args[3], types.float32)
        return builder.select(hit, _splat(builder, v), args[0])
    return f32x16(vec, base, index, value), codegen

# -- lookup-table codes (KVQuant's packed 2..4-bit KV codes) ----------------------------------


def _lut_strategy() -> str:
    """How `vload_lut` indexes its table: one `vpermps` zmm (AVX-512F), two ymm `vpermps` per
    half plus a blend on bit 3 (AVX2), or lane by lane (anything else). Follows the cap numba
    compiles for: LLVM cannot lower an x86 intrinsic for a target without it."""
    f = cpu_features()
    return "avx512" if f.avx512f else "avx2" if f.avx2 else "generic"


LUT_STRATEGY = _lut_strategy()


def _unpack_codes16(builder: ir.IRBuilder, packed: Any, bits: int) -> Any:
    """<2*bits x i8> little-endian bitstream (bit i of code j at bit j*bits + i) -> <16 x i32>
    codes, with constant shuffles and shifts only: lane j takes the byte (or the two bytes)
    holding bits j*bits .. j*bits + bits - 1."""
    i32 = ir.IntType(32)
    nbytes = 2 * bits
    shifts = [(j * bits) % 8 for j in range(VEC)]
    if 8 % bits == 0:  # a code never straddles two bytes
        mask = [(j * bits) // 8 for j in range(VEC)]
        lanes = builder.zext(builder.shuffle_vector(packed, packed, ir.Constant(
            ir.VectorType(i32, VEC), mask)), _V16I32)
    else:  # a little-endian 16-bit window from the code's first byte
        mask = []
        for j in range(VEC):
            lo = (j * bits) // 8
            mask += [lo, min(lo + 1, nbytes - 1)]
        pairs = builder.shuffle_vector(packed, packed, ir.Constant(ir.VectorType(i32, 2 * VEC),
                                                                   mask))
        lanes = builder.zext(builder.bitcast(pairs, ir.VectorType(ir.IntType(16), VEC)),
                             _V16I32)
    lanes = builder.lshr(lanes, ir.Constant(_V16I32, shifts))
    return builder.and_(lanes, ir.Constant(_V16I32, [(1 << bits) - 1] * VEC))


def _lut16(builder: ir.IRBuilder, table: Any, codes: Any, bits: int, strategy: str) -> Any:
    """table <16 x float> (2^bits entries, repeated to fill 16 lanes), codes <16 x i32>
    (< 2^bits) -> <16 x float> of table[codes]."""
    i32 = ir.IntType(32)
    if strategy == "avx512":
        fnty = ir.FunctionType(_V16F, [_V16F, _V16I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty,
                                            "llvm.x86.avx512.permvar.sf.512")
        return builder.call(fn, [table, codes])
    if strategy == "avx2":
        v8f = ir.VectorType(_F32, 8)
        v8i = ir.VectorType(i32, 8)
        fnty = ir.FunctionType(v8f, [v8f, v8i])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.permps")
        lo_half = ir.Constant(v8i, list(range(8)))
        hi_half = ir.Constant(v8i, list(range(8, 16)))
        t_lo = builder.shuffle_vector(table, table, lo_half)
        t_hi = builder.shuffle_vector(table, table, hi_half)
        halves = []
        for part in (lo_half, hi_half):
            idx = builder.shuffle_vector(codes, codes, part)
            got = builder.call(fn, [t_lo, idx])  # vpermps reads the index's low 3 bits
            if bits > 3:  # 16 entries: the upper 8 where bit 3 is set
                upper = builder.icmp_unsigned("!=", builder.and_(idx, ir.Constant(v8i, [8] * 8)),
                                              ir.Constant(v8i, [0] * 8))
                got = builder.select(upper, builder.call(fn, [t_hi, idx]), got)
            halves.append(got)
        return builder.shuffle_vector(halves[0], halves[1],
                                      ir.Constant(ir.VectorType(i32, VEC), list(range(VEC))))
    out = ir.Constant(_V16F, ir.Undefined)
    for j in range(VEC):
        lane = ir.Constant(i32, j)
        out = builder.insert_element(out, builder.extract_element(
            table, builder.extract_element(codes, lane)), lane)
    return out


def _make_vload_lut(strategy: str) -> Any:
    def gen(typingctx: Any, table: Any, arr: Any, offset: Any, bits: Any) -> Any:
        if not isinstance(bits, types.IntegerLiteral):
            raise errors.RequireLiteralValue(bits)
        b = bits.literal_value
        if b not in (1, 2, 3, 4):
            raise TypeError(f"vload_lut: bits must be 1..4, got {b}")

        def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
            off = context.cast(builder, args[2], sig.args[2], types.intp)
            vty = ir.VectorType(ir.IntType(8), 2 * b)
            packed = builder.load(_ptr(context, builder, sig.args[1], args[1], off, vty),
                                  align=1)
            return _lut16(builder, args[0], _unpack_codes16(builder, packed, b), b, strategy)
        return f32x16(table, arr, offset, bits), codegen
    return intrinsic(gen)


# table f32x16 (2^bits entries repeated over the 16 lanes), uint8 arr: the 16 codes packed in
# arr[offset : offset + 2*bits] (little-endian bitstream), bits a literal 1..4 -> f32x16 of
# table[code_j]. Reads exactly 2*bits bytes. vload_lut uses LUT_STRATEGY; the others are the
# alternatives, for tests (an x86 one only where the CPU, as capped, has its instructions).
vload_lut = _make_vload_lut(LUT_STRATEGY)
vload_lut_avx2 = _make_vload_lut("avx2")
vload_lut_generic = _make_vload_lut("generic")

__all__ = ["LUT_STRATEGY", "VEC", "VNNI", "f32x16", "load_f16", "prefetch", "prefetch_l2",
           "store_kv", "vabsmax32", "vadd", "vdot_q4q8", "vdot_q4q8_half", "vexp", "vfma",
           "vfnma", "vload", "vload_hi4", "vload_i8", "vload_kv", "vload_lo4", "vload_lut",
           "vload_lut_avx2", "vload_lut_generic", "vmul", "vput", "vscale_pair", "vsplat",
           "vstore", "vstore_rint_i8", "vsub", "vsum", "vsum16", "vzero"]
