"""Every backend that exists agrees with python_ref on random shapes (hypothesis).

The C++ and Triton files have their own deeper fuzz tests; this one checks the
public dispatch end to end: auto, cpp (when built), triton (interpreter on CPU),
all against the fp64 reference.
"""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref as R
from tolerances import assert_close

BACKENDS = ["auto", "reference"]
if pk.cpp_variant():
    BACKENDS.append("cpp")
TRITON = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
try:
    import triton  # noqa: F401
except ImportError:
    TRITON = False


@st.composite
def attention_case(draw, max_n=40):
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 3))
    H = Hkv * draw(st.integers(1, 3))
    Nq = draw(st.integers(1, max_n))
    Nk = draw(st.integers(1, max_n))
    d = draw(st.sampled_from([8, 16, 32, 64]))
    causal = draw(st.booleans())
    with_counts = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, H, Hkv, Nq, Nk, d, causal, with_counts, seed


def _inputs(case, dtype):
    B, H, Hkv, Nq, Nk, d, causal, with_counts, seed = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, Nk, d, generator=g, dtype=torch.float64)
    kw = {}
    if with_counts:
        kw["key_counts"] = torch.randint(1, 20, (B, Nk), generator=g)
    if causal:  # arbitrary (unsorted) global positions, as a device's keys have
        kw.update(causal=True, q_pos=torch.randint(0, 2 * max(Nq, Nk), (Nq,), generator=g),
                  k_pos=torch.randint(0, 2 * max(Nq, Nk), (B, Nk), generator=g))
    return q, k, v, kw


def _check(case, backend, dtype):
    q, k, v, kw = _inputs(case, dtype)
    expected, lse_ref = R.prism_attention(q, k, v, return_lse=True, **kw)
    out, lse = pk.prism_attention(q.to(dtype), k.to(dtype), v.to(dtype), backend=backend,
                                  return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, expected, dtype)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert_close(lse[finite], lse_ref[finite], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(case=attention_case())
def test_attention_backends_agree(backend, dtype, case):
    _check(case, backend, dtype)


@pytest.mark.skipif(not TRITON, reason="triton not installed")
@settings(max_examples=6)
@given(case=attention_case(max_n=20))
def test_attention_triton_agrees(case):
    _check(case, "triton", torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + (["triton"] if TRITON else []))
@given(lead=st.lists(st.integers(1, 3), max_size=2), n=st.integers(1, 50), D=st.integers(1, 40),
       data=st.data())
@settings(max_examples=15)
def test_segment_means_backends_agree(backend, lead, n, D, data):
    m = data.draw(st.integers(1, n))
    x = torch.randn(*lead, n, D, dtype=torch.float64)
    means_ref, counts_ref = R.segment_means(x, m)
    means, counts = pk.segment_means(x.float(), m, backend=backend)
    assert counts.tolist() == counts_ref.tolist()
    assert_close(means, means_ref, torch.float32)
