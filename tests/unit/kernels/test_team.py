"""The thread-team protocol of the fused decode step (kvwise/model/kernels/cpu/team.py).

Claims: every chunk of every phase runs exactly once, phases are ordered (a phase reads only
what earlier phases wrote), and a team larger than the runtime's threads (members run one after
another on one thread) completes instead of deadlocking.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from numba import njit, prange

from kvwise.kernels.cpu import runtime, team


@njit(parallel=True, nogil=True)
def _pipeline(members, chunks, phases, out, runs):
    """Phase p, chunk c: out[p, c] = 1 + sum of phase p - 1's row (all of it must be done)."""
    sync = team.counters(phases, members)
    for member in prange(members):
        for p in range(phases):
            c = team.claim(sync, p, member, members, chunks)
            done = 0
            while c >= 0:
                prev = 0.0
                if p > 0:
                    for j in range(chunks):
                        prev += out[p - 1, j]
                out[p, c] = 1.0 + prev
                runs[p, c] += 1
                done += 1
                c = team.claim(sync, p, member, members, chunks)
            team.finish(sync, p, members, done)
            team.wait(sync, p, members, chunks)


def _expected(chunks: int, phases: int) -> np.ndarray:
    want = np.zeros((phases, chunks))
    for p in range(phases):
        want[p] = 1.0 + (want[p - 1].sum() if p else 0.0)
    return want


@pytest.mark.parametrize("threads,members", [(2, 2), (1, 2), (1, 3), (2, 5)])
@pytest.mark.parametrize("chunks", [1, 3, 40])
def test_every_chunk_runs_once_in_phase_order(threads, members, chunks):
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    before = numba.get_num_threads()
    runtime.set_num_threads(threads)
    try:
        phases = 6
        out = np.zeros((phases, chunks))
        runs = np.zeros((phases, chunks), np.int64)
        _pipeline(members, chunks, phases, out, runs)
    finally:
        numba.set_num_threads(before)
    assert (runs == 1).all()
    assert np.array_equal(out, _expected(chunks, phases))
