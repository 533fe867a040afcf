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
