"""Tolerances per dtype, stated once, used by every kernel test.

Forward (TOL): the fp64 oracle (python_ref) sees the same rounded inputs.
Kernels accumulate in fp32 (fp64 for fp64) but round the output to the input
dtype, so the bound is set by the output rounding: ~2^-8 relative for bf16,
~2^-11 for fp16, a few fp32 ulps times the reduction length for fp32.

Backward (GRAD_TOL): the backward (prism_kernels/autograd.py) recomputes the
probabilities in fp32 from the saved output, which was rounded to the input
dtype; that rounding enters rowsum(dO * O) and so every gradient, and the
gradients are rounded to the input dtype again. Hence about 4x the forward
bound for the half types; fp32 and fp64 lose a little to the longer chains.
"""
import torch

TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

GRAD_TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-8),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=6e-2, rtol=6e-2),
}


def assert_close(actual, expected, dtype=None, **override):
    """Compare in fp64 with the tolerance of `dtype` (default: actual's dtype)."""
    dtype = dtype or actual.dtype
    tol = dict(TOL[dtype], **override)
    assert not torch.isnan(actual).any(), "NaN in result"
    torch.testing.assert_close(actual.double(), expected.double(), **tol)


def assert_grad_close(actual, expected, dtype, **override):
    """Gradients: compare in fp64 with GRAD_TOL[dtype]."""
    tol = dict(GRAD_TOL[dtype], **override)
    assert actual is not None, "no gradient"
    assert not torch.isnan(actual).any(), "NaN in gradient"
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
