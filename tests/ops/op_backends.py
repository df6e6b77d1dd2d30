"""Which (backend, device, dtype) combinations the op tests run, and why some skip."""
import os

import pytest
import torch

import prism_kernels as pk

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _combo(backend, device, dtype):
    """pytest.param for one combination, with the marks (skip / gpu) it needs."""
    marks = []
    if device == "cuda":
        marks.append(pytest.mark.gpu)
    if backend == "cpp" and not pk.cpp_variant():
        marks.append(pytest.mark.skip(reason="C++ extension not built"))
    if backend == "triton":
        if not HAS_TRITON:
            marks.append(pytest.mark.skip(reason="triton not installed"))
        elif device == "cpu" and not INTERPRET:
            marks.append(pytest.mark.skip(reason="Triton on CPU needs TRITON_INTERPRET=1"))
        elif device == "cpu" and dtype == torch.bfloat16:
            marks.append(pytest.mark.skip(
                reason="the Triton interpreter computes bf16 wrongly (known); bf16 is "
                       "checked on the GPU (gpu marker, benchmarks/gpu_check.py)"))
    return pytest.param(backend, device, dtype, marks=marks,
                        id=f"{backend}-{device}-{DTYPE_IDS[dtype]}")


def combos():
    """Every backend x device x dtype it supports (fp64 is not a Triton dtype)."""
    out = []
    for dtype in DTYPES:
        out.append(_combo("cpp", "cpu", dtype))
        out.append(_combo("torch", "cpu", dtype))
        if dtype != torch.float64:
            out.append(_combo("triton", "cpu", dtype))
            out.append(_combo("triton", "cuda", dtype))
        out.append(_combo("torch", "cuda", dtype))
    return out


def examples(backend, device):
    """Hypothesis examples per combination: the Triton interpreter is slow."""
    return 6 if backend == "triton" and device == "cpu" else 12
