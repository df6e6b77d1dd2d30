"""Tolerances per dtype, stated once, used by every kernel test.

The reference accumulates in fp32 (fp64 for fp64). Kernels accumulate in fp32
but round inputs and the output to the input dtype, so the bound is set by
the output rounding: ~2^-8 relative for bf16, ~2^-11 for fp16.
"""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_close(actual, expected, dtype=None, **override):
    """Compare in fp64 with the tolerance of `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    tol = dict(TOL[dtype], **override)
    assert not torch.isnan(actual).any(), "NaN in result"
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
