"""prism::matched_rows for every backend x dtype, against the fp64 oracle (python_ref).

The matrix test draws random shapes (hypothesis): batch, tokens, KV heads, head
width (odd ones too), segments from one to one per token, with empty segments,
and keys / values strided across tokens (a slice of a wider projection output).
The oracle loops over segments and heads in fp64 on the same rounded inputs.
Tolerances: tests/tolerances.py (TOL). bias is fp32 (fp64 for fp64) whatever the
input dtype, and is computed from the row before it is rounded, so it is
compared at the fp32 tolerance for the half types.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prism_kernels as pk  # noqa: F401  (registers the prism ops)
import python_ref as R
from op_backends import combos, examples
from tolerances import TOL, assert_close


@st.composite
def matched_case(draw):
    B = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    Hkv = draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 3, 8, 17, 64]))
    m = draw(st.sampled_from(["one", "all", "some"]))
    m = {"one": 1, "all": n}.get(m) or draw(st.integers(1, n + 2))   # > n: some segments empty
    strided = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return B, n, Hkv, d, m, strided, seed


def _inputs(case, dtype, device):
    B, n, Hkv, d, m, strided, seed = case
    g = torch.Generator().manual_seed(seed)
    F = Hkv * d
    wide = 3 if strided else 1            # k and v as slices of one [B, n, 3F] tensor
    kv = (torch.randn(B, n, wide * F, generator=g) * 2).to(dtype).to(device)
    k, v = (kv[..., :F], kv[..., F:2 * F]) if strided else (kv, torch.randn(B, n, F, generator=g).to(dtype).to(device))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q0 = (torch.randn(B, Hkv, d, generator=g) + 0.5).to(acc).to(device)
    seg_of = torch.randint(0, m, (B, n), generator=g).to(device)
    return q0, k, v, seg_of, m, d ** -0.5


def _check(case, backend, device, dtype):
    q0, k, v, seg_of, m, s = _inputs(case, dtype, device)
    km, vm, b = torch.ops.prism.matched_rows(q0, k, v, seg_of, m, s, backend=backend)
    rk, rv, rb = R.matched_rows(q0.cpu(), k.cpu(), v.cpu(), seg_of.cpu(), m, s)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert km.dtype == dtype and vm.dtype == dtype and b.dtype == acc
    assert km.shape == rk.shape and b.shape == rb.shape and km.device == k.device
    assert_close(km.cpu(), rk, dtype)
    assert_close(vm.cpu(), rv, dtype)
    empty = torch.isinf(rb)
    assert torch.equal(torch.isinf(b.cpu()), empty), "bias -inf exactly on the empty segments"
    assert (km.cpu()[empty.any(-1)] == 0).all() and (vm.cpu()[empty.any(-1)] == 0).all()
    # the bias of a half-type row comes from the fp32 row: fp32's tolerance, scaled by its size
    assert_close(b.cpu()[~empty], rb[~empty], acc, atol=TOL[acc]["atol"] * 50)


@pytest.mark.parametrize("backend,device,dtype", [c for c in combos() if c.values[0] != "triton"])
def test_matched_rows_matrix(backend, device, dtype):
    @settings(max_examples=examples(backend, device), deadline=None)
    @given(case=matched_case())
    def run(case):
        _check(case, backend, device, dtype)
    run()


def test_matched_rows_reproduce_the_segment_at_its_query():
    """What the rows are for: a receiver whose query is q0 gets, from the rows with their
    bias (scores s q0.k~ + b, counts 1), the output and log-sum-exp of all the tokens."""
    g = torch.Generator().manual_seed(3)
    B, n, Hkv, d, m = 2, 30, 2, 16, 4
    q0 = torch.randn(B, Hkv, d, generator=g)
    k, v = torch.randn(B, n, Hkv * d, generator=g) * 2, torch.randn(B, n, Hkv * d, generator=g)
    seg_of = torch.arange(n).repeat(B, 1) % m
    s = d ** -0.5
    km, vm, b = torch.ops.prism.matched_rows(q0, k, v, seg_of, m, s)
    k4, v4 = k.view(B, n, Hkv, d), v.view(B, n, Hkv, d)
    z = s * torch.einsum("bnhd,bhd->bhn", k4, q0)
    want_lse = torch.logsumexp(z, -1)
    want = torch.einsum("bhn,bnhd->bhd", torch.softmax(z, -1), v4)
    zr = s * torch.einsum("bmhd,bhd->bhm", km.view(B, m, Hkv, d), q0) + b.transpose(1, 2)
    got = torch.einsum("bhm,bmhd->bhd", torch.softmax(zr, -1), vm.view(B, m, Hkv, d))
    assert_close(torch.logsumexp(zr, -1), want_lse, torch.float32)
    assert_close(got, want, torch.float32)


def test_matched_rows_at_query_zero_are_the_paper_means():
    g = torch.Generator().manual_seed(4)
    B, n, Hkv, d, m = 1, 11, 2, 8, 3
    k, v = torch.randn(B, n, Hkv * d, generator=g), torch.randn(B, n, Hkv * d, generator=g)
    seg_of = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]])
    km, vm, b = torch.ops.prism.matched_rows(torch.zeros(B, Hkv, d), k, v, seg_of, m, 0.125)
    for j, c in enumerate((4, 3, 4)):
        sel = seg_of[0] == j
        assert_close(km[0, j], k[0, sel].mean(0), torch.float32)
        assert_close(vm[0, j], v[0, sel].mean(0), torch.float32)
        assert_close(b[0, j], torch.full((Hkv,), float(c)).log(), torch.float32)


@pytest.mark.parametrize("backend", ["cpp"] if pk.cpp_variant() else [])
def test_matched_rows_refuses_bad_segments(backend):
    q0, k, v = torch.zeros(1, 1, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    with pytest.raises(RuntimeError, match="seg_of must lie in 0..num_segments-1"):
        torch.ops.prism.matched_rows(q0, k, v, torch.tensor([[0, 1, 2, 3, 4]]), 3, 0.5, backend=backend)
    with pytest.raises(RuntimeError, match="shapes do not agree"):
        torch.ops.prism.matched_rows(torch.zeros(1, 2, 4), k, v, torch.zeros(1, 5, dtype=torch.int64), 1, 0.5,
                                     backend=backend)


def test_matched_rows_under_torch_compile():
    """The op has a fake kernel: it traces with fullgraph=True and matches eager."""
    g = torch.Generator().manual_seed(5)
    q0, k, v = torch.randn(1, 2, 8, generator=g), torch.randn(1, 9, 16, generator=g), torch.randn(1, 9, 16, generator=g)
    seg_of = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 0, 1]])
    f = torch.compile(lambda q0, k, v, s: torch.ops.prism.matched_rows(q0, k, v, s, 3, 0.35), fullgraph=True)
    for a, b in zip(f(q0, k, v, seg_of), torch.ops.prism.matched_rows(q0, k, v, seg_of, 3, 0.35)):
        assert_close(a, b, torch.float32)
