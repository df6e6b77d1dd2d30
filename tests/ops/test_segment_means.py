"""prism::segment_means, forward and backward, for every backend x dtype, against the fp64 oracle.

The matrix test draws random shapes (hypothesis): leading dims, odd n, m = 1,
m = n, D from 1 up, contiguous or strided input. The oracle (python_ref, fp64,
differentiated by torch.autograd) sees the same rounded input. Tolerances:
tests/tolerances.py (TOL forward, GRAD_TOL backward).

Below the matrix: the public dispatch end to end, gradcheck in fp64, and the
oracle's own properties (tensor_split sizes, Eq. 16).
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk
import python_ref as R
from op_backends import HAS_TRITON, INTERPRET, combos, examples
from tolerances import assert_close, assert_grad_close

TRITON = HAS_TRITON and (INTERPRET or torch.cuda.is_available())
BACKENDS = ["auto", "torch"] + (["cpp"] if pk.cpp_variant() else [])


@st.composite
def segment_case(draw):
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    n = draw(st.integers(1, 40))
    D = draw(st.integers(1, 40))
    m = draw(st.sampled_from(["one", "all", "some"]))
    m = {"one": 1, "all": n}.get(m) or draw(st.integers(1, n))
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return lead, n, D, m, strided, seed


def _check_matrix_case(case, backend, device, dtype):
    lead, n, D, m, strided, seed = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, D, n, generator=g).to(dtype).to(device)
    x = x.transpose(-1, -2) if strided else x.transpose(-1, -2).contiguous()
    grad = torch.randn(*lead, m, D, generator=g, dtype=torch.float64).to(device)

    xk = x.detach().clone().requires_grad_(True)
    means, counts = pk.segment_means(xk, m, backend=backend)
    (dx,) = torch.autograd.grad((means.double() * grad).sum(), xk)
    xr = x.detach().double().requires_grad_(True)
    ref, ref_counts = R.segment_means(xr, m)
    (ref_dx,) = torch.autograd.grad((ref * grad).sum(), xr)

    assert means.dtype == dtype and means.shape == ref.shape and means.device == x.device
    assert counts.dtype == torch.int64 and counts.tolist() == ref_counts.tolist()
    assert_close(means, ref, dtype)
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_grad_close(dx, ref_dx, dtype)


@pytest.mark.parametrize("backend,device,dtype", combos())
def test_segment_means_forward_backward(backend, device, dtype):
    @settings(max_examples=examples(backend, device))
    @given(case=segment_case())
    def run(case):
        _check_matrix_case(case, backend, device, dtype)
    run()


def test_triton_backend_returns_gradients():
    if not TRITON:
        pytest.skip("needs Triton with a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    means, _ = pk.segment_means(x, 4, backend="triton")
    assert means.grad_fn is not None
    means.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_triton_rejects_fp64():
    if not TRITON:
        pytest.skip("needs Triton with a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with pytest.raises(ValueError, match="float64"):
        pk.segment_means(torch.randn(5, 4, dtype=torch.float64, device=device), 2, backend="triton")


# ---------------------------------------------------------------- public dispatch (moved
# from test_backends_agree.py)

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


def test_use_backend_applies_to_segment_means(monkeypatch):
    from prism_kernels import torch_backend
    calls = []
    real = torch_backend.segment_means
    monkeypatch.setattr(torch_backend, "segment_means", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 9, 4)
    with pk.use_backend("torch"):
        means, counts = pk.segment_means(x, 4)
    assert calls == [1]
    assert_close(means, R.segment_means(x.double(), 4)[0], torch.float32)


# ---------------------------------------------------------------- gradcheck (moved from
# test_autograd.py)

@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("n,m", [(7, 3), (5, 5), (6, 1)])
def test_segment_means_gradcheck(n, m, backend):
    x = torch.randn(2, n, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: pk.segment_means(x, m, backend=backend)[0], (x,))


# ---------------------------------------------------------------- the oracle itself (moved
# from test_reference.py)

@pytest.mark.parametrize("n,m", [(10, 3), (7, 7), (7, 1), (13, 5), (1, 1), (100, 9)])
def test_segment_sizes_follow_tensor_split(n, m):
    x = torch.randn(2, n, 4)
    for fn in (R.segment_means, pk.segment_means):
        means, counts = fn(x, m)
        parts = torch.tensor_split(x, m, dim=-2)
        assert counts.tolist() == [p.shape[-2] for p in parts]
        assert int(counts.sum()) == n
        assert_close(means, torch.stack([p.mean(-2) for p in parts], dim=-2), torch.float32)


def test_segment_means_edge_cases():
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    means, counts = R.segment_means(x, 5)          # m = n: every mean is one token
    assert torch.equal(means, x) and counts.tolist() == [1] * 5
    means, counts = R.segment_means(x, 1)          # m = 1: the partition mean
    assert_close(means[..., 0, :], x.mean(-2)) and counts.tolist() == [5]


def test_partition_sizes_and_num_means():
    assert R.partition_sizes(10, 3) == [4, 3, 3]
    assert R.partition_sizes(197, 2) == [99, 98]
    assert R.partition_sizes(5, 5) == [1] * 5
    # Eq. 16: m = min(n, max(1, ceil(n / CR)))
    assert R.num_means(128, 10) == 13
    assert R.num_means(128, 1) == 128
    assert R.num_means(5, 1000) == 1
    assert R.num_means(99, 9.9) == 10
