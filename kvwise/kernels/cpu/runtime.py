"""numba's threading runtime for the CPU kernels: which layer, how many threads.

Invariants:
- `preload_tbb` runs before the first parallel kernel launch (numba loads its threading layer
  lazily at that point), so numba picks TBB when the `tbb` wheel is installed.
- The thread count is per calling thread in numba; `set_num_threads` is cheap to call again.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numba

# fastmath for kernels whose bits must not depend on where they are compiled from: no
# reassociation or contraction of scalar math (explicit vector FMAs in simd.py are unaffected).
# LLVM inlines kernels and glue into one another differently in the fused decode step and in a
# direct call; with full fastmath the two then rounded differently (tests/unit/model/
# test_fused_decode.py). Also makes rope's products and sum round like torch's mul and add.
EXACT_FASTMATH = frozenset({"nnan", "ninf", "nsz", "arcp"})


def preload_tbb() -> None:
    """Make numba's TBB threading layer loadable from a pip-installed `tbb` wheel.

    The wheel puts libtbb.so.12 in <prefix>/lib, which is not on the loader path; numba's
    tbbpool extension then fails to load and numba falls back to OpenMP, whose spin-waiting
    workers fight torch's own OpenMP workers on a 2-core machine (measured: a 2 us kernel launch
    became 50-8000 us next to torch ops). TBB workers back off instead, and the launching thread
    steals unstarted tasks. Loading the library once by absolute path with RTLD_GLOBAL satisfies
    tbbpool's dependency by soname. Without the wheel numba falls back as usual.
    """
    for prefix in (sys.prefix, sys.base_prefix):
        path = os.path.join(prefix, "lib", "libtbb.so.12")
        if os.path.isfile(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return


def set_num_threads(n: int) -> None:
    """Threads for the calling thread's kernel launches."""
    n = max(1, min(n, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def num_threads() -> int:
    """Threads the calling thread's kernel launches get."""
    return numba.get_num_threads()


def threading_layer() -> str:
    """The layer numba loaded ('tbb', 'omp' or 'workqueue'); valid after a parallel launch."""
    return numba.threading_layer()
