"""The row-invariant fp32 matmul (`--batch-invariant`): close to a float64 reference, and each
output row the same bits whatever the number of rows, their position and the thread count."""

from __future__ import annotations

import numpy as np
import pytest

from kvwise.kernels.cpu import dense_rows, runtime


def _case(k: int, n: int, t: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k), dtype=np.float32)
    w = rng.standard_normal((k, n), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    return x, w, b


def _mm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], w.shape[1]), np.float32)
    dense_rows.matmul(np.ascontiguousarray(x), w, b, out)
    return out


# N: whole 64-column tasks, a 16-column tail, a scalar tail, and all three
@pytest.mark.parametrize("k,n", [(64, 128), (96, 80), (32, 7), (576, 960), (40, 100)])
def test_matches_float64_reference(k: int, n: int) -> None:
    x, w, b = _case(k, n, 37)
    ref = x.astype(np.float64) @ w.astype(np.float64) + b
    got = _mm(x, w, b)
    tol = 1e-5 * np.sqrt(k) * np.abs(x).max() * np.abs(w).max()
    assert np.abs(got - ref).max() < tol
    no_bias = _mm(x, w, np.empty(0, np.float32))
    assert np.abs(no_bias - (ref - b)).max() < tol


@pytest.mark.parametrize("k,n", [(576, 960), (40, 100)])
def test_rows_do_not_depend_on_the_batch(k: int, n: int) -> None:
    x, w, b = _case(k, n, 70, seed=1)
    full = _mm(x, w, b)
    for t0, t in [(0, 1), (5, 1), (0, 2), (3, 3), (0, 4), (9, 5), (1, 16), (17, 33), (0, 70)]:
        assert np.array_equal(_mm(x[t0:t0 + t], w, b), full[t0:t0 + t]), (t0, t)
    before = runtime.num_threads()
    try:
        runtime.set_num_threads(1)
        assert np.array_equal(_mm(x, w, b), full)
    finally:
        runtime.set_num_threads(before)


def test_rejects_bad_arrays() -> None:
    x, w, b = _case(32, 16, 2)
    with pytest.raises(ValueError, match="float32"):
        dense_rows.matmul(x.astype(np.float64), w, b, np.empty((2, 16), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        dense_rows.matmul(x, w, b, np.empty((3, 16), np.float32))
    with pytest.raises(ValueError, match="bias"):
        dense_rows.matmul(x, w, b[:5].copy(), np.empty((2, 16), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        dense_rows.matmul(x, np.asfortranarray(w), b, np.empty((2, 16), np.float32))
