"""A team of threads that stays inside one numba parallel region for a whole decode step.

Why: at batch 1 a SmolLM2 projection is 0.2-2 MB of weights, 10-60 us of work. A numba `prange`
launch per projection hands half the rows to a TBB worker that has gone to sleep since the last
launch; it wakes after most of the rows are done, so the launching core did nearly all the work
(measured, 576 x 576 int4: 14.1 us on one thread, 15.1 us on two). Threads that spin between
phases start each phase at once (llama.cpp's thread pool works this way). The TBB layer stays
the default for every other kernel: its workers back off instead of spinning next to torch's
own thread pool.

Protocol: the step is a fixed sequence of phases; phase p has `n_p` chunks of work. Every team
member walks the same sequence: it claims chunks of p (first from its own share, through a
counter no other member touches until it runs out of its own: a counter shared by all cost
~0.1 us of cache-line traffic per claim, thousands per step), adds how many it finished, then
waits until all `n_p` are finished before phase p + 1. A serial phase is one chunk.

Invariants:
- No deadlock whatever the runtime does with the team's iterations, including running them one
  after another on one thread (a layer without free workers): a member waits only for chunks
  that another member has claimed, i.e. is running now. A member that starts late finds the
  early phases claimed and finished and catches up without doing anything.
- Happens-before: a chunk's writes precede its `finish` (sequentially consistent atomic add),
  and every reader passes `wait` (atomic load) first, so phase p + 1 sees all of phase p.
- Results do not depend on which member ran a chunk: each chunk writes its own outputs with
  code that does not depend on the thread.
- The waits spin with `pause`, then also yield the CPU (`sched_yield`) after SPIN_LIMIT rounds, so a
  member whose partner was descheduled does not hold its core for a whole time slice.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

from kvwise.kernels.cpu import runtime

LINE = 8  # int64 slots per cache line
SPIN_LIMIT = 2000  # pause rounds (~10-40 us) before a waiting member also yields the CPU
_I64 = ir.IntType(64)
_MACHINE = platform.machine().lower()
_X86_64 = _MACHINE in ("x86_64", "amd64")
_ARM64 = _MACHINE in ("aarch64", "arm64")
_LINUX = sys.platform.startswith("linux")


def _slot(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
    ary = context.make_array(sig.args[0])(context, builder, args[0])
    idx = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.gep(ary.data, [idx])


def _check_i64(arr: Any) -> None:
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64):
        raise TypeError(f"team counters are an int64 array, not {arr}")


@intrinsic
def atomic_add(typingctx: Any, arr: Any, index: Any, value: Any) -> Any:
    """arr[index] += value atomically (sequentially consistent) -> the previous value."""
    _check_i64(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", _slot(context, builder, sig, args), v, "seq_cst")
    return types.int64(arr, index, value), codegen


@intrinsic
def atomic_load(typingctx: Any, arr: Any, index: Any) -> Any:
    """arr[index], read atomically with acquire ordering."""
    _check_i64(arr)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        return builder.load_atomic(_slot(context, builder, sig, args), "acquire", 8)
    return types.int64(arr, index), codegen


def _emit_pause(builder: ir.IRBuilder) -> None:
    text = "pause" if _X86_64 else "yield" if _ARM64 else ""
    if text:
        fnty = ir.FunctionType(ir.VoidType(), [])
        builder.call(ir.InlineAsm(fnty, text, "~{memory}", side_effect=True), [])


@intrinsic
def spin_pause(typingctx: Any) -> Any:
    """A spin-wait hint (`pause` on x86, `yield` on arm64; nothing elsewhere)."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        _emit_pause(builder)
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def sched_yield(typingctx: Any) -> Any:
    """The sched_yield system call on Linux x86-64 / arm64 (a spin hint elsewhere). Raw syscall
    rather than a libc pointer, which would keep numba from caching the compiled step."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> Any:
        if _LINUX and _X86_64:
            fnty = ir.FunctionType(_I64, [_I64])
            asm = ir.InlineAsm(fnty, "syscall", "={rax},{rax},~{rcx},~{r11},~{memory}",
                               side_effect=True)
            builder.call(asm, [ir.Constant(_I64, 24)])  # __NR_sched_yield
        elif _LINUX and _ARM64:
            fnty = ir.FunctionType(_I64, [_I64])
            asm = ir.InlineAsm(fnty, "svc #0", "={x0},{x8},~{memory}", side_effect=True)
            builder.call(asm, [ir.Constant(_I64, 124)])
        else:
            _emit_pause(builder)
        return context.get_dummy_value()
    return types.void(), codegen


def _enable_inline_asm() -> None:
    """numba's JIT assembles object code with an LLVM streamer that needs the target's asm
    parser for inline asm (`pause`, `syscall`); numba does not initialise it."""
    import llvmlite.binding as llvm

    llvm.initialize_native_asmparser()


_enable_inline_asm()

_INLINE = dict(fastmath=set(runtime.EXACT_FASTMATH), cache=True, nogil=True,
               error_model="numpy", inline="always")


@njit(**_INLINE)
def counters(num_phases, members):
    """Zeroed counters for a step of `num_phases` phases run by `members` members (one array
    per step call): per phase, one cache line per member (its claim counter) and one for the
    finished count."""
    return np.zeros(num_phases * (members + 1) * LINE, np.int64)


@njit(**_INLINE)
def claim(sync, phase, member, members, chunks):
    """-> the next unclaimed chunk of `phase` for `member`, or -1 when none is left. Member m
    owns chunks [m * chunks // members, (m + 1) * chunks // members) and takes them from its own
    counter (no cache line shared in the common case), then takes what is left of the others'."""
    base = phase * (members + 1) * LINE
    for j in range(members):
        k = (member + j) % members
        start = k * chunks // members
        stop = (k + 1) * chunks // members
        if start < stop:
            c = start + atomic_add(sync, base + k * LINE, 1)
            if c < stop:
                return c
    return -1


@njit(**_INLINE)
def finish(sync, phase, members, count):
    """Add `count` chunks of `phase` that this member has finished (after their writes)."""
    if count > 0:
        atomic_add(sync, (phase * (members + 1) + members) * LINE, count)


@njit(**_INLINE)
def wait(sync, phase, members, chunks):
    """Return once all `chunks` chunks of `phase` are finished."""
    slot = (phase * (members + 1) + members) * LINE
    rounds = 0
    while atomic_load(sync, slot) < chunks:
        if rounds < SPIN_LIMIT:
            spin_pause()
            rounds += 1
        else:
            sched_yield()


@njit(**_INLINE)
def serial(sync, phase, members):
    """-> True for the one member that runs serial phase `phase` (it then calls
    `finish(..., 1)`); every member calls `wait(sync, phase, members, 1)` after."""
    return atomic_add(sync, phase * (members + 1) * LINE, 1) == 0
